"""A decode step reads nothing back to the host between its tokens going in and its verdict
coming out (so it can be captured in a CUDA graph), and graph replay equals eager on a GPU.

The CPU proof: each decoder's device function (`_greedy_device_step`, `TreeDecoder.device_step`,
`AutoTreeDecoder.device_step`) runs under `no_host_sync`, which makes every read-back raise:
`Tensor.item/tolist/numpy/__int__/__float__/__bool__/__index__` and, through a dispatch mode,
`aten._local_scalar_dense` and the ops whose output size depends on values (which synchronise
a GPU). The kernels run as Triton through its interpreter, as on CUDA (fp32, head dim 16); the
interpreter's own numpy work, which stands in for the GPU executing the kernel, is allowed.
"""

import contextlib
import functools
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_llama
from torch.utils._python_dispatch import TorchDispatchMode

import msn
import msn.decoding as decoding
from msn.acceptance import AcceptanceStats
from msn.auto_decoder import AutoTreeDecoder
from msn.decoding import TreeDecoder
from msn.latency import LatencyProfile
from msn.step_graph import length_bound, use_cuda_graph
from msn.tree import comb_tree

NEW_TOKENS = 24
FLAT = LatencyProfile((1, 16, 32), (0.010, 0.010, 0.011))  # a GPU-like curve: trees are free


class HostSyncError(AssertionError):
    """A tensor value was read back to the host inside a decode step."""


_READ_BACKS = ("item", "tolist", "numpy", "__int__", "__float__", "__bool__", "__index__")
_DATA_DEPENDENT = {
    "aten::_local_scalar_dense",
    "aten::nonzero",
    "aten::masked_select",
    "aten::is_nonzero",
    "aten::equal",
    "aten::allclose",
    "aten::_unique2",
    "aten::unique_consecutive",
    "aten::unique_dim",
}


def _in_kernel_interpreter() -> bool:
    """Whether Triton's interpreter is executing a kernel (its numpy work is the 'GPU')."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if name.endswith(os.path.join("triton", "runtime", "interpreter.py")):
            return True
        frame = frame.f_back
    return False


class _DispatchGuard(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        data_dependent = name in _DATA_DEPENDENT or (
            name == "aten::repeat_interleave" and func._overloadname != "self_int"
        )
        bool_index = name in ("aten::index", "aten::index_put", "aten::index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool
            for i in (args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ())
        )
        if (data_dependent or bool_index) and not _in_kernel_interpreter():
            raise HostSyncError(f"{func} reads tensor values back to the host")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def no_host_sync():
    """Inside: any read-back of a tensor value raises HostSyncError."""
    originals = {name: getattr(torch.Tensor, name) for name in _READ_BACKS}

    def forbid(name, original):
        @functools.wraps(original)
        def guarded(self, *args, **kwargs):
            if not _in_kernel_interpreter():
                raise HostSyncError(f"Tensor.{name} reads a tensor value back to the host")
            return original(self, *args, **kwargs)

        return guarded

    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, forbid(name, original))
        with _DispatchGuard():
            yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


@pytest.fixture(scope="module")
def tiny_fp32(tmp_path_factory):
    """fp32 with head dim 16: every kernel takes its Triton path (interpreted here)."""
    path = tmp_path_factory.mktemp("step-graph-model")
    save_tiny_llama(path, max_position_embeddings=128)
    model = msn.load_model(path, dtype=torch.float32)
    assert model.config.head_dim == 16
    return model


def _prompt():
    return torch.tensor([[11, 12, 13, 14] * 4 + [40, 41, 42]])


def _reference_greedy(model, prompt, new_tokens):
    """Plain greedy by full recomputation: no cache, no decoder code."""
    ids = prompt[0].tolist()
    for _ in range(new_tokens):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return torch.tensor([ids])


def _guarded(monkeypatch, owner, name, calls):
    """Run `owner.name` (a device function) under no_host_sync, counting calls."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        calls.append(name)
        with no_host_sync():
            return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)


@pytest.fixture(scope="module")
def expected(tiny_fp32):
    with torch.no_grad():
        return _reference_greedy(tiny_fp32, _prompt(), NEW_TOKENS)


def test_the_guard_catches_read_backs():
    x = torch.tensor([3, 4])
    for read_back in (
        lambda: int(x.max()),
        lambda: x.tolist(),
        lambda: x[0].item(),
        lambda: bool(x.sum() > 0),
        lambda: list(range(10))[x[0]],
        lambda: x.numpy(),
        lambda: x.nonzero(),
        lambda: x[x > 3],
    ):
        with pytest.raises(HostSyncError), no_host_sync():
            read_back()
    with no_host_sync():  # device-side work is fine
        y = (x * 2).gather(0, torch.tensor([1])) + x.argmax()
    assert y.tolist() == [9]


def test_a_forward_without_a_host_bound_reads_back_and_one_with_it_does_not(tiny_fp32):
    model = tiny_fp32
    model.setup_cache(1, 64)
    with torch.no_grad():
        model(_prompt())
        cache_lens = torch.tensor([_prompt().shape[1]])
        tokens = torch.tensor([[5, 6, 7]])
        with pytest.raises(HostSyncError, match="_local_scalar_dense|__int__"), no_host_sync():
            model(tokens, cache_lens=cache_lens)  # the bounds check reads cache_lens.max()
        with no_host_sync():
            model(tokens, cache_lens=cache_lens, max_cache_len=_prompt().shape[1])


def test_greedy_steps_have_no_host_sync(tiny_fp32, expected, monkeypatch):
    calls = []
    _guarded(monkeypatch, decoding, "_greedy_device_step", calls)
    result = msn.generate(tiny_fp32, _prompt(), NEW_TOKENS, method="greedy", eos_token_id=[])
    assert len(calls) == NEW_TOKENS - 1
    assert torch.equal(result.output_ids, expected)


