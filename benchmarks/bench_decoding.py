"""Host overhead of the decoders: their own time per step with a model whose forward is free.

The stub returns preallocated logits, so what is timed is tree building, n-gram retrieval,
verification of a small vocabulary, the Jacobi update and bookkeeping. Target: under 1 ms per
step in paper mode on a CPU.

    python benchmarks/bench_decoding.py            # table of ms/step per tree
    pytest benchmarks/bench_decoding.py --benchmark-enable
"""

from __future__ import annotations

import argparse
import os
import time
from types import SimpleNamespace

import torch

import msn
from msn.tree import TreeSpec, chain_tree, paper_tree

VOCAB = 1024


class ZeroCostModel:
    """A stand-in model: fixed random logits, no cache, nothing computed."""

    def __init__(self, vocab_size: int = VOCAB, max_seq_len: int = 1 << 16, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.logits = torch.randn(1, 128, vocab_size, generator=generator)
        self.config = SimpleNamespace(vocab_size=vocab_size, eos_token_ids=())
        self.device = torch.device("cpu")
        self.max_seq_len = max_seq_len

    def setup_cache(self, batch_size: int = 1, max_seq_len: int | None = None) -> None:
        pass

    def __call__(
        self, tokens, positions=None, cache_lens=None, tree_mask=None, last_only=False,
        max_cache_len=None,
    ):  # fmt: skip
        return self.logits[:, -1:] if last_only else self.logits[:, : tokens.shape[1]]

    def compact_cache(self, cache_lens, accepted_nodes) -> None:
        pass


def host_ms_per_step(tree: TreeSpec | None, new_tokens: int = 400, prompt_len: int = 512) -> float:
    """Decode-loop milliseconds per step (prefill excluded) with the zero-cost model."""
    prompt = torch.randint(0, VOCAB, (1, prompt_len), generator=torch.Generator().manual_seed(1))
    method = "greedy" if tree is None else "tr-jacobi"
    result = msn.generate(
        ZeroCostModel(), prompt, new_tokens, method=method, tree=tree, eos_token_id=[]
    )
    return 1e3 * result.decode_seconds / result.steps


TREES = {
    "paper (69 nodes)": paper_tree(),
    "paper, no retrieval (64)": paper_tree(retrieval=False),
    "chain of 5 (jacobi)": chain_tree(5),
    "greedy (no tree)": None,
}


def test_host_overhead_paper_mode(benchmark, monkeypatch):
    # CPU users get the PyTorch references; the Triton interpreter would time numpy instead.
    monkeypatch.setenv("MSN_KERNELS", "torch")
    benchmark.pedantic(host_ms_per_step, args=(paper_tree(), 100), rounds=3, iterations=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("MSN_KERNELS", "torch")
    print(f"| tree | host ms/step (median of {args.repeats}) |\n|---|---|")
    for name, tree in TREES.items():
        times = sorted(host_ms_per_step(tree, args.new_tokens) for _ in range(args.repeats))
        print(f"| {name} | {times[len(times) // 2]:.3f} |")
    started = time.perf_counter()
    host_ms_per_step(paper_tree(), args.new_tokens)
    print(f"\n(one paper-mode run of {args.new_tokens} tokens: "
          f"{time.perf_counter() - started:.2f} s)")  # fmt: skip


if __name__ == "__main__":
    main()
