"""Auto tree vs greedy vs transformers (greedy, prompt lookup), interleaved per prompt.

    python benchmarks/bench_auto_tree.py --model FILE.gguf --threads 1 --max-new-tokens 64

Runs every method on each turn of the bench prompts before moving on (load drifts on a shared
machine hit all methods alike), checks that every output equals msn greedy's, and prints per
category tokens/s and speed-ups plus the trees the auto decoder built.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import torch
from tqdm import tqdm

import msn
from msn.bench import default_questions_path, encode_prompt, load_questions

METHODS = ("greedy", "tr-jacobi", "hf-greedy", "hf-prompt-lookup")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--output")
    parser.add_argument("--every", type=int, default=1, help="every Nth question (3: one each)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from msn.baselines import generate_reference, load_reference
    from msn.latency import latency_profile

    model = msn.load_model(args.model, dtype=torch.float32)
    tokenizer = msn.load_tokenizer(args.model)
    reference = (
        load_reference(args.model) if any(m.startswith("hf-") for m in args.methods) else None
    )
    profile = latency_profile(model, verbose=True)
    print(profile.describe())
    print(profile.table())
    eos = sorted({*model.config.eos_token_ids, tokenizer.eos_token_id} - {None})

    def run(method, prompt):
        if method.startswith("hf-"):
            return generate_reference(reference, prompt, args.max_new_tokens, method, eos)
        start = time.perf_counter()
        result = msn.generate(model, prompt, args.max_new_tokens, method=method, eos_token_id=eos)
        result.wall = time.perf_counter() - start
        return result

    questions = load_questions(default_questions_path())[:: args.every]
    warm = encode_prompt(tokenizer, [{"role": "user", "content": "Hello!"}], True)
    for method in args.methods:
        run(method, warm)
    seconds, tokens = defaultdict(float), defaultdict(int)
    steps, accepted, mismatches, trees = defaultdict(int), defaultdict(int), [], []
    for question in tqdm(questions, desc="questions", unit="q"):
        messages = []
        for turn in question.turns:
            messages.append({"role": "user", "content": turn})
            prompt = encode_prompt(tokenizer, messages, True)
            outputs = {}
            for method in args.methods:
                result = run(method, prompt)
                wall = getattr(result, "wall", None) or result.total_seconds
                for key in (question.category, "overall"):
                    seconds[key, method] += wall
                    tokens[key, method] += result.new_tokens
                    steps[key, method] += result.steps
                    accepted[key, method] += sum(result.accept_lengths)
                outputs[method] = result.output_ids[0].tolist()
                if method == "tr-jacobi":
                    trees.append(result.tree)
            base = outputs[args.methods[0]]
            mismatches += [(question.question_id, m) for m, o in outputs.items() if o != base]
            text = tokenizer.decode(base[len(prompt) :], skip_special_tokens=True)
            messages.append({"role": "assistant", "content": text})
    categories = list(dict.fromkeys(q.category for q in questions)) + ["overall"]
    print(f"\nthreads {args.threads}, max new tokens {args.max_new_tokens}, {profile.describe()}")
    header = "| category | " + " | ".join(f"{m} tok/s" for m in args.methods)
    header += " | auto/greedy | auto/hf-greedy | auto/hf-lookup | auto tokens/step |"
    print(header)
    print("|---" * (len(args.methods) + 5) + "|")
    summary = {}
    for cat in categories:
        rate = {m: tokens[cat, m] / seconds[cat, m] for m in args.methods}
        ratio = [
            rate["tr-jacobi"] / rate[m] if m in rate and "tr-jacobi" in rate else float("nan")
            for m in ("greedy", "hf-greedy", "hf-prompt-lookup")
        ]
        tps = accepted[cat, "tr-jacobi"] / max(steps[cat, "tr-jacobi"], 1)
        cells = " | ".join(f"{rate[m]:.1f}" for m in args.methods)
        print(f"| {cat} | {cells} | " + " | ".join(f"{r:.2f}x" for r in ratio) + f" | {tps:.2f} |")
        summary[cat] = {"tokens_per_second": rate, "speedups": ratio, "auto_tokens_per_step": tps}
    nodes = sum(t["mean_nodes"] for t in trees) / len(trees)
    step_ms = sum(t["measured_step_ms"] or 0 for t in trees) / len(trees)
    pred_ms = sum(t.get("predicted_step_ms", 0) for t in trees) / len(trees)
    print(
        f"auto trees: mean nodes {nodes:.2f}, max depth {max(t['max_depth'] for t in trees)}, "
        f"predicted step {pred_ms:.1f} ms, measured {step_ms:.1f} ms"
    )
    print("outputs identical:", not mismatches, mismatches[:5])
    if args.output:
        with open(args.output, "w") as f:
            json.dump(
                {
                    "args": vars(args),
                    "profile": profile.to_json(),
                    "summary": summary,
                    "trees": trees,
                    "mismatches": mismatches,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
