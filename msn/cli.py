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
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="msn", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(module_name=module_name)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    # Parse the command name first, then let its module add its own arguments.
    known, _ = parser.parse_known_args(argv[:1])
    module = importlib.import_module(known.module_name)
    sub = build_parser()
    command_parser = sub._subparsers._group_actions[0].choices[known.command]
    module.add_arguments(command_parser)
    args = sub.parse_args(argv)
    return int(module.main(args) or 0)
