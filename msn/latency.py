"""Latency profile: how long one decoding step takes for T tree tokens on this machine.

A tree step costs one forward pass over the T tree tokens plus verification, KV compaction and
the top-k that refills the Jacobi candidates. Its cost as a function of T is a property of the
model shape, the device, the dtype and the thread count, and it is far from linear: on a CPU
core a 135M model pays almost nothing for T = 2..3 and 1.5x for T = 4, while an H100 running an
8B model is flat up to about 64 tokens. ``msn.autotree`` divides expected accepted tokens by
this curve to pick the tree.

``LatencyProfile.measure`` times real steps (after warm-up) in a few seconds;
``latency_profile(model)`` caches the result under ``$MSN_CACHE/latency`` (default
``~/.cache/msn``), keyed by the model's shape, device, dtype, thread count and torch version, and
re-measures on demand (``remeasure=True``, or ``msn tune``).
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import hashlib
import json
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from msn.cache import load_versioned_json, msn_cache_dir, write_json_atomically
from msn.interop import exclusive, msn_view

DEFAULT_TOKENS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32, 48, 64)
DEFAULT_PREFIX = 256
LONG_PREFIX = 1024
PROFILE_VERSION = 3  # 3: the few-row linear kernel changed CPU step costs


@dataclasses.dataclass(frozen=True)
class LatencyProfile:
    """Step seconds at measured tree sizes, plus a per-prefix-token slope.

    ``step_time(T, prefix)`` interpolates linearly between measured sizes (and extrapolates
    the last segment's slope beyond them); the prefix term is ``prefix_slope * (prefix -
    prefix_tokens)``, the same for every T (attention over the prefix is a small part of a
    step at these sizes).
    """

    tokens: tuple[int, ...]
    seconds: tuple[float, ...]
    prefix_tokens: int = DEFAULT_PREFIX
    prefix_slope: float = 0.0  # seconds per extra prefix token
    meta: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.seconds) or not self.tokens:
            raise ValueError("a latency profile needs as many times as tree sizes, at least one")
        if list(self.tokens) != sorted(set(self.tokens)) or self.tokens[0] < 1:
            raise ValueError(f"tree sizes must be increasing and >= 1, got {self.tokens}")
        if any(not s > 0 for s in self.seconds):
            raise ValueError(f"step times must be positive, got {self.seconds}")

    @property
    def max_tokens(self) -> int:
        return self.tokens[-1]

    def step_time(self, num_tokens: int, prefix: int | None = None) -> float:
        """Predicted seconds of one step over ``num_tokens`` tree tokens after ``prefix``."""
        sizes, times = self.tokens, self.seconds
        i = bisect.bisect_left(sizes, num_tokens)
        if i < len(sizes) and sizes[i] == num_tokens:
            base = times[i]
        elif len(sizes) == 1:
            base = times[0] * num_tokens / sizes[0]
        else:
            lo = min(max(i - 1, 0), len(sizes) - 2)
            t0, t1 = sizes[lo], sizes[lo + 1]
            base = times[lo] + (times[lo + 1] - times[lo]) * (num_tokens - t0) / (t1 - t0)
            base = max(base, min(times))
        if prefix is not None:
            base += self.prefix_slope * (prefix - self.prefix_tokens)
        return max(base, 1e-9)

    def table(self) -> str:
        """The curve as a markdown table, with each size's cost relative to T = 1."""
        one = self.step_time(1)
        lines = ["| tree tokens T | ms/step | vs T=1 |", "|---:|---:|---:|"]
        for t, s in zip(self.tokens, self.seconds, strict=True):
            lines.append(f"| {t} | {s * 1e3:.1f} | {s / one:.2f}x |")
        return "\n".join(lines)

    def describe(self) -> str:
        keys = ("model", "device", "dtype", "threads")
        return ", ".join(f"{k} {self.meta[k]}" for k in keys if k in self.meta)

    # -- persistence ---------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "version": PROFILE_VERSION,
            "tokens": list(self.tokens),
            "seconds": list(self.seconds),
            "prefix_tokens": self.prefix_tokens,
            "prefix_slope": self.prefix_slope,
            "meta": self.meta,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LatencyProfile:
        return cls(
            tokens=tuple(int(t) for t in data["tokens"]),
            seconds=tuple(float(s) for s in data["seconds"]),
            prefix_tokens=int(data.get("prefix_tokens", DEFAULT_PREFIX)),
            prefix_slope=float(data.get("prefix_slope", 0.0)),
            meta=dict(data.get("meta", {})),
        )

    def save(self, path: Path) -> None:
        write_json_atomically(path, self.to_json(), indent=2)

    @classmethod
    def load(cls, path: Path) -> LatencyProfile | None:
        """The profile stored at ``path``, or None when missing, stale or unreadable."""
        return load_versioned_json(path, PROFILE_VERSION, cls.from_json)

    # -- construction ----------------------------------------------------------------------------

    @classmethod
    def synthetic(
        cls,
        flat_seconds: float,
        flat_until: int,
        per_token_after: float,
        sizes: Sequence[int] = DEFAULT_TOKENS,
        **meta: Any,
    ) -> LatencyProfile:
        """A stated curve: ``flat_seconds`` up to ``flat_until`` tokens, then linear growth.

        Used where a device cannot be measured (e.g. an H100 from a CPU-only machine) and in
        tests, which must not depend on timings.
        """
        seconds = [flat_seconds + per_token_after * max(0, t - flat_until) for t in sizes]
        return cls(tuple(sizes), tuple(seconds), meta={"synthetic": True, **meta})

    @classmethod
    def measure(
        cls,
        model,
        tokens: Sequence[int] = DEFAULT_TOKENS,
        repeats: int = 3,
        prefix: int = DEFAULT_PREFIX,
        long_prefix: int = LONG_PREFIX,
    ) -> LatencyProfile:
        """Time real tree steps (forward + verify + compaction + top-k) for each size.

        Sizes are visited round-robin ``repeats`` times after one warm-up round, and the median
        kept, so a load spike on a shared machine hits one sample, not one size.
        """
        limit = getattr(model, "max_seq_len", long_prefix + max(tokens))
        prefix = min(prefix, limit // 4)  # small-context models get a shorter prefix
        tokens = tuple(t for t in sorted(set(tokens)) if prefix + t <= limit)
        if not tokens:
            raise ValueError(f"the model's context of {limit} tokens is too short to profile")
        long_prefix = min(long_prefix, limit - max(tokens))
        model.setup_cache(1, max(prefix, long_prefix) + max(tokens))
        generator = torch.Generator().manual_seed(0)
        # The cache's contents do not change the cost of attending to it: no prefill needed.
        with torch.no_grad():
            samples: dict[int, list[float]] = {t: [] for t in tokens}
            for round_ in range(repeats + 1):
                for t in tokens:
                    seconds = _time_step(model, t, prefix, generator)
                    if round_ > 0:
                        samples[t].append(seconds)
            slope = 0.0
            if long_prefix > prefix:
                ends = (tokens[0], tokens[-1])
                short = [_median([_time_step(model, t, prefix, generator) for _ in range(3)])
                         for t in ends]  # fmt: skip
                long = [_median([_time_step(model, t, long_prefix, generator) for _ in range(3)])
                        for t in ends]  # fmt: skip
                slope = max(0.0, _median([b - a for a, b in zip(short, long, strict=True)]))
                slope /= long_prefix - prefix
        seconds = tuple(_median(samples[t]) for t in tokens)
        return cls(tokens, seconds, prefix, slope, meta=hardware_meta(model))


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _time_step(model, num_tokens: int, prefix: int, generator: torch.Generator) -> float:
    """One tree step on random tokens: a chain tree of ``num_tokens`` nodes after ``prefix``."""
    from msn_kernels import greedy_verify

    device = model.device
    tokens = torch.randint(0, model.config.vocab_size, (1, num_tokens), generator=generator)
    tokens = tokens.to(device)
    parents = tuple(range(-1, num_tokens - 1))
    mask = torch.ones(num_tokens, num_tokens, dtype=torch.bool, device=device).tril()
    cache_lens = torch.tensor([prefix], device=device)
    positions = cache_lens[:, None] + torch.arange(num_tokens, device=device)[None]
    _sync(device)
    start = time.perf_counter()
    logits = model(tokens, positions=positions, cache_lens=cache_lens, tree_mask=mask)
    verdict = greedy_verify(logits, tokens, parents)
    model.compact_cache(cache_lens, verdict.accepted_nodes)
    rows = min(num_tokens, 4)
    top = logits[0, :rows].float().softmax(-1).topk(8, dim=-1)
    torch.cat([verdict.accept_len, verdict.next_token, top.indices.flatten()]).tolist()
    _sync(device)
    return time.perf_counter() - start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hardware_meta(model) -> dict[str, Any]:
    """What a step time depends on: model shape, device, dtype, threads, torch version."""
    config = model.config
    device = torch.device(model.device)
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = platform.processor() or platform.machine()
    fields = ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "intermediate_size")
    layers, hidden, heads, kv_heads, inner = (getattr(config, f, "?") for f in fields)
    shape = f"{layers}L-{hidden}h-{heads}q{kv_heads}kv-{inner}ff-{config.vocab_size}v"
    return {
        "model": shape,
        "device": f"{device.type} ({device_name})",
        "dtype": str(model.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "torch": torch.__version__,
    }


CACHE_SUBDIR = "latency"


def profile_path(model) -> Path:
    """Where the profile of this model shape / device / dtype / thread count is cached."""
    meta = hardware_meta(model)
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    return msn_cache_dir() / CACHE_SUBDIR / f"{key}.json"


_MEMORY: dict[Path, LatencyProfile] = {}


def latency_profile(
    model,
    remeasure: bool = False,
    verbose: bool = False,
    tokens: Sequence[int] | None = None,
) -> LatencyProfile:
    """The cached profile for ``model`` on its device, measured (a few seconds) on first use.

    A model may carry its own profile as ``model.latency_profile`` (tests inject synthetic
    ones); it wins over the cache.
    """
    model = msn_view(model)  # a transformers Llama model is profiled as its slim model
    own = getattr(model, "latency_profile", None)
    if isinstance(own, LatencyProfile) and not remeasure:
        return own
    path = profile_path(model)
    if not remeasure:
        cached = _MEMORY.get(path) or LatencyProfile.load(path)
        if cached is not None:
            _MEMORY[path] = cached
            return cached
    if verbose:
        print("msn: measuring the latency profile (a few seconds) ...", flush=True)
    with exclusive(model):  # the measurement uses the model's KV cache
        profile = LatencyProfile.measure(model, tokens=tokens or DEFAULT_TOKENS)
    with contextlib.suppress(OSError):  # a read-only cache only costs a re-measurement
        profile.save(path)
    _MEMORY[path] = profile
    return profile


def plot_profile(profile: LatencyProfile, path: Path, title: str | None = None) -> None:
    """Step time against tree tokens, with the cost relative to T = 1 on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot(profile.tokens, [s * 1e3 for s in profile.seconds], marker="o")
    ax.set_xlabel("tree tokens per step (T)")
    ax.set_ylabel("ms per step")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    one = profile.step_time(1) * 1e3
    right = ax.secondary_yaxis("right", functions=(lambda ms: ms / one, lambda x: x * one))
    right.set_ylabel("cost vs T = 1")
    ax.set_title(title or f"latency profile: {profile.describe()}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
