"""What the auto tree would pick on another machine, from this machine's real drafts.

    python benchmarks/auto_tree_shadow.py --model FILE.gguf --prompts 6 --max-new-tokens 64

Decodes bench prompts with tree="auto" here; at every step it also builds the tree that a
stated latency curve would choose from the same drafts and acceptance statistics (by default
a synthetic H100 + Llama3-8B curve: 20 ms flat up to 64 tokens, then +0.25 ms per token) and
reports both: mean nodes, depth, and expected tokens per step and per second.
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch

import msn
from msn.auto_decoder import AutoTreeDecoder
from msn.bench import default_questions_path, encode_prompt, load_questions
from msn.latency import LatencyProfile, latency_profile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--flat-ms", type=float, default=20.0)
    parser.add_argument("--flat-until", type=int, default=64)
    parser.add_argument("--ms-per-token-after", type=float, default=0.25)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    other = LatencyProfile.synthetic(
        args.flat_ms / 1e3, args.flat_until, args.ms_per_token_after / 1e3,
        sizes=(1, 2, 4, 8, 16, 32, 48, 64, 80, 96, 128),
        model="Llama3-8B (synthetic)", device="H100 (synthetic)", dtype="bfloat16",
    )  # fmt: skip
    model = msn.load_model(args.model, dtype=torch.float32)
    tokenizer = msn.load_tokenizer(args.model)
    here = latency_profile(model)
    picks: dict[str, list] = {"here": [], "other": []}
    original_step = AutoTreeDecoder.step

    def step(self):
        picks["other"].append(self.build(other))
        tree = self.build()
        picks["here"].append(tree)
        self.build = lambda profile=None: tree  # the step decodes the tree recorded above
        try:
            return original_step(self)
        finally:
            del self.build

    AutoTreeDecoder.step = step
    questions = load_questions(default_questions_path())
    stride = max(1, len(questions) // args.prompts)
    for question in questions[::stride][: args.prompts]:
        messages = [{"role": "user", "content": question.turns[0]}]
        prompt = encode_prompt(tokenizer, messages, True)
        msn.generate(model, prompt, args.max_new_tokens)
    for name, profile in (("here", here), ("other", other)):
        trees = picks[name]
        nodes = sum(t.num_nodes for t in trees) / len(trees)
        depth = sum(t.max_depth for t in trees) / len(trees)
        tokens = sum(t.expected_tokens for t in trees) / len(trees)
        speedup = sum(t.expected_rate * profile.step_time(1) for t in trees) / len(trees)
        common = Counter((t.num_nodes, t.max_depth) for t in trees).most_common(4)
        print(
            f"{name} ({profile.describe()}): {len(trees)} steps, mean nodes {nodes:.1f}, "
            f"mean depth {depth:.2f}, expected tokens/step {tokens:.2f}, expected speed-up "
            f"over T=1 {speedup:.2f}x; commonest (nodes, depth): {common}"
        )


if __name__ == "__main__":
    main()
