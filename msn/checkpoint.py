"""Load Hugging Face safetensors checkpoints into the slim model, and their tokenizers.

Only safetensors are read (pickle files can run code) and no remote code is trusted.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import replace
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch
from safetensors import SafetensorError, safe_open

from msn.adapter import apply_delta, lora_deltas
from msn.config import ModelConfig, token_ids
from msn.gguf import gguf_checkpoint, is_gguf
from msn.model import Transformer

HUB_FILE_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer*",
    "special_tokens_map.json",
    "chat_template.jinja",
]
DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "double": torch.float64,
}

# Hugging Face tensor name -> msn parameter name. Per-layer entries use {i}.
_LAYER_TENSORS = [
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "self_attn.q_proj.bias",
    "self_attn.k_proj.bias",
    "self_attn.v_proj.bias",
    "self_attn.o_proj.bias",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
    "mlp.gate_proj.bias",
    "mlp.up_proj.bias",
    "mlp.down_proj.bias",
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
]
WEIGHT_MAP = {
    "model.embed_tokens.weight": "embed_tokens.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
    **{f"model.layers.{{i}}.{name}": f"layers.{{i}}.{name}" for name in _LAYER_TENSORS},
}
# Buffers some exporters include; they are recomputed, never loaded.
IGNORED_TENSORS = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def hf_to_msn_name(hf_name: str) -> str | None:
    """The msn parameter name for a Hugging Face tensor name, or None if it has none."""
    match = _LAYER_NAME.match(hf_name)
    if match:
        index, rest = match.groups()
        target = WEIGHT_MAP.get(f"model.layers.{{i}}.{rest}")
        return None if target is None else target.replace("{i}", index)
    return WEIGHT_MAP.get(hf_name)


def msn_to_hf_name(msn_name: str) -> str:
    return msn_name if msn_name == "lm_head.weight" else f"model.{msn_name}"


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A local checkpoint directory; a hub id is downloaded (config, tokenizer, safetensors).

    A Llama-architecture `.gguf` file is converted once and its cached directory returned.
    """
    if not str(path).strip():
        raise ValueError(
            "the model path is empty; pass a checkpoint directory, a .gguf file or a hub id."
        )
    local = Path(path).expanduser()
    if is_gguf(local) and local.is_file():
        return gguf_checkpoint(local)
    if local.is_dir():
        return local
    if local.exists():
        raise ValueError(f"{local} is a file; pass the checkpoint directory that contains it.")
    name = str(path)
    looks_local = Path(name.split("/")[0]).exists() or name.startswith((".", "/", "~"))
    if looks_local or not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        raise FileNotFoundError(
            f"no checkpoint directory at {local}; pass a local Hugging Face checkpoint directory "
            "(config.json plus model*.safetensors) or a hub id such as "
            "'DecoderImmortal/Llama3-8B-MSN'."
        )
    return _download_from_hub(name)


def _download_from_hub(repo_id: str) -> Path:
    how_to = (
        f"download it where the hub is reachable, for example\n"
        f"  hf download {repo_id} --local-dir ./{repo_id.split('/')[-1]} "
        f"--include {' '.join(repr(p) for p in HUB_FILE_PATTERNS)}\n"
        f"then pass that directory (config.json, model*.safetensors, tokenizer files) instead "
        f"of the hub id."
    )
    try:
        from huggingface_hub import snapshot_download
    except ImportError as error:
        raise FileNotFoundError(
            f"{repo_id!r} is not a local directory and huggingface_hub is not installed; {how_to}"
        ) from error
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILE_PATTERNS))
    except Exception as error:  # offline, unknown repo, gated access: all end the same way
        raise FileNotFoundError(
            f"{repo_id!r} is not a local directory, and could not be fetched as a hub id from "
            f"the Hugging Face hub ({type(error).__name__}: {error}); {how_to}"
        ) from error


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); re-download it.") from error
    if not isinstance(data, dict):
        raise ValueError(
            f"{path} must hold a JSON object, got a JSON {type(data).__name__}; re-download it."
        )
    return data


