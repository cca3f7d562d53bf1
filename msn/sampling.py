"""Lossless sampling for every decoder: Gumbel-max draws keyed by position.

Plain ancestral sampling draws token ``x[n + 1]`` from ``softmax(f(logits(x[:n + 1])))``, where
``f`` is the filter (transformers' semantics: temperature, then top-k, then top-p). By the
Gumbel-max trick that draw is ``argmax(f(logits) + G[n])``, with ``G[n]`` a vector of
independent standard Gumbel variables. Here ``G[n]`` depends only on the seed and on ``n``, the
position of the token whose logits are read, never on the tree:

- a tree node at position ``p + d`` draws with ``G[p + d]``, and a draft node is accepted when
  its token equals the draw at its parent, which is ``greedy_verify`` on the perturbed logits
  ``f(logits) + G`` (the same kernel serves greedy decoding and sampling);
- so the emitted tokens are always those of the ancestral rule
  ``x[n + 1] = argmax(f(logits(x[:n + 1])) + G[n])``, whatever tree was built and whichever
  drafts were accepted. ``G[n]`` is independent of ``x[:n + 1]`` (a function of ``G[:n]``), so
  the output has exactly the distribution of plain sampling, for every method; and with the same
  seed every method emits the same tokens (in exact arithmetic: in floating point a tree pass
  and a one-token pass can differ in the last bits, which flips a draw only at a near-tie).

The noise is drawn on the logits' device from a generator reseeded per position (a counter-based
stream), so it never goes through the host.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class SamplingConfig:
    """Transformers' sampling filters: temperature, then top-k (0: off), then top-p (1: off)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        t, k, p = self.temperature, self.top_k, self.top_p
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not t > 0:
            hint = " (for greedy decoding, leave do_sample=False)" if t == 0 else ""
            raise ValueError(f"temperature must be a number > 0, got {t!r}{hint}.")
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 turns it off), got {k!r}.")
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 <= p <= 1:
            raise ValueError(f"top_p must be a number in [0, 1] (1 turns it off), got {p!r}.")


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Filters and noise run in float64 for float64 logits, in float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def filter_logits(logits: Tensor, config: SamplingConfig) -> Tensor:
    """Scores ``[..., V]`` after temperature, top-k and top-p; filtered tokens get -inf.

    The same operations as transformers' ``TemperatureLogitsWarper``, ``TopKLogitsWarper`` and
    ``TopPLogitsWarper`` (ties with the k-th score are kept; top-p keeps at least one token).
    """
    scores = logits.to(work_dtype(logits.dtype))
    if config.temperature != 1.0:
        scores = scores / config.temperature
    if config.top_k:
        kth = scores.topk(min(config.top_k, scores.shape[-1]), dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if config.top_p < 1.0:
        ascending, order = scores.sort(dim=-1)
        remove = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - config.top_p
        remove[..., -1:] = False
        scores = scores.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return scores


def probabilities(logits: Tensor, config: SamplingConfig) -> Tensor:
    """The distribution plain sampling draws from: softmax of the filtered scores."""
    return filter_logits(logits, config).softmax(dim=-1)


def resolve_seed(seed: int | None) -> int:
    """``seed``, or for None one drawn from torch's global generator (``torch.manual_seed``)."""
    if seed is None:
        return int(torch.randint(0, 2**62, ()).item())
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be an int or None, got {seed!r}.")
    return int(seed)


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def position_seed(seed: int, position: int) -> int:
    """The generator seed of one position's noise (63 bits, distinct streams per seed)."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ position) >> 1


class Sampler:
    """Gumbel-max draws with noise ``G[position]`` fixed by the seed; see the module doc."""

    def __init__(self, config: SamplingConfig, seed: int, device: torch.device | str):
        self.config = config
        self.seed = seed
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        self._rows: dict[int, Tensor] = {}  # position -> noise row (V,), from the oldest live

    def settings(self) -> dict:
        """The filters and the seed: what reproduces a run."""
        return {**dataclasses.asdict(self.config), "seed": self.seed}

    def noise(self, position: int, count: int, vocab_size: int, dtype: torch.dtype) -> Tensor:
        """Gumbel noise of positions ``position .. position + count - 1``: ``(count, V)``.

        Rows are kept while a later call may read them again (a tree step draws rows ahead of
        the accepted length); rows before ``position`` are dropped.
        """
        for old in [p for p in self._rows if p < position]:
            del self._rows[old]
        rows = []
        for p in range(position, position + count):
            row = self._rows.get(p)
            if row is None or row.dtype != dtype or row.shape[0] != vocab_size:
                self.generator.manual_seed(position_seed(self.seed, p))
                u = torch.rand(
                    vocab_size, generator=self.generator, device=self.device, dtype=dtype
                )
                u = u.clamp_(min=torch.finfo(dtype).tiny)  # rand may return 0
                row = self._rows[p] = -torch.log(-torch.log(u))  # standard Gumbel
            rows.append(row)
        return torch.stack(rows)

    def perturb(
        self, logits: Tensor, position: int, depths: Tensor | None = None, max_depth: int = 0
    ) -> Tensor:
        """Perturbed scores ``f(logits) + G``: their argmax at a node is that node's draw.

        ``logits``: ``[B, T, V]`` (one sequence's nodes, ``B == 1``); node t sits at
        ``position + depths[t]`` (``depths`` on the logits' device, at most ``max_depth``), or at
        ``position + t`` when ``depths`` is None (a causal run of tokens).
        """
        vocab = logits.shape[-1]
        dtype = work_dtype(logits.dtype)
        if depths is None:
            noise = self.noise(position, logits.shape[-2], vocab, dtype)  # (T, V)
        else:
            rows = self.noise(position, max_depth + 1, vocab, dtype)  # (max_depth + 1, V)
            noise = rows.index_select(0, depths)  # (T, V)
        return filter_logits(logits, self.config) + noise

    def draw(self, logits: Tensor, position: int) -> int:
        """The sampled token after one node: ``logits`` ``[V]`` read at ``position``."""
        return int(self.perturb(logits[None, None], position)[0, 0].argmax())


def make_sampler(
    do_sample: bool,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int | None,
    device: torch.device | str,
) -> Sampler | None:
    """A ``Sampler`` for ``do_sample=True`` (options checked first), else None (greedy)."""
    if not isinstance(do_sample, bool):
        raise ValueError(f"do_sample must be True or False, got {do_sample!r}.")
    if not do_sample:
        return None  # greedy: like transformers, the sampling options are not read
    return Sampler(SamplingConfig(temperature, top_k, top_p), resolve_seed(seed), device)
