"""`msn convert IN.gguf OUT_DIR`: a Llama-architecture GGUF file as a Hugging Face checkpoint."""

from __future__ import annotations

import argparse

from msn.gguf import convert_gguf


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("gguf", help="a Llama-architecture .gguf file")
    parser.add_argument("output", help="directory for config.json, model.safetensors, tokenizer")


def main(args: argparse.Namespace) -> int:
    output = convert_gguf(args.gguf, args.output)
    print(f"wrote {output} (float32 safetensors, tokenizer and chat template)")
    return 0
