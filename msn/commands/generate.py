"""`msn generate`: stream a completion, then report tokens per step and tokens per second."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from msn.commands import chat_template, sampling
from msn.decoding import METHODS, generate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", help="checkpoint directory, .gguf file or hub id (default: the default model)"
    )
    parser.add_argument("--prompt", required=True, help="the prompt text ('-' reads stdin)")
    chat_template.add_arguments(parser, raw_help="send the prompt text as it is")
    parser.add_argument("--method", choices=METHODS, default="tr-jacobi")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument(
        "--tree",
        default=None,
        help="tr-jacobi tree: auto (default: chosen per step for this machine), paper, chain:N, "
        "comb:W1,W2,...[+rN]",
    )
    parser.add_argument("--no-retrieval", action="store_true", help="tr-jacobi without n-grams")
    parser.add_argument("--compare", action="store_true", help="also run greedy and compare")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of results")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype",
        default=None,
        help="bfloat16, float16, float32, float64 (default: the checkpoint's on a GPU, "
        "float32 on the CPU)",
    )
    sampling.add_arguments(parser)  # --do-sample --temperature --top-k --top-p --seed


def check_method_options(args: argparse.Namespace) -> None:
    """Options that only tr-jacobi reads are refused with the other methods, not ignored."""
    if args.method != "tr-jacobi":
        given = [
            flag
            for flag, value in (("--tree", args.tree), ("--no-retrieval", args.no_retrieval))
            if value
        ]
        if given:
            raise ValueError(
                f"{' and '.join(given)} only apply to --method tr-jacobi, not {args.method} "
                "(jacobi always decodes one chain of guesses, greedy one token per step)."
            )
    if args.model is not None and not args.model.strip():
        raise ValueError(
            "--model is empty; pass a checkpoint directory or hub id, or leave "
            "--model out for the default model."
        )


def describe_tree(tree: dict) -> str:
    """One line: which tree decoded (nodes, depth) and its step time."""
    text = f"tree {tree['tree']}: {tree['mean_nodes']:g} nodes"
    if tree["tree"] == "auto":
        text = f"tree auto: {tree['mean_nodes']:g} nodes on average"
        text += f" (mean depth {tree.get('mean_depth', 0):g})"
    text += f", max depth {tree['max_depth']}"
    if tree.get("predicted_step_ms") is not None:
        text += f", predicted step {tree['predicted_step_ms']:.1f} ms"
    if tree.get("measured_step_ms") is not None:
        text += f", measured step {tree['measured_step_ms']:.1f} ms"
    return text


def encode_prompt(tokenizer, text: str, chat: bool) -> list[int]:
    if not chat:
        return tokenizer(text)["input_ids"]
    messages = [{"role": "user", "content": text}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


class _Streamer:
    """Prints text as chunks are accepted; skips the prompt (transformers streamer protocol)."""

    def __init__(self, tokenizer, out):
        self.tokenizer, self.out = tokenizer, out
        self.tokens: list[int] = []
        self.printed = 0
        self.seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        self.tokens += value.flatten().tolist()
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        # Hold back an incomplete multi-byte character until its bytes arrive.
        if not text.endswith("\ufffd"):
            self.out.write(text[self.printed :])
            self.out.flush()
            self.printed = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        self.out.write(text[self.printed :] + "\n")
        self.out.flush()


def main(args: argparse.Namespace) -> int:
    from msn import default_model_path, load_model, load_tokenizer

    check_method_options(args)
    sample = sampling.options(args)
    path = args.model if args.model is not None else str(default_model_path())
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}.")
    tokenizer = load_tokenizer(path)
    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    prompt = encode_prompt(tokenizer, text, chat_template.use_chat_template(args, tokenizer, path))
    dtype = args.dtype or (None if args.device.startswith("cuda") else "float32")
    model = load_model(path, device=args.device, dtype=dtype)
    options = dict(method=args.method, **sample)
    if args.method == "tr-jacobi":
        tree = args.tree if args.tree is not None else "auto"
        options.update(tree=tree, retrieval=not args.no_retrieval)
    eos = sorted({*model.config.eos_token_ids, tokenizer.eos_token_id} - {None})

    result = generate(
        model, prompt, args.max_new_tokens, eos_token_id=eos,
        streamer=_Streamer(tokenizer, sys.stdout), **options,
    )  # fmt: skip
    summary = {
        "text": tokenizer.decode(result.output_ids[0, len(prompt) :], skip_special_tokens=True),
        "method": args.method,
        "new_tokens": result.new_tokens,
        "steps": result.steps,
        "tokens_per_step": round(result.tokens_per_step, 4),
        "tokens_per_second": round(result.tokens_per_second, 2),
        "stop_reason": result.stop_reason,
        "tree": result.tree,
        "sampling": sampling.describe(sample),
        "seed": sample["seed"],
    }
    print(
        f"[{args.method}] {result.new_tokens} new tokens in {result.steps} steps: "
        f"{result.tokens_per_step:.2f} tokens/step, {result.tokens_per_second:.1f} tokens/s"
    )
    if result.tree is not None:
        print(f"[{args.method}] {describe_tree(result.tree)}")
    if sample.get("do_sample"):
        print(f"[{args.method}] sampling: {sampling.describe(sample)}")
    if args.compare:
        # Sampling: plain sampling with the same seed draws the same tokens.
        greedy = generate(
            model, prompt, args.max_new_tokens, method="greedy", eos_token_id=eos, **sample
        )
        identical = torch.equal(greedy.output_ids, result.output_ids)
        speedup = result.tokens_per_second / max(greedy.tokens_per_second, 1e-9)
        summary.update(
            greedy_tokens_per_second=round(greedy.tokens_per_second, 2),
            speedup=round(speedup, 3),
            identical=identical,
        )
        print(
            f"[greedy] {greedy.tokens_per_second:.1f} tokens/s; speed-up {speedup:.2f}x; "
            f"outputs {'identical' if identical else 'DIFFER'}"
        )
    if args.json:
        print(json.dumps(summary))
    return 0
