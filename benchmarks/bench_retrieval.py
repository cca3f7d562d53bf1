"""Retrieval cost per decoding step as the context grows: incremental index vs rescan.

One step appends a few accepted tokens and asks for a draft. The index's cost should be the
same at 1k and 16k tokens of context; the brute-force rescan grows with the context.
Run with ``pytest benchmarks/bench_retrieval.py --benchmark-enable``; nothing is asserted
about time, compare the rows of the table.
"""

import random

import pytest

from msn.retrieval import NgramIndex, brute_force_lookup

TOKENS_PER_STEP = 3


def random_context(size: int, seed: int = 0) -> list[int]:
    """Text-like token stream: a small vocabulary, so n-grams repeat."""
    rng = random.Random(seed)
    return [rng.randrange(500) for _ in range(size)]


@pytest.mark.parametrize("context_len", [1024, 16384])
def test_index_step(benchmark, context_len):
    context = random_context(context_len + 100_000)
    index = NgramIndex(max_ngram=3, draft_len=5)
    index.extend(context[:context_len])
    steps = iter(range(context_len, len(context), TOKENS_PER_STEP))

    def step() -> list[int]:
        start = next(steps)
        index.extend(context[start : start + TOKENS_PER_STEP])
        return index.lookup()

    benchmark.pedantic(step, rounds=2000, iterations=1, warmup_rounds=10)


@pytest.mark.parametrize("context_len", [1024, 16384])
def test_brute_force_step(benchmark, context_len):
    context = random_context(context_len)
    benchmark(brute_force_lookup, context, 3, 5)
