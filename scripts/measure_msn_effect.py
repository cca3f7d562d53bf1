"""Measure the MSN effect: the base model, a plain LoRA fine-tune and the MSN LoRA fine-tune.

    python scripts/measure_msn_effect.py --base SmolLM2-135M-Instruct.Q4_1.gguf \
        --model plain=/tmp/msn-build/plain-lora --model msn=/tmp/msn-build/msn-lora \
        --heldout /tmp/msn-build/data/heldout.jsonl --output benchmarks/results

For each model, on the same held-out prompts and machine:
- held-out loss: mean cross-entropy of the self-distilled responses (clean inputs, float32);
- agreement: teacher-forced on the base model's own greedy answers (up to 64 tokens) to the
  held-out prompts, the share of positions where the model's argmax equals the base's token
  (how much the adapter changes what the model says; the base scores 1 by definition);
- tokens per decoding step of chain Jacobi, the Jacobi trees with retrieval off (where only
  training can help), and full TR-Jacobi, with the extra tokens per step (tokens/step - 1).
Writes `msn_effect.md`, `msn_effect.json` and `msn_effect.png` to --output.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import msn
from msn.data import IGNORE_INDEX, load_examples, read_jsonl, tokenize_example
from msn.tree import comb_tree, paper_tree

DECODERS = {
    "chain Jacobi (5 deep)": dict(method="jacobi"),
    "Jacobi, top-10 first level (comb:10,1,1,1,1)": dict(
        method="tr-jacobi", tree=comb_tree([10, 1, 1, 1, 1])
    ),
    "paper tree, no retrieval": dict(method="tr-jacobi", tree=paper_tree(retrieval=False)),
    "paper tree with retrieval (TR-Jacobi)": dict(method="tr-jacobi", tree=paper_tree()),
}


@torch.no_grad()
def held_out_loss(model, examples) -> float:
    """Mean cross-entropy per response token, clean inputs."""
    total, count = 0.0, 0
    for example in examples:
        logits = model(torch.tensor([example.input_ids]))[0, :-1].float()  # (T-1, V)
        labels = torch.tensor(example.labels[1:])
        keep = labels != IGNORE_INDEX
        total += float(F.cross_entropy(logits[keep], labels[keep], reduction="sum"))
        count += int(keep.sum())
    return total / max(count, 1)


@torch.no_grad()
def agreement(model, prompts: list[list[int]], answers: list[list[int]]) -> float:
    """Share of answer positions where the model's argmax is the base model's token."""
    same = total = 0
    for prompt, answer in zip(prompts, answers, strict=True):
        logits = model(torch.tensor([prompt + answer]))[0]  # (T, V)
        predicted = logits[len(prompt) - 1 : -1].argmax(-1)  # the argmax before each answer token
        same += int((predicted == torch.tensor(answer)).sum())
        total += len(answer)
    return same / total


def tokens_per_step(model, prompts: list[list[int]], max_new_tokens: int) -> dict:
    rows = {}
    for name, options in DECODERS.items():
        accepted, steps = 0, 0
        for prompt in prompts:
            result = msn.generate(model, prompt, max_new_tokens, **options)
            accepted += sum(result.accept_lengths)
            steps += result.steps
        rows[name] = accepted / max(steps, 1)
    return rows


def evenly_spaced(items: list, count: int) -> list:
    if count <= 0:
        return []
    stride = max(len(items) // count, 1)
    return items[::stride][:count]


def write_report(results: dict, output: Path, settings: dict) -> str:
    names = list(results)
    header = ["", *names]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    lines.append("| held-out loss | " + " | ".join(f"{results[n]['loss']:.4f}" for n in names))
    lines.append(
        "| agreement with the base's greedy answers | "
        + " | ".join(f"{100 * results[n]['agreement']:.1f}%" for n in names)
    )
    for decoder in DECODERS:
        cells = [results[n]["tokens_per_step"][decoder] for n in names]
        lines.append(
            f"| {decoder}: tokens/step (extra) | "
            + " | ".join(f"{c:.3f} (+{c - 1:.3f})" for c in cells)
        )
    lines = [line if line.endswith("|") else line + " |" for line in lines]
    table = "\n".join(lines)
    (output / "msn_effect.md").write_text(f"{table}\n\nSettings: {json.dumps(settings)}\n")
    (output / "msn_effect.json").write_text(
        json.dumps({"settings": settings, "models": results}, indent=2) + "\n"
    )
    plot(results, output / "msn_effect.png")
    return table


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    decoders = list(DECODERS)
    width = 0.8 / len(results)
    fig, ax = plt.subplots(figsize=(9, 4.2))
    for i, (name, result) in enumerate(results.items()):
        values = [result["tokens_per_step"][d] - 1 for d in decoders]
        positions = [x + i * width for x in range(len(decoders))]
        label = (
            f"{name} (held-out loss {result['loss']:.3f}, "
            f"agreement {100 * result['agreement']:.0f}%)"
        )
        ax.bar(positions, values, width, label=label)
    ax.set_xticks([x + width * (len(results) - 1) / 2 for x in range(len(decoders))])
    ax.set_xticklabels([d.replace(" (", "\n(").replace(", ", ",\n") for d in decoders], fontsize=8)
    ax.set_ylabel("extra tokens per step (tokens/step - 1)")
    ax.set_title("MSN effect on SmolLM2-135M-Instruct: base, plain LoRA, MSN LoRA")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="base checkpoint directory or .gguf")
    parser.add_argument("--model", action="append", default=[], help="NAME=ADAPTER_DIR")
    parser.add_argument("--heldout", required=True, help="held-out self-distilled JSONL")
    parser.add_argument(
        "--num-prompts", type=int, default=12, help="prompts for the decoders (0: skip them)"
    )
    parser.add_argument("--agreement-prompts", type=int, default=48)
    parser.add_argument(
        "--no-base", action="store_true", help="leave the base model out of the table"
    )
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--output", default="benchmarks/results")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("MSN_KERNELS", "torch")
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)

    tokenizer = msn.load_tokenizer(args.base)
    examples = load_examples(args.heldout, tokenizer, max_length=512)
    records = read_jsonl(args.heldout)
    prompts = [tokenize_example(r, tokenizer)[0] for r in records]
    decoder_prompts = evenly_spaced(prompts, args.num_prompts)
    prompts = evenly_spaced(prompts, args.agreement_prompts)

    models = {} if args.no_base else {"base": None}
    models |= dict(spec.split("=", 1) for spec in args.model)
    base = msn.load_model(args.base, dtype=torch.float32)
    answers = [
        msn.generate(base, p, args.max_new_tokens, method="greedy").output_ids[0, len(p) :]
        for p in tqdm(prompts, desc="base answers")
    ]
    answers = [a.tolist() for a in answers]

    results, started = {}, time.perf_counter()
    for name, adapter in tqdm(models.items(), desc="models"):
        model = msn.load_model(args.base, dtype=torch.float32, adapter=adapter)
        results[name] = {
            "adapter": adapter,
            "loss": held_out_loss(model, examples),
            "agreement": agreement(model, prompts, answers),
            "tokens_per_step": tokens_per_step(model, decoder_prompts, args.max_new_tokens)
            if decoder_prompts
            else dict.fromkeys(DECODERS, float("nan")),
        }
    settings = {
        **{k: v for k, v in vars(args).items() if k != "output"},
        "heldout_examples": len(examples),
        "seconds": round(time.perf_counter() - started, 1),
        "machine": f"{platform.machine()} CPU, {args.threads} thread(s), float32",
    }
    print(write_report(results, output, settings))


if __name__ == "__main__":
    main()
