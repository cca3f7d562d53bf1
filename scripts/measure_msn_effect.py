"""Measure the MSN effect: the same model fine-tuned with and without noise, side by side.

For each model: held-out loss (clean response tokens), then tokens per decoding step of each
decoder on the same held-out prompts, with retrieval switched off where it would hide the
effect of training. Writes `msn_effect.md`, `msn_effect.json` and `msn_effect.png`.

    python scripts/build_default_model.py --workdir W --output runs/noise
    python scripts/build_default_model.py --workdir W --output runs/plain --no-noise
    python scripts/measure_msn_effect.py --model noise=runs/noise --model plain=runs/plain \
        --prompts W/heldout.jsonl --eval W/heldout-eval.jsonl --output benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import msn
from msn.data import IGNORE_INDEX, load_examples, read_jsonl, tokenize_example
from msn.tree import comb_tree, paper_tree

DECODERS = {
    "greedy": dict(method="greedy"),
    "chain Jacobi (5 deep)": dict(method="jacobi"),
    "Jacobi, top-10 first level": dict(method="tr-jacobi", tree=comb_tree([10, 1, 1, 1, 1])),
    "paper tree, no retrieval": dict(method="tr-jacobi", tree=paper_tree(retrieval=False)),
    "paper tree (TR-Jacobi)": dict(method="tr-jacobi", tree=paper_tree()),
}


def held_out_loss(model, tokenizer, path: str, max_length: int) -> float:
    """Mean cross-entropy per response token over the held-out examples, clean inputs."""
    total, count = 0.0, 0
    for example in load_examples(path, tokenizer, max_length=max_length):
        ids = torch.tensor([example.input_ids])
        labels = torch.tensor(example.labels[1:])
        logits = model(ids)[0, :-1].float()
        keep = labels != IGNORE_INDEX
        total += float(F.cross_entropy(logits[keep], labels[keep], reduction="sum"))
        count += int(keep.sum())
    return total / max(count, 1)


def prompts_from(path: str, tokenizer, count: int, prompt_tokens: int) -> list[list[int]]:
    """`count` evenly spaced held-out prompts, each cut to its last `prompt_tokens` tokens."""
    records = read_jsonl(path)
    stride = max(len(records) // count, 1)
    chosen = records[::stride][:count]
    return [tokenize_example(r, tokenizer)[0][-prompt_tokens:] for r in chosen]


def measure(model, prompts, max_new_tokens: int) -> dict[str, dict[str, float]]:
    rows = {}
    for name, options in DECODERS.items():
        new_tokens = steps = 0
        seconds = 0.0
        for prompt in prompts:
            result = msn.generate(model, prompt, max_new_tokens, eos_token_id=[], **options)
            new_tokens += result.new_tokens
            steps += result.steps
            seconds += result.decode_seconds
        # The first token comes from the prefill; tokens per step counts decoding steps only.
        per_step = (new_tokens - len(prompts)) / steps
        rows[name] = {"tokens_per_step": per_step, "tokens_per_second": new_tokens / seconds}
    return rows


def write_report(results: dict, output: Path, settings: dict) -> str:
    """Markdown table: a column per model, then each model's ratio to the last (the baseline)."""
    names = list(results)
    baseline, others = names[-1], names[:-1]
    header = ["", *names, *(f"{n} / {baseline}" for n in others)]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    loss = {n: results[n]["held_out_loss"] for n in names}
    cells = [f"{loss[n]:.3f}" for n in names] + [f"{loss[n] / loss[baseline]:.3f}" for n in others]
    lines.append("| held-out loss | " + " | ".join(cells) + " |")
    for decoder in DECODERS:
        per_step = {n: results[n]["decoders"][decoder]["tokens_per_step"] for n in names}
        cells = [f"{per_step[n]:.3f} (+{per_step[n] - 1:.3f})" for n in names]
        cells += [f"{per_step[n] / per_step[baseline]:.3f}" for n in others]
        lines.append(f"| {decoder}: tokens/step (extra) | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    (output / "msn_effect.md").write_text(
        f"{table}\n\nSettings: {json.dumps(settings)}\n", encoding="utf-8"
    )
    (output / "msn_effect.json").write_text(json.dumps({"settings": settings, **results}, indent=2))
    plot(results, output / "msn_effect.png")
    return table


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    decoders = [d for d in DECODERS if d != "greedy"]
    width = 0.8 / len(results)
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, (name, result) in enumerate(results.items()):
        values = [result["decoders"][d]["tokens_per_step"] - 1 for d in decoders]
        positions = [x + i * width for x in range(len(decoders))]
        label = f"{name} (held-out loss {result['held_out_loss']:.2f})"
        ax.bar(positions, values, width, label=label)
    ax.set_xticks([x + width * (len(results) - 1) / 2 for x in range(len(decoders))])
    ax.set_xticklabels([d.replace(", ", ",\n").replace(" (", "\n(") for d in decoders], fontsize=8)
    ax.set_ylabel("extra tokens per step (tokens/step - 1)")
    ax.set_title("MSN effect: the same model fine-tuned with and without noise")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, help="NAME=DIR, repeatable")
    parser.add_argument("--prompts", required=True, help="held-out prompt/response JSONL")
    parser.add_argument("--eval", required=True, help="held-out JSONL for the loss")
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--output", default="benchmarks/results")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("MSN_KERNELS", "torch")
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)

    results = {}
    started = time.perf_counter()
    for spec in tqdm(args.model, desc="models"):
        name, _, path = spec.partition("=")
        if not path:
            raise SystemExit(f"--model takes NAME=DIR, got {spec!r}")
        model = msn.load_model(path, dtype=torch.float32)
        tokenizer = msn.load_tokenizer(path)
        prompts = prompts_from(args.prompts, tokenizer, args.num_prompts, args.prompt_tokens)
        with torch.no_grad():
            loss = held_out_loss(model, tokenizer, args.eval, args.max_length)
            decoders = measure(model, prompts, args.max_new_tokens)
        results[name] = {"path": path, "held_out_loss": loss, "decoders": decoders}
    settings = {k: v for k, v in vars(args).items() if k not in ("output",)}
    settings["seconds"] = round(time.perf_counter() - started, 1)
    print(write_report(results, output, settings))


if __name__ == "__main__":
    main()
