"""Drafts for a tree step: Jacobi candidates with their confidence, and the retrieval chain.

- Jacobi candidates: after a step, the nodes below the chosen one held guesses for the tokens
  after the bonus token. Their logits (computed from a context holding a wrong guess, which is
  what MSN training makes the model robust to) give, per depth, the top-k next guesses and the
  probability the model gave each: that probability is the slot's confidence next step.
- Retrieval: the n-gram draft of ``msn.retrieval.NgramIndex`` and the length of the suffix
  match behind it, the chain's confidence.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from msn.autotree import Draft
from msn.retrieval import NgramIndex

RETRIEVAL_NGRAM = 3


def candidate_rows(logits: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """Top-``width`` tokens and their probabilities for each row of ``logits`` (n, V)."""
    probs = logits.float().softmax(dim=-1)
    top = probs.topk(width, dim=-1)
    return top.indices, top.values  # (n, width) each


class Drafts:
    """Jacobi candidate rows plus an incremental n-gram index over the context."""

    def __init__(self, context: Sequence[int], retrieval_depth: int, retrieval: bool = True):
        self.rows: list[list[tuple[int, float]]] = []
        self.index = NgramIndex(RETRIEVAL_NGRAM, retrieval_depth) if retrieval else None
        if self.index is not None:
            self.index.extend(context)

    def extend(self, tokens: Sequence[int]) -> None:
        if self.index is not None:
            self.index.extend(tokens)

    def set_rows(self, tokens: Sequence[int], probs: Sequence[float], width: int) -> None:
        """Next step's candidates from flat (depth-major) token and probability lists."""
        self.rows = [
            list(zip(tokens[i : i + width], probs[i : i + width], strict=True))
            for i in range(0, len(tokens), width)
        ]

    def clear_rows(self) -> None:
        self.rows = []

    def draft(self) -> Draft:
        chains = self.index.matches() if self.index is not None else []
        return Draft(rows=self.rows, chains=chains)
