"""LoRA adapters (as `peft` saves them) folded into base weights: W <- W + scale * B @ A.

Only what a merge needs is read: `adapter_config.json` (rank, alpha, rsLoRA) and
`adapter_model.safetensors`. Options that a plain merge cannot honour (DoRA, extra trained
modules, fan-in/fan-out weights) are refused with the reason.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


def _adapter_files(adapter_dir: Path) -> tuple[dict, Path]:
    config_path, weights_path = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"{adapter_dir} is not a LoRA adapter directory: {path.name} is missing (peft's "
                "save_pretrained and `msn train --lora-rank R` write adapter_config.json and "
                "adapter_model.safetensors)"
            )
    config = json.loads(config_path.read_text(encoding="utf-8"))
    unsupported = [
        option for option in ("use_dora", "modules_to_save", "fan_in_fan_out") if config.get(option)
    ]
    if config.get("peft_type", "LORA") != "LORA" or unsupported:
        raise ValueError(
            f"{config_path}: only plain LoRA adapters can be merged (peft_type LORA without "
            f"{', '.join(unsupported) or 'other options'}); merge it with peft's merge_and_unload "
            "and load the merged checkpoint instead"
        )
    return config, weights_path


def lora_deltas(adapter_dir: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face weight name, float64 update `scale * B @ A`) for each adapted layer."""
    adapter_dir = Path(adapter_dir).expanduser()
    config, weights_path = _adapter_files(adapter_dir)
    rank, alpha = config["r"], config.get("lora_alpha", config["r"])
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    try:
        tensors = load_file(weights_path)
    except SafetensorError as error:
        raise ValueError(f"{weights_path} cannot be read ({error}); save it again") from error
    for name_a in sorted(n for n in tensors if n.endswith(".lora_A.weight")):
        name_b = name_a.replace(".lora_A.", ".lora_B.")
        if name_b not in tensors:
            raise ValueError(f"{weights_path}: {name_a} has no matching {name_b}")
        lora_a, lora_b = tensors[name_a].double(), tensors[name_b].double()  # (r, in), (out, r)
        base_name = name_a.removeprefix(_PEFT_PREFIX).replace(".lora_A.weight", ".weight")
        yield base_name, scale * (lora_b @ lora_a)  # (out, in)


def apply_delta(name: str, weight: torch.Tensor, delta: torch.Tensor) -> None:
    """weight += delta in place, after checking the shapes agree."""
    if weight.shape != delta.shape:
        raise ValueError(
            f"the adapter's update for {name} has shape {tuple(delta.shape)} but the base weight "
            f"has {tuple(weight.shape)}: the adapter was trained on another base model"
        )
    weight.add_(delta.to(weight.device, weight.dtype))


def merge_adapter_into_checkpoint(
    base_dir: str | os.PathLike, adapter_dir: str | os.PathLike, output: str | os.PathLike
) -> Path:
    """A copy of the single-file checkpoint `base_dir` with the adapter merged, in `output`."""
    base_dir, output = Path(base_dir), Path(output)
    state = load_file(base_dir / "model.safetensors")
    for name, delta in lora_deltas(adapter_dir):
        if name not in state:
            raise ValueError(f"the adapter updates {name}, which {base_dir} does not have")
        apply_delta(name, state[name], delta)
    staging = output.with_name(output.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(base_dir, staging, ignore=shutil.ignore_patterns("*.safetensors"))
    save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt"})
    if output.exists():
        shutil.rmtree(output)
    staging.rename(output)
    return output
