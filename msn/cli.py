"""The `msn` command line: info, generate, bench and train.

Each subcommand lives in its own module, which provides `add_arguments(parser)` and
`main(args) -> int`; they are imported only when their command runs, so `msn info` does not
pay for the training stack.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "info": ("msn.commands.info", "Describe a checkpoint: architecture, parameters, memory."),
    "generate": ("msn.commands.generate", "Generate text with greedy, Jacobi or TR-Jacobi."),
    "bench": ("msn.bench", "Benchmark decoders on a Spec-Bench style prompt set."),
    "train": ("msn.train", "Fine-tune a model with MSN noise."),
    "convert": ("msn.commands.convert", "Convert a Llama GGUF file to a safetensors checkpoint."),
}


def build_parser(with_command_arguments: str | None = None) -> argparse.ArgumentParser:
    """The parser; the named command's module adds its own arguments (imported on demand)."""
    parser = argparse.ArgumentParser(prog="msn", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == with_command_arguments:
            importlib.import_module(module_name).add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((arg for arg in argv if arg in COMMANDS), None)
    args = build_parser(command).parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.main(args) or 0)
    except (FileNotFoundError, ValueError) as error:
        # User errors (a bad path, an unsupported checkpoint, a prompt too long) end with
        # their message, not a traceback.
        print(f"msn {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"msn {args.command}: interrupted", file=sys.stderr)
        return 130