def load_config(checkpoint: Path) -> ModelConfig:
    """The model configuration, with EOS ids merged from generation_config.json."""
    config_path = checkpoint / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{checkpoint} has no config.json; a Hugging Face checkpoint directory holds "
            "config.json next to model.safetensors (or model-*.safetensors shards)."
        )
    config = ModelConfig.from_json(config_path)
    generation_path = checkpoint / "generation_config.json"
    if generation_path.is_file():
        generation = _read_json(generation_path)
        extra = token_ids(generation.get("eos_token_id"), f"{generation_path}: eos_token_id")
        merged = tuple(dict.fromkeys([*config.eos_token_ids, *extra]))
        config = replace(config, eos_token_ids=merged)
    return config


def safetensors_files(checkpoint: Path) -> dict[str, Path]:
    """Map each tensor name to the safetensors file holding it."""
    index_path = checkpoint / "model.safetensors.index.json"
    single = checkpoint / "model.safetensors"
    if index_path.is_file():
        weight_map = _read_json(index_path).get("weight_map", {})
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index_path}: weight_map must be a JSON object; re-download it.")
        files = {
            name: _shard_path(checkpoint, shard, index_path) for name, shard in weight_map.items()
        }
        missing = sorted({str(f.name) for f in files.values() if not f.is_file()})
        if missing:
            raise FileNotFoundError(
                f"{checkpoint}: shard(s) listed in model.safetensors.index.json are missing: "
                f"{', '.join(missing)}; download them into {checkpoint}."
            )
        for shard in dict.fromkeys(files.values()):
            with open_safetensors(shard):  # a truncated or corrupt shard is named up front
                pass
        return files
    if single.is_file():
        with open_safetensors(single) as handle:
            return {name: single for name in handle.keys()}  # noqa: SIM118
    if list(checkpoint.glob("pytorch_model*.bin")) or (checkpoint / "model.pt").exists():
        raise ValueError(
            f"{checkpoint} holds only PyTorch pickle weights (pytorch_model*.bin); msn reads "
            "safetensors only, since pickle files can run code. Convert once where you trust "
            "the file: LlamaForCausalLM.from_pretrained(dir).save_pretrained(dir, "
            "safe_serialization=True)."
        )
    raise FileNotFoundError(
        f"{checkpoint} has no model.safetensors nor model.safetensors.index.json with its "
        "model-*.safetensors shards."
    )


def _shard_path(checkpoint: Path, shard: object, index_path: Path) -> Path:
    """The file a shard name of the index points to; only files inside the checkpoint count."""
    if not isinstance(shard, str) or not shard.strip():
        raise ValueError(f"{index_path}: shard names must be file names, got {shard!r}.")
    relative = PurePosixPath(shard.replace("\\", "/"))
    if relative.is_absolute() or PureWindowsPath(shard).drive or ".." in relative.parts:
        raise ValueError(
            f"{index_path} names the shard {shard!r}, which lies outside {checkpoint}; an index "
            "may only name files inside its own directory. Re-download the checkpoint, or fix "
            "its model.safetensors.index.json."
        )
    return checkpoint / relative


def open_safetensors(file: Path, device: str = "cpu"):
    """`safe_open` a file; a truncated or corrupt one is a ValueError naming it."""
    try:
        return safe_open(file, framework="pt", device=device)
    except (SafetensorError, OSError) as error:
        raise ValueError(
            f"{file} is not a readable safetensors file ({error}); it is probably truncated or "
            "corrupt (an interrupted download or copy): download or save it again."
        ) from error


