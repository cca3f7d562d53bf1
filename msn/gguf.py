"""GGUF import: a Llama-architecture `.gguf` file becomes a normal Hugging Face checkpoint.

transformers' own reader does the work (dequantisation, undoing llama.cpp's Q/K permutation,
the tokenizer and its chat template); this module checks the architecture, writes the result
as safetensors and caches it under `$MSN_CACHE` (default `~/.cache/msn`), keyed by the file's
path, size and modification time, so that a changed file is converted again and a second load
takes seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

from msn.cache import msn_cache_dir

SUPPORTED_ARCHITECTURES = ("llama",)


def is_gguf(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(".gguf")


def gguf_architecture(gguf_file: Path) -> str:
    """`general.architecture` from the file's metadata (memory-mapped, no tensor is read)."""
    try:
        from gguf import GGUFReader
    except ImportError as error:
        raise ValueError(f"reading {gguf_file} needs the gguf package: pip install gguf") from error
    try:
        field = GGUFReader(gguf_file).fields["general.architecture"]
    except KeyError as error:
        raise ValueError(f"{gguf_file} has no general.architecture in its metadata") from error
    except Exception as error:  # a truncated or foreign file: the reader raises many kinds
        raise ValueError(
            f"{gguf_file} is not a readable GGUF file ({type(error).__name__}: {error})"
        ) from error
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def _cache_key(gguf_file: Path) -> str:
    stat = gguf_file.stat()
    source = f"{gguf_file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def convert_gguf(gguf_file: str | os.PathLike, output: str | os.PathLike) -> Path:
    """Write `gguf_file` as a Hugging Face checkpoint directory (float32 safetensors).

    The weights are dequantised to float32, exactly the values the quantised file encodes.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    gguf_file = Path(gguf_file).expanduser()
    if not gguf_file.is_file():
        raise FileNotFoundError(f"no GGUF file at {gguf_file}")
    architecture = gguf_architecture(gguf_file)
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{gguf_file} holds a {architecture!r} model; msn supports Llama-architecture GGUF "
            "files (general.architecture 'llama': Llama, SmolLM, DeepSeek-Coder and the like)"
        )
    output = Path(output).expanduser()
    folder, name = str(gguf_file.parent), gguf_file.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    model = LlamaForCausalLM.from_pretrained(
        folder, gguf_file=name, config=config, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    # Written next to the target, then renamed: an interrupted conversion leaves no half
    # checkpoint behind that a later load would trust.
    staging = output.with_name(output.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    # transformers refuses save_pretrained on a model read from GGUF (it counts as quantised),
    # but its weights are plain float32 tensors by now: write them and a clean config.
    staging.mkdir(parents=True)
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # the embeddings hold it, as in HF's own checkpoints
    state = {key: tensor.contiguous() for key, tensor in state.items()}
    save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt"})
    config_dict = config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict["torch_dtype"] = "float32"
    (staging / "config.json").write_text(json.dumps(config_dict, indent=2) + "\n")
    model.generation_config.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / "msn_source.json").write_text(
        json.dumps({"gguf": str(gguf_file.resolve()), "size": gguf_file.stat().st_size}) + "\n"
    )
    if output.exists():
        shutil.rmtree(output)
    staging.rename(output)
    return output


def gguf_checkpoint(gguf_file: str | os.PathLike) -> Path:
    """The cached checkpoint directory converted from `gguf_file`, converting on first use."""
    gguf_file = Path(gguf_file).expanduser()
    if not gguf_file.is_file():
        raise FileNotFoundError(f"no GGUF file at {gguf_file}")
    target = msn_cache_dir() / "gguf" / f"{gguf_file.stem}-{_cache_key(gguf_file)}"
    if not (target / "config.json").is_file():
        print(f"msn: converting {gguf_file.name} to safetensors in {target}", file=sys.stderr)
        convert_gguf(gguf_file, target)
    return target
