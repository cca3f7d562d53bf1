"""`msn info PATH`: what a checkpoint holds, read from its config and safetensors headers."""

from __future__ import annotations

import argparse
import json
from collections import Counter

from safetensors import safe_open

from msn.checkpoint import load_config, resolve_checkpoint, safetensors_files

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="checkpoint directory (or hub id)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def describe(path: str) -> dict:
    checkpoint = resolve_checkpoint(path)
    config = load_config(checkpoint)
    files = safetensors_files(checkpoint)
    parameters, weight_bytes, dtypes = 0, 0, Counter()
    by_file: dict = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        with safe_open(file, framework="pt") as handle:
            for name in names:
                tensor = handle.get_slice(name)
                count = 1
                for size in tensor.get_shape():
                    count *= size
                dtype = tensor.get_dtype()
                parameters += count
                weight_bytes += count * DTYPE_BYTES.get(dtype, 4)
                dtypes[dtype] += count
    main_dtype = dtypes.most_common(1)[0][0] if dtypes else "none"
    rope = config.rope
    return {
        "path": str(checkpoint),
        "architecture": "LlamaForCausalLM",
        "layers": config.num_layers,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "attention_heads": config.num_heads,
        "kv_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "vocab_size": config.vocab_size,
        "context": config.max_position_embeddings,
        "rope": f"theta={rope.theta:g}, type={rope.type}"
        + (f", factor={rope.factor:g}" if rope.type != "default" else ""),
        "tied_embeddings": config.tie_word_embeddings,
        "eos_token_ids": list(config.eos_token_ids),
        "parameters": parameters,
        "dtype": main_dtype,
        "weight_bytes": weight_bytes,
        "kv_cache_bytes_per_token": config.kv_cache_bytes_per_token(DTYPE_BYTES.get(main_dtype, 4)),
        "safetensors_files": len(by_file),
    }


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    raise AssertionError("unreachable")


def main(args: argparse.Namespace) -> int:
    info = describe(args.path)
    if args.json:
        print(json.dumps(info))
        return 0
    width = max(map(len, info))
    for key, value in info.items():
        if key in ("weight_bytes", "kv_cache_bytes_per_token"):
            value = f"{value:,} ({human_bytes(value)})"
        elif key == "parameters":
            value = f"{value:,} ({value / 1e6:.2f} M)"
        print(f"{key.replace('_', ' '):<{width}}  {value}")
    return 0
