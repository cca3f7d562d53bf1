"""Token trees for TR-Jacobi decoding, as plain data.

A tree is built from Medusa-style *rank paths* plus an optional retrieval chain. The rank
path ``(a, b, c)`` is the node at depth 3 whose token is candidate ``c`` of depth 3, under the
node ``(a, b)`` at depth 2, under ``(a,)`` at depth 1. A node's token depends only on its depth
and rank, never on its parent (the Jacobi candidates of a depth are shared by all its nodes).
The retrieval chain is one node per depth, 1..``retrieval_depth``, hanging off the root; its
tokens are the n-gram retrieval draft (see ``msn.retrieval``).

Node order: node 0 is the root (the pending token); the others are sorted by depth, then
Jacobi nodes before the retrieval node of the same depth, then Jacobi nodes by rank path. So
``parents[i] < i`` for every ``i > 0`` (breadth-first order), as ``greedy_verify`` requires.

Packed mask layout: row ``i`` of the ancestor mask is stored as ``W = ceil(T / word_bits)``
little-endian words; node ``j`` is bit ``j % word_bits`` of word ``j // word_bits``. Words are
signed integers (int64 for 64-bit words, int32 for 32-bit words) holding the two's complement
of the unsigned bit pattern, so the top bit makes a word negative. A tree of up to 64 nodes
fits one int64 word per row; paper mode (69 nodes) needs two.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import cached_property

import torch

ROOT, JACOBI, RETRIEVAL = 0, 1, 2
"""Node kinds, as stored in ``TreeSpec.kinds``."""

MC_SIM_7B_63: tuple[tuple[int, ...], ...] = (
    (0,), (0, 0), (1,), (0, 1), (2,), (0, 0, 0), (1, 0), (0, 2), (3,), (0, 3), (4,), (0, 4),
    (2, 0), (0, 5), (0, 0, 1), (5,), (0, 6), (6,), (0, 7), (0, 1, 0), (1, 1), (7,), (0, 8),
    (0, 0, 2), (3, 0), (0, 9), (8,), (9,), (1, 0, 0), (0, 2, 0), (1, 2), (0, 0, 3), (4, 0),
    (2, 1), (0, 0, 4), (0, 0, 5), (0, 0, 0, 0), (0, 1, 1), (0, 0, 6), (0, 3, 0), (5, 0), (1, 3),
    (0, 0, 7), (0, 0, 8), (0, 0, 9), (6, 0), (0, 4, 0), (1, 4), (7, 0), (0, 1, 2), (2, 0, 0),
    (3, 1), (2, 2), (8, 0), (0, 5, 0), (1, 5), (1, 0, 1), (0, 2, 1), (9, 0), (0, 6, 0),
    (0, 0, 0, 1), (1, 6), (0, 7, 0),
)  # fmt: skip
"""Medusa's ``mc_sim_7b_63`` template: 63 Jacobi nodes over depths 1-4, top-10 per depth."""


@dataclasses.dataclass(frozen=True)
class TreeTensors:
    """A tree's tensors on one device (see ``TreeSpec`` for their meaning)."""

    parents: torch.Tensor  # (T,) int64
    depths: torch.Tensor  # (T,) int64
    ranks: torch.Tensor  # (T,) int64
    is_retrieval: torch.Tensor  # (T,) bool
    mask: torch.Tensor  # (T, T) bool
    mask_bits: torch.Tensor  # (T, ceil(T / 64)) int64
    paths: torch.Tensor  # (num_leaves, max_depth + 1) int64, -1 padded


