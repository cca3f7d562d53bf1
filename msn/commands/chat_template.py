"""The --chat / --raw flags shared by `msn generate` and `msn bench`.

Prompts go through the tokenizer's chat template when it has one, since instruct models (the
default model among them) answer plain text poorly; `--raw` sends the text as it is, and
`--chat` insists on the template.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_arguments(parser: argparse.ArgumentParser, raw_help: str) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--chat",
        action="store_true",
        help="apply the tokenizer's chat template (the default when it has one; an error if not)",
    )
    group.add_argument("--raw", action="store_true", help=raw_help)


def use_chat_template(args: argparse.Namespace, tokenizer: Any, model_path: str) -> bool:
    """Whether prompts go through the chat template; --chat without one is a clear error."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if args.chat and not has_template:
        raise ValueError(
            f"the tokenizer of {model_path} has no chat template, so --chat cannot format the "
            "prompt; drop --chat to send the raw text, or add a chat_template to its "
            "tokenizer_config.json (or chat_template.jinja)."
        )
    return args.chat or (not args.raw and has_template)