@pytest.mark.parametrize(
    "tree", ["paper", comb_tree([3, 2, 1], retrieval_depth=3)], ids=["paper", "comb"]
)
def test_fixed_tree_steps_have_no_host_sync(tiny_fp32, expected, monkeypatch, tree):
    calls = []
    _guarded(monkeypatch, TreeDecoder, "device_step", calls)
    result = msn.generate(tiny_fp32, _prompt(), NEW_TOKENS, tree=tree, eos_token_id=[])
    assert len(calls) == result.steps > 0
    assert max(result.accept_lengths) > 1  # the retrieval chain matched: real acceptance
    assert torch.equal(result.output_ids, expected)


def test_auto_tree_steps_have_no_host_sync(tiny_fp32, expected, monkeypatch):
    calls = []
    _guarded(monkeypatch, AutoTreeDecoder, "device_step", calls)
    result = msn.generate(
        tiny_fp32, _prompt(), NEW_TOKENS, tree="auto", eos_token_id=[], latency=FLAT,
        acceptance=AcceptanceStats(),
    )  # fmt: skip
    assert len(calls) > 0 and result.tree["mean_nodes"] > 1
    assert torch.equal(result.output_ids, expected)


def test_a_sync_reintroduced_into_the_step_fails_the_check(tiny_fp32, monkeypatch):
    """The check is not vacuous: a forward that reads the lengths back (as the model did
    before the host bound) makes the guarded tree step raise."""
    forward = type(tiny_fp32).forward

    def reading_forward(self, *args, max_cache_len=None, **kwargs):
        return forward(self, *args, **kwargs)  # drops the host bound: reads cache_lens.max()

    monkeypatch.setattr(type(tiny_fp32), "forward", reading_forward)
    _guarded(monkeypatch, TreeDecoder, "device_step", [])
    with pytest.raises(HostSyncError):
        msn.generate(tiny_fp32, _prompt(), 4, tree="paper", eos_token_id=[])


def test_length_bound_and_the_switch(monkeypatch):
    assert [length_bound(n, 8000) for n in (0, 1, 256, 257, 3000)] == [256, 256, 256, 512, 4096]
    assert length_bound(3000, 3500) == 3500 and length_bound(10, 100) == 100

    class CpuModel:
        device = torch.device("cpu")

    assert use_cuda_graph(None, CpuModel(), sampled=False) is False
    assert use_cuda_graph(False, CpuModel(), sampled=False) is False
    with pytest.raises(ValueError, match="cuda_graph=True"):
        use_cuda_graph(True, CpuModel(), sampled=False)
    with pytest.raises(ValueError, match="cuda_graph must be"):
        use_cuda_graph("yes", CpuModel(), sampled=False)

    class CudaModel:  # nothing here touches CUDA: the rule only reads these attributes
        device = torch.device("cuda", 0)
        dtype = torch.bfloat16
        config = type("Config", (), {"head_dim": 128})()

    assert use_cuda_graph(None, CudaModel(), sampled=False) is True
    assert use_cuda_graph(None, CudaModel(), sampled=True) is False  # host-side noise
    with pytest.raises(ValueError, match="do_sample"):
        use_cuda_graph(True, CudaModel(), sampled=True)
    CudaModel.dtype = torch.float64  # the reference kernels read lengths back
    assert use_cuda_graph(None, CudaModel(), sampled=False) is False
    CudaModel.dtype, CudaModel.config.head_dim = torch.float16, 96
    assert use_cuda_graph(None, CudaModel(), sampled=False) is False
    CudaModel.config.head_dim = 64
    monkeypatch.setenv("MSN_KERNELS", "torch")
    with pytest.raises(ValueError, match="MSN_KERNELS"):
        use_cuda_graph(True, CudaModel(), sampled=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_replay_equals_eager_on_cuda(tmp_path, dtype):
    path = tmp_path / "model"
    save_tiny_llama(path, max_position_embeddings=256)
    model = msn.load_model(path, device="cuda", dtype=dtype)
    prompt = _prompt()
    for options in (
        dict(method="greedy"),
        dict(tree="paper"),
        dict(tree=comb_tree([3, 2, 1], retrieval_depth=3)),
        dict(tree="auto", latency=FLAT, acceptance=AcceptanceStats()),
    ):
        eager = msn.generate(model, prompt, 48, eos_token_id=[], cuda_graph=False, **options)
        if "acceptance" in options:
            options["acceptance"] = AcceptanceStats()
        graphed = msn.generate(model, prompt, 48, eos_token_id=[], cuda_graph=True, **options)
        assert torch.equal(graphed.output_ids, eager.output_ids), options
        assert graphed.accept_lengths == eager.accept_lengths, options
    stats = model._msn_step_graphs.stats()
    assert stats["captures"] > 0 and stats["replays"] > stats["captures"]


def test_the_gpu_benchmark_runs_on_a_tiny_model(tmp_path, monkeypatch):
    """benchmarks/bench_step_graph.py's --tiny smoke path (the GPU suite runs the real one)."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_step_graph

    report = bench_step_graph.main(["--tiny", "--out", str(tmp_path), "--new-tokens", "4"])
    assert set(report["runs"]) >= {"greedy/eager", "paper/eager", "auto/eager"}
    assert report["runs"]["paper/eager"]["same_tokens_as_greedy"]
    assert report["runs"]["auto/eager"]["same_tokens_as_greedy"]
    assert report["runs"]["greedy/eager"]["host_ms_per_step"] > 0
    assert "| paper/eager |" in (tmp_path / "step_graph.md").read_text()
