"""`msn tune`: measure this machine's latency profile and calibrate the acceptance statistics.

Prints the step time per tree size (and writes it as a PNG), caches it under `$MSN_CACHE`
for `tree="auto"`, then decodes a few prompts of the bench set with the auto tree to fill the
acceptance statistics per slot kind, which are cached too and printed.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="checkpoint directory, GGUF file or hub id (default model)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    parser.add_argument(
        "--dtype",
        default=None,
        help="model dtype (default: the checkpoint's on a GPU, float32 on CPU)",
    )
    parser.add_argument(
        "--output", type=Path, default=Path("msn-tune.png"), help="the curve's PNG (%(default)s)"
    )
    parser.add_argument(
        "--calibrate",
        type=int,
        default=4,
        metavar="N",
        help="prompts of the bench set to decode for acceptance statistics (0: skip; default 4)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=64, help="per calibration prompt")
    parser.add_argument(
        "--cached", action="store_true", help="show the cached profile instead of re-measuring"
    )


def main(args: argparse.Namespace) -> int:
    import torch

    import msn
    from msn.acceptance import AcceptanceStats, set_acceptance_stats
    from msn.latency import latency_profile, plot_profile, profile_path

    path = args.model or str(msn.default_model_path())
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or (None if device.startswith("cuda") else "float32")
    model = msn.load_model(path, device=device, dtype=dtype)
    profile = latency_profile(model, remeasure=not args.cached, verbose=True)
    print(f"latency profile: {profile.describe()}")
    print(profile.table())
    plot_profile(profile, args.output, title=f"{Path(str(path)).name}: {profile.describe()}")
    print(f"cached: {profile_path(model)}\nplot: {args.output}")
    if args.calibrate > 0:
        from msn.bench import default_questions_path, encode_prompt, load_questions

        tokenizer = msn.load_tokenizer(path)
        chat = bool(getattr(tokenizer, "chat_template", None))
        stats = AcceptanceStats(meta={"model": str(path), "prompts": args.calibrate})
        questions = load_questions(default_questions_path())
        step = max(1, len(questions) // args.calibrate)
        for question in questions[::step][: args.calibrate]:
            messages = [{"role": "user", "content": question.turns[0]}]
            prompt = encode_prompt(tokenizer, messages, chat)
            msn.generate(model, prompt, args.max_new_tokens, acceptance=stats, latency=profile)
        saved = set_acceptance_stats(model, stats)
        print(f"acceptance statistics ({stats.observations} slots tried): {saved}")
        print(stats.table(min_tried=3))
    return 0
