"""Acceptance statistics: how often each kind of tree slot is accepted given its parent was.

A slot's *kind* is what the decoder knows about it before the pass:
- a Jacobi slot: its depth, its rank among the candidates of that depth, and the probability
  the model gave the candidate on the previous step (binned) - its confidence;
- a retrieval slot: its depth on the chain and the length of the n-gram match that produced
  the draft (1-3) - the chain's confidence - and its source: the context ("R") or the
  model's earlier outputs ("H", see ``msn.drafts.OutputMemory``).

``AcceptanceStats`` keeps, per kind, how many slots were tried (their parent was accepted) and
how many of those were accepted, shrunk toward a prior so that rare kinds get sensible
estimates. ``msn tune`` fills it from a calibration run and caches it under
``$MSN_CACHE/acceptance`` for the model; every generate call then updates its copy online, so
the estimates follow the text being written (retrieval pays off in summaries, not in poems).
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import torch

from msn.cache import load_versioned_json, msn_cache_dir, write_json_atomically
from msn.interop import msn_view

# Upper edges of the confidence bins of Jacobi candidates (previous-step probability).
PROB_EDGES = (0.01, 0.03, 0.1, 0.2, 0.35, 0.5, 0.7, 0.85, 0.95)
PROB_MIDS = (0.005, 0.02, 0.06, 0.15, 0.27, 0.42, 0.6, 0.77, 0.9, 0.97)
MAX_DEPTH_KEY = 5
MAX_RANK_KEY = 3
MAX_MATCH_KEY = 4
PRIOR_WEIGHT = 4.0  # pseudo-observations behind the prior
WINDOW = 400.0  # counts are scaled down past this many tries: estimates follow the text
STATS_VERSION = 2

SlotKey = tuple  # ("J", depth, rank, bin) or ("R" | "H", depth, match_len, streak)


def prob_bin(prob: float) -> int:
    return bisect.bisect_left(PROB_EDGES, prob)


def jacobi_key(depth: int, rank: int, prob: float) -> SlotKey:
    return ("J", min(depth, MAX_DEPTH_KEY), min(rank, MAX_RANK_KEY), prob_bin(prob))


def retrieval_key(depth: int, match_len: int, source: str = "R", streak: int = 0) -> SlotKey:
    """A retrieval slot: ``source`` "R" (the context) or "H" (the output memory); ``streak``
    1 when the previous step accepted two tokens or more (text being copied tends to go on
    being copied)."""
    match = max(1, min(match_len, MAX_MATCH_KEY))
    return (source, min(depth, MAX_DEPTH_KEY), match, 1 if streak else 0)


def prior(key: SlotKey) -> float:
    """A prior acceptance rate before any observation.

    Jacobi: a fraction of the candidate's own probability (it was computed from a context that
    held a wrong guess). Retrieval: grows with the match length, and once the chain is on
    track (depth >= 2, parent accepted) it tends to stay on it.
    """
    if key[0] == "J":
        return 0.6 * PROB_MIDS[key[3]]
    depth, match, streak = key[1], key[2], key[3]
    base = {1: 0.12, 2: 0.3, 3: 0.45, 4: 0.55}[match] * (0.7 if key[0] == "H" else 1.0)
    return min(0.9, base + (0.3 if depth >= 2 else 0.0) + 0.1 * streak)


@dataclasses.dataclass
class AcceptanceStats:
    """Counts per slot kind: key -> [accepted, tried]; estimates shrunk toward ``prior``."""

    counts: dict[SlotKey, list[float]] = dataclasses.field(default_factory=dict)
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def estimate(self, key: SlotKey) -> float:
        accepted, tried = self.counts.get(key, (0.0, 0.0))
        return (accepted + PRIOR_WEIGHT * prior(key)) / (tried + PRIOR_WEIGHT)

    def record(self, key: SlotKey, accepted: bool) -> None:
        entry = self.counts.setdefault(key, [0.0, 0.0])
        entry[0] += float(accepted)
        entry[1] += 1.0
        if entry[1] > WINDOW:
            entry[0] *= 0.5
            entry[1] *= 0.5

    def merge(self, other: AcceptanceStats) -> None:
        for key, (accepted, tried) in other.counts.items():
            entry = self.counts.setdefault(key, [0.0, 0.0])
            entry[0] += accepted
            entry[1] += tried

    def copy(self) -> AcceptanceStats:
        # list(...) snapshots the items at once: another model over the same weights (another
        # lock, see msn.interop) may record into these statistics from another thread.
        items = list(self.counts.items())
        return AcceptanceStats({k: list(v) for k, v in items}, dict(self.meta))

    @property
    def observations(self) -> int:
        return int(sum(tried for _, tried in self.counts.values()))

    def table(self, min_tried: int = 1) -> str:
        """Observed rates per kind (depth x rank/confidence), as markdown."""
        lines = ["| slot | tried | accepted | rate | estimate |", "|---|---:|---:|---:|---:|"]
        for key in sorted(self.counts, key=lambda k: (k[0], *k[1:])):
            accepted, tried = self.counts[key]
            if tried < min_tried:
                continue
            lines.append(
                f"| {describe(key)} | {tried:.0f} | {accepted:.0f} | {accepted / tried:.2f} "
                f"| {self.estimate(key):.2f} |"
            )
        return "\n".join(lines)

    # -- persistence ---------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "version": STATS_VERSION,
            "meta": self.meta,
            "counts": {":".join(map(str, k)): v for k, v in self.counts.items()},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AcceptanceStats:
        counts = {}
        for text, value in data["counts"].items():
            kind, *rest = text.split(":")
            counts[(kind, *map(int, rest))] = [float(value[0]), float(value[1])]
        return cls(counts, dict(data.get("meta", {})))

    def save(self, path: Path) -> None:
        write_json_atomically(path, self.to_json(), indent=1)

    @classmethod
    def load(cls, path: Path) -> AcceptanceStats | None:
        return load_versioned_json(path, STATS_VERSION, cls.from_json)


def describe(key: SlotKey) -> str:
    if key[0] == "J":
        lo = 0.0 if key[3] == 0 else PROB_EDGES[key[3] - 1]
        hi = PROB_EDGES[key[3]] if key[3] < len(PROB_EDGES) else 1.0
        return f"jacobi depth {key[1]} rank {key[2]} p in [{lo:g}, {hi:g})"
    source = "retrieval" if key[0] == "R" else "output memory"
    return f"{source} depth {key[1]} match {key[2]}" + (" after a streak" if key[3] else "")


def model_fingerprint(model) -> str:
    """Identifies the weights (acceptance depends on them, unlike latency)."""
    model = msn_view(model)  # a transformers model: the fingerprint of its slim model
    config = model.config
    parts = [
        str(getattr(config, name, None))
        for name in ("vocab_size", "hidden_size", "num_layers", "intermediate_size")
    ]
    weight = model.embed_tokens.weight if hasattr(model, "embed_tokens") else None
    if weight is not None:
        with torch.no_grad():
            sample = weight[:: max(1, weight.shape[0] // 64), :16].double()
            parts.append(f"{float(sample.sum()):.10e}|{float(sample.abs().sum()):.10e}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def stats_path(model) -> Path:
    return msn_cache_dir() / "acceptance" / f"{model_fingerprint(model)}.json"


_MEMORY: dict[str, AcceptanceStats] = {}


def acceptance_stats(model) -> AcceptanceStats:
    """This process's running statistics for ``model``: the calibration cached by ``msn tune``
    (or the priors alone), updated online by every generate call."""
    key = model_fingerprint(model)
    stats = _MEMORY.get(key)
    if stats is None:
        stats = AcceptanceStats.load(stats_path(model)) or AcceptanceStats()
        _MEMORY[key] = stats
    return stats


def set_acceptance_stats(model, stats: AcceptanceStats, save: bool = True) -> Path | None:
    """Make ``stats`` the model's running statistics (and cache them on disk with ``save``)."""
    _MEMORY[model_fingerprint(model)] = stats
    if not save:
        return None
    path = stats_path(model)
    stats.save(path)
    return path
