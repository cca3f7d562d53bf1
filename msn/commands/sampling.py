"""Sampling flags shared by `msn generate` and `msn bench`: --do-sample and its filters."""

from __future__ import annotations

import argparse
from typing import Any

from msn.sampling import SamplingConfig, resolve_seed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "sampling (lossless: every method has exactly plain sampling's distribution)"
    )
    group.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    group.add_argument("--temperature", type=float, default=1.0, help="default 1.0")
    group.add_argument("--top-k", type=int, default=0, help="default 0 (off)")
    group.add_argument("--top-p", type=float, default=1.0, help="default 1.0 (off)")
    group.add_argument(
        "--seed",
        type=int,
        default=None,
        help="fixes the draws (with --do-sample) and the tree's noise slots; default: a "
        "random seed, which is reported",
    )


def options(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of `msn.generate`: a resolved seed, and the filters when sampling.

    Filter flags without --do-sample are an error rather than silently greedy.
    """
    if not args.do_sample:
        given = [
            flag
            for flag, value, default in (
                ("--temperature", args.temperature, 1.0),
                ("--top-k", args.top_k, 0),
                ("--top-p", args.top_p, 1.0),
            )
            if value != default
        ]
        if given:
            raise ValueError(f"{', '.join(given)} only apply with --do-sample.")
        return {"seed": args.seed}
    SamplingConfig(args.temperature, args.top_k, args.top_p)  # refuse bad values up front
    return {
        "do_sample": True,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "seed": resolve_seed(args.seed),
    }


def describe(options: dict[str, Any], seed: bool = True) -> str:
    """One line for reports: the filters (and the seed), or 'greedy'."""
    if not options.get("do_sample"):
        return "greedy"
    text = (
        f"temperature {options['temperature']:g}, top-k {options['top_k']}, "
        f"top-p {options['top_p']:g}"
    )
    return text + f", seed {options['seed']}" if seed else text
