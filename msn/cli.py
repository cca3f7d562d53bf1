"""The `msn` command line: info, generate, bench and train.

Each subcommand lives in its own module, which provides `add_arguments(parser)` and
`main(args) -> int`; they are imported only when their command runs, so `msn info` does not
pay for the training stack.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS = {
    "info": ("msn.commands.info", "Describe a checkpoint: architecture, parameters, memory."),
    "generate": ("msn.commands.generate", "Generate text with greedy, Jacobi or TR-Jacobi."),
    "bench": ("msn.bench", "Benchmark decoders on a Spec-Bench style prompt set."),
    "tune": ("msn.commands.tune", "Measure the latency profile and acceptance statistics."),
    "train": ("msn.train", "Fine-tune a model with MSN noise."),
    "convert": ("msn.commands.convert", "Convert a Llama GGUF file to a safetensors checkpoint."),
}


# Commands that run a model take --threads.
THREADED = ("generate", "bench", "tune")


def default_threads() -> int:
    """Half the cores this process may use (at least 1, at most 8).

    Decoding a small batch is bound by memory bandwidth, which a few cores saturate; more
    threads mostly add OpenMP synchronisation, and on a shared machine they contend with
    other work (issue 9 measured the contention, not the method). The latency profile is
    measured per thread count, so tree="auto" adapts to whatever is chosen.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores // 2))


def build_parser(with_command_arguments: str | None = None) -> argparse.ArgumentParser:
    """The parser; the named command's module adds its own arguments (imported on demand)."""
    parser = argparse.ArgumentParser(prog="msn", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == with_command_arguments:
            importlib.import_module(module_name).add_arguments(sub)
        if name in THREADED:
            sub.add_argument(
                "--threads",
                type=int,
                default=None,
                help="CPU threads for torch (default: half the available cores, here "
                f"{default_threads()})",
            )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((arg for arg in argv if arg in COMMANDS), None)
    args = build_parser(command).parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    if args.command in THREADED:
        threads = args.threads if args.threads is not None else default_threads()
        if threads < 1:
            print(f"msn {args.command}: error: --threads must be >= 1", file=sys.stderr)
            return 2
        import torch

        torch.set_num_threads(threads)
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
