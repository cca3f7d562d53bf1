"""Drafts for a tree step: Jacobi candidates with their confidence, and the retrieval chain.

- Jacobi candidates: after a step, the nodes below the chosen one held guesses for the tokens
  after the bonus token. Their logits (computed from a context holding a wrong guess, which is
  what MSN training makes the model robust to) give, per depth, the top-k next guesses and the
  probability the model gave each: that probability is the slot's confidence next step.
- Retrieval: the n-gram draft of ``msn.retrieval.NgramIndex`` and the length of the suffix
  match behind it, the chain's confidence.
- Output memory: the model's own earlier outputs (earlier generate calls in this process),
  as an n-gram table, like lookahead decoding's n-gram pool. A chat model says "Here is a"
  and "I hope this helps" again and again; the continuation it wrote after the same 2-3
  tokens last time is a good guess. Only tree decoding feeds it (never plain greedy), so a
  benchmark's greedy run of a prompt cannot hand its answer to the next method.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from msn.autotree import Draft
from msn.retrieval import NgramIndex

RETRIEVAL_NGRAM = 4  # longer matches than paper mode's 3: a stronger confidence signal


def candidate_rows(logits: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """Top-``width`` tokens and their probabilities for each row of ``logits`` (n, V)."""
    probs = logits.float().softmax(dim=-1)
    top = probs.topk(width, dim=-1)
    return top.indices, top.values  # (n, width) each


class OutputMemory:
    """N-grams (2 to 3 tokens) of earlier outputs, each mapped to its latest continuation."""

    def __init__(self, min_ngram: int = 2, max_ngram: int = 3, capacity: int = 1_000_000):
        self.min_ngram, self.max_ngram, self.capacity = min_ngram, max_ngram, capacity
        self.tokens: list[int] = []
        self.latest: dict[tuple[int, ...], int] = {}  # n-gram -> end position (inclusive)
        self.segment_start = 0
        self.enabled = True

    def clear(self) -> None:
        """Forget every stored output (a benchmark pass must not recall an earlier pass's
        answers to the very same prompts)."""
        self.tokens, self.latest, self.segment_start = [], {}, 0

    def begin(self) -> None:
        """A new output: n-grams and drafts never span two outputs (a -1 separates them)."""
        if self.tokens and self.tokens[-1] != -1:
            self.tokens.append(-1)
        self.segment_start = len(self.tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        if not self.enabled or len(self.tokens) >= self.capacity:
            return
        for token in tokens:
            self.tokens.append(int(token))
            end = len(self.tokens) - 1
            for n in range(self.min_ngram, self.max_ngram + 1):
                if end - n + 1 >= self.segment_start:
                    self.latest[tuple(self.tokens[end - n + 1 : end + 1])] = end

    def lookup(self, context: Sequence[int], draft_len: int) -> tuple[list[int], int]:
        """What followed the longest suffix of ``context`` in earlier outputs, and its length."""
        if not self.enabled:
            return [], 0
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            if len(context) < n:
                continue
            end = self.latest.get(tuple(context[-n:]))
            if end is not None:
                draft = self.tokens[end + 1 : end + 1 + draft_len]
                if -1 in draft:
                    draft = draft[: draft.index(-1)]
                if draft:
                    return draft, n
        return [], 0


_MEMORIES: dict[str, OutputMemory] = {}


def output_memory(model) -> OutputMemory:
    """This process's output memory for ``model`` (keyed by its weights)."""
    from msn.acceptance import model_fingerprint

    return _MEMORIES.setdefault(model_fingerprint(model), OutputMemory())


class Drafts:
    """Jacobi candidate rows, an incremental n-gram index over the context, output memory."""

    def __init__(
        self,
        context: list[int],
        retrieval_depth: int,
        retrieval: bool = True,
        memory: OutputMemory | None = None,
    ):
        self.rows: list[list[tuple[int, float]]] = []
        self.streak = 0
        self.context = context
        self.depth = retrieval_depth
        self.index = NgramIndex(RETRIEVAL_NGRAM, retrieval_depth) if retrieval else None
        if self.index is not None:
            self.index.extend(context)
        self.memory = memory if retrieval else None
        if self.memory is not None:
            self.memory.begin()

    def extend(self, tokens: Sequence[int]) -> None:
        if self.index is not None:
            self.index.extend(tokens)
        if self.memory is not None:
            self.memory.extend(tokens)

    def set_rows(self, tokens: Sequence[int], probs: Sequence[float], width: int) -> None:
        """Next step's candidates from flat (depth-major) token and probability lists."""
        self.rows = [
            list(zip(tokens[i : i + width], probs[i : i + width], strict=True))
            for i in range(0, len(tokens), width)
        ]

    def clear_rows(self) -> None:
        self.rows = []

    def draft(self) -> Draft:
        chains = [(c, n, "R") for c, n in self.index.matches()] if self.index is not None else []
        if self.memory is not None:
            recalled, n = self.memory.lookup(self.context, self.depth)
            if recalled and all(recalled != c for c, _, _ in chains):
                chains.append((recalled, n, "H"))
        return Draft(rows=self.rows, chains=chains, streak=self.streak)
