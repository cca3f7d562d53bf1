"""Decode steps with no host synchronisation inside, replayed as CUDA graphs on a GPU.

Every decoder splits a step in three:
1. the host builds the step's inputs (the tree tokens, the cache length it keeps itself);
2. a *device function* runs the forward pass, verification, KV compaction and the Jacobi
   update, and packs the verdict into one tensor. It reads nothing back to the host: the bound
   on the prefix lengths that the model's bounds check and the attention's split count need is
   a host int (`length_bound`), and no Python branch looks at a tensor's value;
3. the host reads the packed verdict back (`.tolist()`), the one synchronisation of the step.

On CUDA, `StepGraphs` captures the device function once per (step kind, tree shape, length
bound) in a `torch.cuda.CUDAGraph` and replays it: the step's ~12 launches per layer become one
graph launch. Elsewhere (and with `cuda_graph=False`) the same function runs eagerly, which is
the CPU path the tests check for exactness. `tests/test_step_graph.py` runs the device
functions with every read-back patched to raise.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence

import torch
from torch import Tensor

from msn_kernels.dispatch import forced_reference
from msn_kernels.tree_attention import TRITON_HEAD_DIMS

GRAPH_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
"""dtypes whose kernels all run as Triton on CUDA (others take the references, which read back)."""

BOUND_MIN = 256
"""Smallest length bound: shorter prefixes all take one bound (one graph)."""


def length_bound(cache_len: int, room: int) -> int:
    """The host-side bound on a prefix length passed to the model: the next power of two
    (at least 256), capped at ``room``, the longest prefix the cache leaves room for (its
    capacity minus the step's tokens), which is >= ``cache_len`` when the step fits.

    It only sizes tree_attention's split count (results do not depend on it), and graphs are
    keyed by it, so a call captures about log2(S / 256) graphs per tree shape; the eager path
    uses the same bound, so both launch the very same kernels.
    """
    bound = BOUND_MIN
    while bound < cache_len:
        bound *= 2
    return max(cache_len, min(bound, room))


def use_cuda_graph(cuda_graph: bool | None, model, sampled: bool) -> bool:
    """Whether a generate call replays CUDA graphs: ``None`` means yes where it can.

    It can on a CUDA model whose kernels all run as Triton (fp16, bf16 or fp32, head dim 16 to
    128; ``MSN_KERNELS=torch`` or other dtypes select the PyTorch references, which read lengths
    back) when decoding greedily (sampled steps draw host-side noise per position and stay
    eager). ``True`` where it cannot raises ValueError.
    """
    if cuda_graph is not None and not isinstance(cuda_graph, bool):
        raise ValueError(f"cuda_graph must be True, False or None, got {cuda_graph!r}.")
    reason = None
    if model.device.type != "cuda":
        reason = f"the model is on {model.device}, not a CUDA device"
    elif forced_reference():
        reason = "MSN_KERNELS=torch selects the PyTorch reference kernels, which read back"
    elif model.dtype not in GRAPH_DTYPES or model.config.head_dim not in TRITON_HEAD_DIMS:
        reason = (
            f"{model.dtype} with head dim {model.config.head_dim} runs the PyTorch reference "
            "kernels, which read back (Triton takes fp16/bf16/fp32, head dims "
            f"{', '.join(map(str, TRITON_HEAD_DIMS))})"
        )
    elif sampled:
        reason = "do_sample=True steps draw per-position noise on the host"
    if cuda_graph is None:
        return reason is None
    if cuda_graph and reason is not None:
        raise ValueError(f"cuda_graph=True cannot be honoured: {reason}; use cuda_graph=None.")
    return cuda_graph


@dataclasses.dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: list[Tensor]  # static device buffers the graph reads
    staging: list[Tensor]  # pinned host twins of `inputs`
    output: Tensor  # static device buffer the graph writes
    keep: tuple  # tensors the graph reads by address (tree masks, ...): kept alive


class StepGraphs:
    """CUDA graphs of decode steps for one model and its KV cache.

    ``run(key, fn, inputs, bound)`` replays the graph of ``fn(*inputs_on_device, bound)``
    captured under ``(key, bound, input shapes)``, capturing it when the key has been asked
    for ``capture_after`` times (before that, and when capturing is off, ``fn`` runs eagerly).
    ``fn`` must be a pure device function of its tensor inputs and ``bound``: it may mutate
    the KV cache, but a step run twice on the same inputs must leave the same state (a decode
    step does: it rewrites the tree's slots, then compacts the same accepted nodes), because
    capture runs it once for warm-up. Graphs hold the cache's address: a new cache
    (``setup_cache`` growing it) drops them all.
    """

    def __init__(self, model, max_graphs: int = 48):
        self.model = model
        self.device = model.device
        self.max_graphs = max_graphs
        self.graphs: OrderedDict[Hashable, _Graph] = OrderedDict()
        self.seen: dict[Hashable, int] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.cache_key: tuple | None = None
        self.captures = 0
        self.replays = 0
        self.eager_runs = 0

    def _check_cache(self) -> None:
        cache = self.model.cache
        key = (cache.k.data_ptr(), cache.v.data_ptr(), tuple(cache.k.shape), cache.k.dtype)
        if key != self.cache_key:
            self.graphs.clear()
            self.seen.clear()
            self.cache_key = key

    def run(
        self,
        key: Hashable,
        fn: Callable[..., Tensor],
        inputs: Sequence[Tensor],
        bound: int,
        capture_after: int = 1,
        keep: tuple = (),
    ) -> Tensor:
        """The output of ``fn(*inputs, bound)``; ``inputs`` are CPU tensors."""
        self._check_cache()
        full_key = (key, bound, tuple(tuple(t.shape) for t in inputs))
        entry = self.graphs.get(full_key)
        if entry is None:
            seen = self.seen[full_key] = self.seen.get(full_key, 0) + 1
            if seen < capture_after:
                self.eager_runs += 1
                return fn(*(t.to(self.device) for t in inputs), bound)
            entry = self._capture(full_key, fn, inputs, bound, keep)
        else:
            self.graphs.move_to_end(full_key)
        for stage, buffer, value in zip(entry.staging, entry.inputs, inputs, strict=True):
            # The previous step's read-back synchronised the stream: the staging is free.
            stage.copy_(value)
            buffer.copy_(stage, non_blocking=True)
        entry.graph.replay()
        self.replays += 1
        return entry.output

    def _capture(self, full_key, fn, inputs, bound, keep) -> _Graph:
        while len(self.graphs) >= self.max_graphs:
            self.graphs.popitem(last=False)
        staging = [t.pin_memory() for t in inputs]
        buffers = [t.to(self.device) for t in staging]
        # Warm-up off the capture: compiles kernels, fills per-device caches (tree tensors,
        # RoPE frequencies), initialises cuBLAS. The step is idempotent, so it is harmless.
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            fn(*buffers, bound)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            output = fn(*buffers, bound)
        entry = _Graph(graph, buffers, staging, output, keep)
        self.graphs[full_key] = entry
        self.captures += 1
        return entry

    def stats(self) -> dict:
        return {
            "graphs": len(self.graphs),
            "captures": self.captures,
            "replays": self.replays,
            "eager_runs": self.eager_runs,
        }


def step_graphs(model) -> StepGraphs:
    """The model's CUDA graph store, created on first use (one per model object)."""
    graphs = model.__dict__.get("_msn_step_graphs")
    if graphs is None:
        graphs = StepGraphs(model)
        model.__dict__["_msn_step_graphs"] = graphs
    return graphs


class StepRunner:
    """Runs a decoder's device function eagerly, or through the model's ``StepGraphs``."""

    def __init__(self, model, graphs: bool):
        self.model = model
        self.device = model.device
        self.graphs = step_graphs(model) if graphs else None

    def __call__(
        self,
        key: Hashable,
        fn: Callable[..., Tensor],
        inputs: Sequence[Tensor],
        bound: int,
        capture_after: int = 1,
        keep: tuple = (),
    ) -> Tensor:
        if self.graphs is None:
            return fn(*(t.to(self.device) for t in inputs), bound)
        return self.graphs.run(key, fn, inputs, bound, capture_after, keep)