@dataclasses.dataclass(frozen=True)
class TreeSpec:
    """A token tree: Jacobi rank paths plus an optional retrieval chain.

    Construct with ``TreeSpec(rank_paths, retrieval_depth)`` or ``TreeSpec.build``; the rank
    paths are validated and normalised (tuples, sorted by depth then path), so two specs of the
    same tree compare and hash equal. Per-node attributes are tuples indexed by node:

    - ``parents``: parent node, ``-1`` for the root;
    - ``depths``: 0 for the root;
    - ``ranks``: candidate rank of a Jacobi node at its depth; ``-1`` for the root and for
      retrieval nodes (whose token is entry ``depth - 1`` of the retrieval draft);
    - ``kinds``: ``ROOT``, ``JACOBI`` or ``RETRIEVAL``.
    """

    rank_paths: tuple[tuple[int, ...], ...]
    retrieval_depth: int = 0
    parents: tuple[int, ...] = dataclasses.field(init=False, repr=False, compare=False)
    depths: tuple[int, ...] = dataclasses.field(init=False, repr=False, compare=False)
    ranks: tuple[int, ...] = dataclasses.field(init=False, repr=False, compare=False)
    kinds: tuple[int, ...] = dataclasses.field(init=False, repr=False, compare=False)
    _device_cache: dict[str, TreeTensors] = dataclasses.field(
        init=False, repr=False, compare=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        paths = _validate_rank_paths(self.rank_paths)
        if isinstance(self.retrieval_depth, bool) or not isinstance(self.retrieval_depth, int):
            raise ValueError(f"retrieval_depth must be an int, got {self.retrieval_depth!r}")
        if self.retrieval_depth < 0:
            raise ValueError(f"retrieval_depth must be >= 0, got {self.retrieval_depth}")
        # Sort key: depth, Jacobi before retrieval, then the path itself.
        keys = [(len(p), JACOBI, p) for p in paths]
        keys += [(d, RETRIEVAL, (d,)) for d in range(1, self.retrieval_depth + 1)]
        keys.sort()
        index: dict[tuple[int, tuple[int, ...]], int] = {}
        parents, depths, ranks, kinds = [-1], [0], [-1], [ROOT]
        for node, (depth, kind, path) in enumerate(keys, start=1):
            index[kind, path] = node
            if kind == JACOBI:
                parents.append(index[JACOBI, path[:-1]] if depth > 1 else 0)
                ranks.append(path[-1])
            else:
                parents.append(index[RETRIEVAL, (depth - 1,)] if depth > 1 else 0)
                ranks.append(-1)
            depths.append(depth)
            kinds.append(kind)
        object.__setattr__(self, "rank_paths", tuple(p for _, kind, p in keys if kind == JACOBI))
        object.__setattr__(self, "parents", tuple(parents))
        object.__setattr__(self, "depths", tuple(depths))
        object.__setattr__(self, "ranks", tuple(ranks))
        object.__setattr__(self, "kinds", tuple(kinds))

    @classmethod
    def build(
        cls,
        rank_paths: Sequence[Sequence[int]],
        retrieval_depth: int = 0,
        max_depth: int | None = None,
    ) -> TreeSpec:
        """A tree from rank paths; ``max_depth`` (if given) rejects deeper paths or chains."""
        tree = cls(tuple(rank_paths), retrieval_depth)
        if max_depth is not None and tree.max_depth > max_depth:
            raise ValueError(
                f"tree is {tree.max_depth} deep (rank paths up to {tree.jacobi_depth}, retrieval "
                f"chain {tree.retrieval_depth}), more than max_depth={max_depth}"
            )
        return tree

    def without_retrieval(self) -> TreeSpec:
        """The same Jacobi tree with no retrieval chain."""
        return TreeSpec(self.rank_paths, 0)

    # -- sizes -------------------------------------------------------------------------------

    @property
    def num_nodes(self) -> int:
        """T: the root plus every Jacobi and retrieval node."""
        return len(self.parents)

    @property
    def jacobi_depth(self) -> int:
        """Depth of the deepest Jacobi node (0 when there is none)."""
        return max((len(p) for p in self.rank_paths), default=0)

    @property
    def max_depth(self) -> int:
        """Depth of the deepest node: the most draft tokens one step can accept."""
        return max(self.jacobi_depth, self.retrieval_depth)

    @cached_property
    def top_k(self) -> tuple[int, ...]:
        """Per depth 1..max_depth, the candidates needed there: max Jacobi rank + 1 (or 0)."""
        widths = [0] * self.max_depth
        for path in self.rank_paths:
            widths[len(path) - 1] = max(widths[len(path) - 1], path[-1] + 1)
        return tuple(widths)

    @property
    def max_top_k(self) -> int:
        """K: the most candidates any depth needs (how many to keep from each top-k)."""
        return max(self.top_k, default=0)

    @property
    def has_retrieval(self) -> bool:
        return self.retrieval_depth > 0

    @cached_property
    def retrieval_nodes(self) -> tuple[int, ...]:
        """Node indices of the retrieval chain, depth 1 first."""
        return tuple(i for i, kind in enumerate(self.kinds) if kind == RETRIEVAL)

    @cached_property
    def leaves(self) -> tuple[int, ...]:
        """Nodes without children, in node order."""
        has_child = set(self.parents)
        return tuple(i for i in range(self.num_nodes) if i not in has_child)

    # -- relations ---------------------------------------------------------------------------

    def ancestors(self, node: int) -> tuple[int, ...]:
        """The path from the root to ``node``, both included."""
        chain = [node]
        while self.parents[chain[-1]] >= 0:
            chain.append(self.parents[chain[-1]])
        return tuple(reversed(chain))

    @cached_property
    def mask(self) -> torch.Tensor:
        """Bool ``(T, T)``: ``mask[i, j]`` iff j is an ancestor of i or i itself (CPU)."""
        t = self.num_nodes
        mask = torch.zeros(t, t, dtype=torch.bool)
        for i in range(t):
            mask[i, list(self.ancestors(i))] = True
        return mask

    @cached_property
    def mask_bits(self) -> torch.Tensor:
        """The mask packed as int64 words, ``(T, ceil(T / 64))``; see the module docstring."""
        return pack_mask(self.mask, word_bits=64)

    @cached_property
    def paths(self) -> torch.Tensor:
        """Root-to-leaf node paths, ``(num_leaves, max_depth + 1)`` int64, -1 padded."""
        out = torch.full((len(self.leaves), self.max_depth + 1), -1, dtype=torch.long)
        for row, leaf in enumerate(self.leaves):
            chain = self.ancestors(leaf)
            out[row, : len(chain)] = torch.tensor(chain)
        return out

    # -- device tensors ----------------------------------------------------------------------

    def tensors_on(self, device: torch.device | str = "cpu") -> TreeTensors:
        """All the tree's tensors on ``device``, built once per device and cached."""
        key = str(torch.device(device))
        cached = self._device_cache.get(key)
        if cached is None:
            cached = TreeTensors(
                parents=torch.tensor(self.parents, dtype=torch.long, device=device),
                depths=torch.tensor(self.depths, dtype=torch.long, device=device),
                ranks=torch.tensor(self.ranks, dtype=torch.long, device=device),
                is_retrieval=torch.tensor(
                    [k == RETRIEVAL for k in self.kinds], dtype=torch.bool, device=device
                ),
                mask=self.mask.to(device),
                mask_bits=self.mask_bits.to(device),
                paths=self.paths.to(device),
            )
            self._device_cache[key] = cached
        return cached

    def mask_on(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The bool ancestor mask on ``device`` (cached)."""
        return self.tensors_on(device).mask


def _validate_rank_paths(rank_paths: Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    paths: list[tuple[int, ...]] = []
    for path in rank_paths:
        if isinstance(path, int | str) or not isinstance(path, Sequence):
            raise ValueError(f"each rank path must be a sequence of ints, got {path!r}")
        if len(path) == 0:
            raise ValueError("empty rank path: the root is implicit, list only nodes below it")
        for rank in path:
            if isinstance(rank, bool) or not isinstance(rank, int):
                raise ValueError(f"rank path {list(path)} holds a non-integer rank {rank!r}")
            if rank < 0:
                raise ValueError(f"rank path {list(path)} has a negative rank {rank}")
        paths.append(tuple(path))
    seen = set(paths)
    if len(seen) != len(paths):
        dupes = sorted({p for p in paths if paths.count(p) > 1})
        raise ValueError(f"duplicate rank paths: {[list(p) for p in dupes]}")
    for path in paths:
        if len(path) > 1 and path[:-1] not in seen:
            raise ValueError(
                f"rank path {list(path)} has no parent: add its prefix {list(path[:-1])}"
            )
    return paths


def pack_mask(mask: torch.Tensor, word_bits: int = 64) -> torch.Tensor:
    """Pack a bool ``(..., T)`` mask into ``(..., ceil(T / word_bits))`` signed words."""
    if word_bits not in (32, 64):
        raise ValueError(f"word_bits must be 32 or 64, got {word_bits}")
    t = mask.shape[-1]
    num_words = -(-t // word_bits)
    padded = torch.zeros(*mask.shape[:-1], num_words * word_bits, dtype=torch.long)
    padded[..., :t] = mask.to(device="cpu", dtype=torch.long)
    bits = padded.view(*mask.shape[:-1], num_words, word_bits)  # (..., W, word_bits)
    words = torch.zeros(bits.shape[:-1], dtype=torch.long)
    for b in range(word_bits):
        words |= bits[..., b] << b
    if word_bits == 32:
        words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.to(mask.device)


def unpack_mask(words: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """Inverse of ``pack_mask``: int32 or int64 words ``(..., W)`` to a bool ``(..., T)``."""
    word_bits = {torch.int32: 32, torch.int64: 64}.get(words.dtype)
    if word_bits is None:
        raise ValueError(f"packed mask words must be int32 or int64, got {words.dtype}")
    shifts = torch.arange(word_bits, dtype=words.dtype, device=words.device)
    bits = (words.unsqueeze(-1) >> shifts) & 1  # (..., W, word_bits)
    return bits.flatten(-2)[..., :num_nodes].bool()


# -- named configurations ---------------------------------------------------------------------


def paper_tree(retrieval: bool = True) -> TreeSpec:
    """Paper mode: ``mc_sim_7b_63`` (K = 10, depths 1-4) plus a retrieval chain of depth 5.

    69 nodes (1 root + 63 Jacobi + 5 retrieval), max depth 5.
    """
    return TreeSpec(MC_SIM_7B_63, retrieval_depth=5 if retrieval else 0)


def chain_tree(depth: int) -> TreeSpec:
    """Plain Jacobi decoding: one chain of rank-0 guesses, ``depth`` deep, no retrieval."""
    if depth < 1:
        raise ValueError(f"chain depth must be >= 1, got {depth}")
    return TreeSpec(tuple((0,) * d for d in range(1, depth + 1)))


def comb_tree(widths: Sequence[int], retrieval_depth: int = 0) -> TreeSpec:
    """Ranks ``0..widths[d-1]-1`` at each depth d, all hanging off the rank-0 chain.

    ``comb_tree([10, 1, 1, 1, 1])`` is "Jacobi with a top-10 first level", 5 deep;
    ``comb_tree([1] * n)`` equals ``chain_tree(n)``.
    """
    paths: list[tuple[int, ...]] = []
    for depth, width in enumerate(widths, start=1):
        if width < 1:
            raise ValueError(f"width at depth {depth} must be >= 1, got {width}")
        paths += [(0,) * (depth - 1) + (rank,) for rank in range(width)]
    return TreeSpec(tuple(paths), retrieval_depth)


def parse_tree(spec: str) -> TreeSpec:
    """A tree from a short name, as used on the command line.

    ``paper`` / ``paper-noretrieval``; ``chain:N``; ``comb:W1,W2,...`` with an optional
    ``+rN`` suffix for a retrieval chain of depth N (e.g. ``comb:10,1,1,1+r5``).
    """
    name, _, arg = spec.partition(":")
    try:
        if name == "paper" and not arg:
            return paper_tree()
        if name == "paper-noretrieval" and not arg:
            return paper_tree(retrieval=False)
        if name == "chain" and arg:
            return chain_tree(int(arg))
        if name == "comb" and arg:
            widths, _, retrieval = arg.partition("+r")
            return comb_tree([int(w) for w in widths.split(",")], int(retrieval or 0))
    except ValueError as err:
        raise ValueError(f"bad tree spec {spec!r}: {err}") from err
    raise ValueError(
        f"unknown tree spec {spec!r}: use paper, paper-noretrieval, chain:N or comb:W1,W2,...[+rN]"
    )
