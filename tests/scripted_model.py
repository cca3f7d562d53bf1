"""A stub model whose next token is a scripted function of its context, for exact step counts.

It keeps the tokens of its "KV cache" by slot, so tree passes, positions and cache compaction
are honoured exactly as a real model would need them: each node's context is the committed
prefix plus its tree ancestors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import SimpleNamespace

import torch

from msn.latency import LatencyProfile


class ScriptedModel:
    def __init__(
        self,
        rule: Callable[[Sequence[int]], int],
        vocab_size: int = 5000,
        max_seq_len: int = 1024,
        eos_token_ids: Sequence[int] = (),
    ):
        self.rule = rule
        self.config = SimpleNamespace(vocab_size=vocab_size, eos_token_ids=tuple(eos_token_ids))
        self.device = torch.device("cpu")
        self.max_seq_len = max_seq_len
        self.slots: list[int | None] = []
        self.forward_calls = 0
        # tree="auto" reads this instead of timing the model: steps cost the same up to 8
        # tokens, then grow (a stated curve; tests never depend on timings).
        self.latency_profile = LatencyProfile.synthetic(0.01, 8, 0.001)

    def setup_cache(self, batch_size: int = 1, max_seq_len: int | None = None) -> None:
        self.slots = [None] * (max_seq_len or self.max_seq_len)

    def logits_for(self, context: Sequence[int]) -> torch.Tensor:
        """The rule's token first, then ranks descending below it: target, target-1, ..."""
        target = self.rule(context)
        vocab = torch.arange(self.config.vocab_size)
        return -((target - vocab) % self.config.vocab_size).double()

    def __call__(
        self, tokens, positions=None, cache_lens=None, tree_mask=None, last_only=False,
        max_cache_len=None,
    ):  # fmt: skip
        self.forward_calls += 1
        row = tokens[0].tolist()
        if cache_lens is None:
            self.slots[: len(row)] = row
            contexts = [row[: i + 1] for i in range(len(row))]
        else:
            start = int(cache_lens[0])
            self.slots[start : start + len(row)] = row
            mask = tree_mask if tree_mask is not None else torch.ones(len(row), len(row)).tril()
            prefix = self.slots[:start]
            contexts = [
                prefix + [row[j] for j in mask[i].nonzero().flatten().tolist()]
                for i in range(len(row))
            ]
        logits = torch.stack([self.logits_for(c) for c in contexts])[None]
        return logits[:, -1:] if last_only else logits

    def compact_cache(self, cache_lens, accepted_nodes) -> None:
        start = int(cache_lens[0])
        nodes = [n for n in accepted_nodes[0].tolist() if n >= 0]
        moved = [self.slots[start + n] for n in nodes]
        self.slots[start : start + len(moved)] = moved


FIRST = 100  # token at position p is FIRST + p under the position rules
PROMPT = list(range(FIRST, FIRST + 8))


def by_position(context: Sequence[int]) -> int:
    """The next token depends on the position only: every Jacobi guess from the model is right."""
    return FIRST + len(context)


def lagging(context: Sequence[int]) -> int:
    """Right only when the token before the last one is right: guesses hold one token."""
    if len(context) < 2 or context[-2] == FIRST + len(context) - 2:
        return FIRST + len(context)
    return 4000 + len(context)


def increasing(context: Sequence[int]) -> int:
    """One more than the largest token so far: no guess from a wrong context can be right."""
    return max(context) + 1
