"""N-gram retrieval for paper mode, as an incremental index.

Paper mode's retrieval draft: take the longest suffix of the context (prompt + output) of up
to ``max_ngram`` tokens that occurred earlier in the context, and propose the (up to)
``draft_len`` tokens that followed its **most recent** earlier occurrence. The continuation
may run into the suffix itself and up to the end of the context, which is what makes it
useful on repetitive text (``a b a b a`` -> ``b a``).

The reference code rescans the whole context every step; ``NgramIndex`` instead keeps, for
each n, a dict from n-gram to the end position of its latest occurrence, updated as tokens
are appended (O(max_ngram^2) per token, independent of the context length), and remembers
for the current suffixes where they occurred before. ``brute_force_lookup`` is the plain
rescan, kept as the reference the index is tested against.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch


class NgramIndex:
    """Incremental longest-suffix n-gram matcher over a growing token context."""

    def __init__(self, max_ngram: int = 3, draft_len: int = 5) -> None:
        if max_ngram < 1:
            raise ValueError(f"max_ngram must be >= 1, got {max_ngram}")
        if draft_len < 1:
            raise ValueError(f"draft_len must be >= 1, got {draft_len}")
        self.max_ngram = max_ngram
        self.draft_len = draft_len
        self._tokens: list[int] = []
        # _last[n - 1]: n-gram -> end position (inclusive) of its latest occurrence so far.
        self._last: list[dict[tuple[int, ...], int]] = [{} for _ in range(max_ngram)]
        # _earlier[n - 1]: end position of the latest occurrence of the current n-token suffix
        # before the suffix itself, or -1.
        self._earlier = [-1] * max_ngram

    def __len__(self) -> int:
        return len(self._tokens)

    @property
    def tokens(self) -> Sequence[int]:
        """The context so far (a copy)."""
        return tuple(self._tokens)

    def extend(self, tokens: Iterable[int] | torch.Tensor) -> None:
        """Append tokens to the context (a 1-D tensor or an iterable of ints)."""
        if isinstance(tokens, torch.Tensor):
            if tokens.dim() != 1:
                shape = tuple(tokens.shape)
                raise ValueError(f"expected a 1-D tensor of tokens, got shape {shape}")
            tokens = tokens.tolist()
        context = self._tokens
        for token in tokens:
            context.append(int(token))
            end = len(context) - 1
            for n in range(1, min(self.max_ngram, end + 1) + 1):
                gram = tuple(context[end - n + 1 :])
                table = self._last[n - 1]
                self._earlier[n - 1] = table.get(gram, -1)
                table[gram] = end
            # Suffixes longer than the context have no earlier occurrence.
            for n in range(end + 2, self.max_ngram + 1):
                self._earlier[n - 1] = -1

    def lookup(self, draft_len: int | None = None) -> list[int]:
        """Up to ``draft_len`` tokens that followed the longest earlier-matching suffix."""
        return self.match(draft_len)[0]

    def match(self, draft_len: int | None = None) -> tuple[list[int], int]:
        """The draft of ``lookup`` and the length of the suffix match behind it (0: none).

        The match length is the draft's confidence: a 3-token match predicts better than a
        1-token one.
        """
        draft_len = self.draft_len if draft_len is None else draft_len
        for n in range(self.max_ngram, 0, -1):
            end = self._earlier[n - 1]
            if end >= 0:
                return self._tokens[end + 1 : end + 1 + draft_len], n
        return [], 0

    def matches(self, draft_len: int | None = None) -> list[tuple[list[int], int]]:
        """One draft per suffix length that occurred before, longest match first.

        Shorter suffixes may have occurred more recently elsewhere and continue differently:
        each is an alternative chain (drafts repeating an earlier one are left out).
        """
        draft_len = self.draft_len if draft_len is None else draft_len
        found: list[tuple[list[int], int]] = []
        ends: set[int] = set()
        for n in range(self.max_ngram, 0, -1):
            end = self._earlier[n - 1]
            if end >= 0 and end not in ends:
                ends.add(end)
                draft = self._tokens[end + 1 : end + 1 + draft_len]
                if draft and all(draft != other for other, _ in found):
                    found.append((draft, n))
        return found


def brute_force_lookup(context: Sequence[int], max_ngram: int = 3, draft_len: int = 5) -> list[int]:
    """Reference for ``NgramIndex.lookup``: rescan the whole context, longest suffix first."""
    context = list(context)
    size = len(context)
    for n in range(min(max_ngram, size), 0, -1):
        suffix = context[size - n :]
        # Latest earlier occurrence: end positions size-2 down to n-1.
        for end in range(size - 2, n - 2, -1):
            if context[end - n + 1 : end + 1] == suffix:
                return context[end + 1 : end + 1 + draft_len]
    return []