def load_model(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    max_seq_len: int | None = None,
    adapter: str | os.PathLike | None = None,
) -> Transformer:
    """Build the slim model for a checkpoint directory (or hub id) and load its weights.

    The model is built on the meta device and the loaded tensors are assigned to it, so the
    weights exist once in memory. `dtype` follows the checkpoint when None. `max_seq_len` is
    the longest sequence (prompt + output) to handle, the model's context by default; the KV
    cache is allocated on demand for what a call needs, up to it. `adapter` names a LoRA
    adapter directory (peft's format, as `msn train --lora-rank` writes it) merged on load.
    """
    _check_max_seq_len(max_seq_len)
    checkpoint = resolve_checkpoint(path)
    config = load_config(checkpoint)
    dtype = resolve_dtype(dtype, config)
    device = resolve_device(device)
    files = safetensors_files(checkpoint)

    with torch.device("meta"):
        model = Transformer(config)
    expected = {name: param.shape for name, param in model.named_parameters()}
    state, problems, seen = {}, [], set()
    handles = {}
    try:
        for hf_name, file in files.items():
            target = hf_to_msn_name(hf_name)
            if target == "lm_head.weight" and config.tie_word_embeddings:
                continue  # tied to the embeddings; some exporters store the copy anyway
            if target is None:
                if not IGNORED_TENSORS.fullmatch(hf_name):
                    problems.append(f"unexpected tensor {hf_name}")
                continue
            if target not in expected:
                problems.append(f"unexpected tensor {hf_name} (the config does not use it)")
                continue
            seen.add(target)
            if file not in handles:
                handles[file] = open_safetensors(file, device=str(device))
            try:
                tensor = handles[file].get_tensor(hf_name)
            except SafetensorError as error:
                problems.append(f"tensor {hf_name} cannot be read from {file.name}: {error}")
                continue
            if tuple(tensor.shape) != tuple(expected[target]):
                problems.append(
                    f"tensor {hf_name} has shape {tuple(tensor.shape)}, "
                    f"expected {tuple(expected[target])}"
                )
                continue
            state[target] = tensor.to(dtype)
    finally:
        handles.clear()
    problems += [f"missing tensor {msn_to_hf_name(name)}" for name in expected if name not in seen]
    if problems:
        raise ValueError(
            f"{checkpoint} does not match its config.json ({len(problems)} problem(s)):\n  "
            + "\n  ".join(problems)
        )
    model.load_state_dict(state, strict=False, assign=True)
    if adapter is not None:
        merge_adapter(model, adapter)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.eval().requires_grad_(False)
    model.max_seq_len = max_seq_len or config.max_position_embeddings
    return model


@torch.no_grad()
def merge_adapter(model: Transformer, adapter: str | os.PathLike) -> None:
    """Fold a LoRA adapter into the model's weights, in place."""
    for hf_name, delta in lora_deltas(adapter):
        target = hf_to_msn_name(hf_name)
        if target is None:
            raise ValueError(f"the adapter at {adapter} updates {hf_name}, which msn does not load")
        apply_delta(hf_name, model.get_parameter(target), delta)


def resolve_device(device: str | torch.device) -> torch.device:
    try:
        device = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"unknown device {device!r}: {error}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {str(device)!r} asked for, but this PyTorch build sees no CUDA GPU; use "
            "device 'cpu' (--device cpu) or install a CUDA build of PyTorch."
        )
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(
            f"device {str(device)!r} asked for, but this machine has "
            f"{torch.cuda.device_count()} CUDA GPU(s), numbered from 0."
        )
    mps = device.type == "mps" and torch.backends.mps.is_available()
    if device.type not in ("cpu", "cuda") and not mps:
        raise ValueError(
            f"device {str(device)!r} is not available: msn runs on 'cpu' and 'cuda' (and 'mps' "
            "where this PyTorch build supports it); use --device cpu or a CUDA GPU."
        )
    return device


def _check_max_seq_len(max_seq_len: int | None) -> None:
    if max_seq_len is None:
        return
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 1:
        raise ValueError(
            f"max_seq_len must be a positive number of positions (or None for the model's "
            f"context), got {max_seq_len!r}."
        )


def resolve_dtype(dtype: torch.dtype | str | None, config: ModelConfig) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(
                f"unsupported dtype {dtype}; msn computes in floating point: use one of "
                "torch.float32, torch.float16, torch.bfloat16 or torch.float64."
            )
        return dtype
    name = dtype if dtype is not None else (config.torch_dtype or "float32")
    name = str(name).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; use one of {sorted(set(DTYPES))}.")
    return DTYPES[name]


def load_tokenizer(path: str | os.PathLike):
    """The checkpoint's `transformers` tokenizer (never with remote code)."""
    from transformers import AutoTokenizer

    checkpoint = resolve_checkpoint(path)
    if (checkpoint / "config.json").is_file():
        load_config(checkpoint)  # a broken config is named as such, not blamed on the tokenizer
    try:
        return AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"{checkpoint}: no usable tokenizer ({error}); the directory needs the tokenizer "
            "files saved by tokenizer.save_pretrained (tokenizer.json, tokenizer_config.json)."
        ) from error
