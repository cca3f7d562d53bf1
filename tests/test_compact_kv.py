"""compact_kv: in-place moves of accepted nodes' K/V, overlap included, with and without layers.

The Triton path runs through the interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1).
"""

import importlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from msn_kernels import compact_kv, compact_kv_reference

ck = importlib.import_module("msn_kernels.compact_kv")  # the package re-exports the function
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def expected_after(cache: torch.Tensor, cache_lens: list[int], accepted: list[list[int]]):
    """Oracle from an untouched copy: slot i of row b gets node accepted[b][i]."""
    out = cache.clone()
    for b, (start, nodes) in enumerate(zip(cache_lens, accepted, strict=True)):
        for i, node in enumerate(nodes):
            if node >= 0:
                out[..., b, :, start + i, :] = cache[..., b, :, start + node, :]
    return out


def random_path(rng: torch.Generator, T: int) -> list[int]:
    """Node indices of a root path: 0 first, strictly increasing (parents[i] < i)."""
    n = int(torch.randint(0, T, (1,), generator=rng))
    return [0] + sorted(torch.randperm(T - 1, generator=rng)[:n].add(1).tolist())


def run_case(layers: int | None, B: int, Hkv: int, D: int, T: int, seed: int, fn) -> None:
    gen = torch.Generator().manual_seed(seed)
    cache_lens = torch.randint(0, 12, (B,), generator=gen)
    S = int(cache_lens.max()) + T + 2
    shape = (B, Hkv, S, D) if layers is None else (layers, B, Hkv, S, D)
    k = torch.randn(shape, generator=gen)
    v = torch.randn(shape, generator=gen)
    paths = [random_path(gen, T) for _ in range(B)]
    M = max(len(p) for p in paths) + 1  # at least one -1 pad per row
    accepted = torch.tensor([p + [-1] * (M - len(p)) for p in paths])
    want_k = expected_after(k, cache_lens.tolist(), accepted.tolist())
    want_v = expected_after(v, cache_lens.tolist(), accepted.tolist())
    k, v, cache_lens, accepted = (t.to(DEVICE) for t in (k, v, cache_lens, accepted))
    lens_before = cache_lens.clone()
    fn(k, v, cache_lens, accepted)
    assert torch.equal(k.cpu(), want_k) and torch.equal(v.cpu(), want_v)
    assert torch.equal(cache_lens, lens_before), "compact_kv must not change cache_lens"


@pytest.mark.parametrize("fn", [compact_kv, compact_kv_reference], ids=["dispatch", "reference"])
@pytest.mark.parametrize(("layers", "D"), [(None, 64), (3, 128), (1, 16)])
def test_moves_match_the_oracle(layers: int | None, D: int, fn) -> None:
    run_case(layers, B=3, Hkv=2, D=D, T=21, seed=D, fn=fn)


def test_overlapping_moves() -> None:
    """Prefix 1, path [0, 2, 5, 6]: slot 1 reads position 3, which slot 2 overwrites."""
    k = torch.arange(10.0, device=DEVICE).repeat_interleave(16).view(1, 1, 10, 16)  # k[s] = s
    v = -k
    accepted = torch.tensor([[0, 2, 5, 6, -1]], device=DEVICE)
    compact_kv(k, v, torch.tensor([1], device=DEVICE), accepted)
    assert k[0, 0, :, 0].tolist() == [0, 1, 3, 6, 7, 5, 6, 7, 8, 9]
    assert torch.equal(v, -k)


def test_one_launch_for_all_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    launches = []
    real = ck._compact_kv_kernel

    class Spy:
        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid]

    monkeypatch.setattr(ck, "_compact_kv_kernel", Spy())
    monkeypatch.setattr(ck, "use_triton", lambda kernel, device: True)
    run_case(4, B=2, Hkv=2, D=32, T=9, seed=0, fn=compact_kv)
    assert launches == [(4 * 2 * 2,)]


def test_msn_kernels_torch_forces_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(ck, "compact_kv_triton", lambda *a: calls.append(a))
    monkeypatch.setenv("MSN_KERNELS", "torch")
    run_case(None, B=1, Hkv=1, D=16, T=5, seed=2, fn=compact_kv)
    assert not calls


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    layers=st.sampled_from([None, 1, 2]),
    B=st.integers(1, 3),
    Hkv=st.integers(1, 2),
    D=st.sampled_from([16, 32]),
    T=st.integers(1, 30),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_paths(layers: int | None, B: int, Hkv: int, D: int, T: int, seed: int) -> None:
    run_case(layers, B, Hkv, D, T, seed, fn=compact_kv)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"k_cache": torch.zeros(2, 4, 8)}, "k_cache must be"),
        ({"v_cache": torch.zeros(2, 1, 9, 8)}, "differs from k_cache"),
        ({"v_cache": torch.zeros(2, 1, 10, 8, dtype=torch.float16)}, "dtypes differ"),
        ({"accepted_nodes": torch.zeros(3, 2, dtype=torch.long)}, "has 3 rows"),
        ({"accepted_nodes": torch.zeros(2, dtype=torch.long)}, r"\[B, M\]"),
        ({"accepted_nodes": torch.zeros(2, 2)}, "integer tensor"),
        ({"cache_lens": torch.zeros(3, dtype=torch.long)}, "shape"),
    ],
)
def test_validation_errors(change: dict[str, torch.Tensor], message: str) -> None:
    inputs = {
        "k_cache": torch.zeros(2, 1, 10, 8),
        "v_cache": torch.zeros(2, 1, 10, 8),
        "cache_lens": torch.tensor([1, 2]),
        "accepted_nodes": torch.tensor([[0, 1], [0, -1]]),
        **change,
    }
    with pytest.raises(ValueError, match=message):
        compact_kv(**inputs)
