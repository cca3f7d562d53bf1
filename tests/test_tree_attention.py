"""tree_attention against a float64 oracle: each node attends to the prefix plus its root path.

Kernels run through the Triton interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1), so
sizes stay small: short prefixes, one or two KV heads.
"""

import importlib
import random

import pytest
import torch

from msn_kernels import tree_attention, tree_attention_reference
from msn_kernels.dispatch import use_triton

# The package re-exports the function under the module's name, so fetch the module itself.
ta = importlib.import_module("msn_kernels.tree_attention")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float64: 1e-12}


@pytest.fixture
def poison_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make torch.empty return NaN-filled tensors, so unwritten outputs and partials show up."""
    real_empty = torch.empty

    def poisoned(*size: int, **kwargs: object) -> torch.Tensor:
        t = real_empty(*size, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else -7777)

    monkeypatch.setattr(torch, "empty", poisoned)


def random_parents(T: int, rng: random.Random) -> list[int]:
    return [-1] + [rng.randrange(i) for i in range(1, T)]


def ancestor_mask(parents: list[int]) -> torch.Tensor:
    """mask[i, j]: node j is on the root-to-i path (i included)."""
    T = len(parents)
    mask = torch.eye(T, dtype=torch.bool)
    for i in range(1, T):
        mask[i] |= mask[parents[i]]
    return mask


def root_path(parents: list[int], i: int) -> list[int]:
    path = []
    while i >= 0:
        path.append(i)
        i = parents[i]
    return path[::-1]


def oracle(q, k, v, cache_lens, trees, scale) -> torch.Tensor:
    """Causal attention of each node over the prefix plus its root-to-node chain, in float64."""
    q, k, v, cache_lens = (t.cpu() for t in (q, k, v, cache_lens))
    B, Hq, T, D = q.shape
    group = Hq // k.shape[1]
    out = torch.empty(B, Hq, T, D, dtype=torch.float64)
    for b in range(B):
        c = int(cache_lens[b])
        for i in range(T):
            positions = list(range(c)) + [c + j for j in root_path(trees[b], i)]
            for h in range(Hq):
                keys = k[b, h // group, positions].double()  # (n, D)
                values = v[b, h // group, positions].double()  # (n, D)
                weights = torch.softmax(keys @ q[b, h, i].double() * scale, dim=0)
                out[b, h, i] = weights @ values
    return out


def make_case(B, Hkv, group, T, D, dtype, prefix_max, shared_tree, seed):
    """Random inputs; cache slots past each row's tree are NaN so reading them would show."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    cache_lens = torch.tensor([rng.randint(0, prefix_max) for _ in range(B)])
    S = int(cache_lens.max()) + T + rng.randint(0, 3)
    q = torch.randn(B, Hkv * group, T, D, generator=gen).to(dtype)
    k = torch.randn(B, Hkv, S, D, generator=gen).to(dtype)
    v = torch.randn(B, Hkv, S, D, generator=gen).to(dtype)
    for b, c in enumerate(cache_lens.tolist()):
        k[b, :, c + T :] = float("nan")
        v[b, :, c + T :] = float("nan")
    first = random_parents(T, rng)
    trees = [first if shared_tree else random_parents(T, rng) for _ in range(B)]
    mask = ancestor_mask(first) if shared_tree else torch.stack([ancestor_mask(p) for p in trees])
    return *(t.to(DEVICE) for t in (q, k, v, cache_lens, mask)), trees


CASES = [
    # (group, D, T, dtype, num_splits, shared_tree)
    (1, 64, 1, torch.float32, None, True),
    (4, 64, 5, torch.float32, 3, False),
    (8, 128, 5, torch.float16, None, True),
    (1, 128, 21, torch.float16, 2, False),
    (4, 128, 21, torch.float32, None, True),
    (8, 64, 21, torch.float16, None, False),
    (1, 64, 69, torch.float16, None, True),
    (4, 64, 69, torch.float32, 2, False),
    (8, 128, 1, torch.float16, 4, True),
    (4, 32, 5, torch.bfloat16, 2, False),
    (1, 16, 21, torch.float32, None, True),
    (2, 64, 128, torch.float16, 2, False),
]


@pytest.mark.parametrize(("group", "D", "T", "dtype", "num_splits", "shared_tree"), CASES)
def test_matches_oracle(group, D, T, dtype, num_splits, shared_tree, poison_empty) -> None:
    seed = 1000 * group + 10 * D + T
    q, k, v, cache_lens, mask, trees = make_case(
        B=2, Hkv=1 if group == 8 else 2, group=group, T=T, D=D, dtype=dtype,
        prefix_max=200 if T <= 5 else 80, shared_tree=shared_tree, seed=seed,
    )  # fmt: skip
    out = tree_attention(q, k, v, cache_lens, mask, num_splits=num_splits)
    assert out.dtype == dtype and out.shape == q.shape
    expected = oracle(q, k, v, cache_lens, trees, D**-0.5)
    torch.testing.assert_close(out.double().cpu(), expected, atol=TOLERANCE[dtype], rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reference_matches_oracle(dtype: torch.dtype) -> None:
    q, k, v, cache_lens, mask, trees = make_case(
        B=3, Hkv=2, group=4, T=21, D=48, dtype=dtype, prefix_max=30, shared_tree=False, seed=7
    )
    out = tree_attention_reference(q, k, v, cache_lens, mask, sm_scale=0.3)
    torch.testing.assert_close(out.double().cpu(), oracle(q, k, v, cache_lens, trees, 0.3),
                               atol=TOLERANCE[dtype], rtol=0)  # fmt: skip


def test_float64_and_odd_head_dim_use_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("the Triton path must not run")

    monkeypatch.setattr(ta, "tree_attention_triton", fail)
    for dtype, D in ((torch.float64, 64), (torch.float32, 48)):
        q, k, v, cache_lens, mask, trees = make_case(
            B=2, Hkv=1, group=2, T=5, D=D, dtype=dtype, prefix_max=9, shared_tree=True, seed=3
        )
        out = tree_attention(q, k, v, cache_lens, mask)
        expected = oracle(q, k, v, cache_lens, trees, D**-0.5)
        torch.testing.assert_close(out.double().cpu(), expected, atol=TOLERANCE[dtype], rtol=0)


def test_msn_kernels_torch_forces_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(ta, "tree_attention_triton", lambda *a, **kw: calls.append(a))
    q, k, v, cache_lens, mask, _ = make_case(
        B=1, Hkv=1, group=1, T=3, D=16, dtype=torch.float32, prefix_max=4, shared_tree=True, seed=1
    )
    monkeypatch.setenv("MSN_KERNELS", "torch")
    out = tree_attention(q, k, v, cache_lens, mask)
    assert not calls
    torch.testing.assert_close(out, tree_attention_reference(q, k, v, cache_lens, mask))
    monkeypatch.delenv("MSN_KERNELS")
    tree_attention(q, k, v, cache_lens, mask)
    assert len(calls) == 1


@pytest.mark.skipif(DEVICE.type == "cuda", reason="CPU dispatch rules")
@pytest.mark.parametrize(
    ("msn_kernels", "interpret", "triton_expected"),
    [("", "1", True), ("", "0", False), ("torch", "1", False), ("triton", "1", True)],
)
def test_cpu_dispatch_reads_the_environment_at_call_time(
    monkeypatch: pytest.MonkeyPatch, msn_kernels: str, interpret: str, triton_expected: bool
) -> None:
    """On CPU, Triton runs under TRITON_INTERPRET=1 (conftest set it before the import)."""
    monkeypatch.setenv("MSN_KERNELS", msn_kernels)
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    assert use_triton(ta._tree_attention_kernel, torch.device("cpu")) is triton_expected


def test_custom_scale_strided_inputs_and_empty_prefix(poison_empty) -> None:
    q, k, v, cache_lens, mask, trees = make_case(
        B=2, Hkv=2, group=2, T=5, D=32, dtype=torch.float32, prefix_max=0, shared_tree=True, seed=5
    )
    q_strided = q.transpose(1, 2).contiguous().transpose(1, 2)  # (B, Hq, T, D) with T-major strides
    out = tree_attention(q_strided, k, v, cache_lens, mask, sm_scale=0.7)
    torch.testing.assert_close(out.double().cpu(), oracle(q, k, v, cache_lens, trees, 0.7),
                               atol=2e-5, rtol=0)  # fmt: skip


def _valid_inputs() -> dict[str, torch.Tensor]:
    q = torch.randn(2, 4, 3, 16)
    k = torch.randn(2, 2, 10, 16)
    return {
        "q": q,
        "k_cache": k,
        "v_cache": k.clone(),
        "cache_lens": torch.tensor([2, 7]),
        "tree_mask": torch.ones(3, 3, dtype=torch.bool).tril(),
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"q": torch.randn(2, 3, 3, 16)}, "multiple of key/value heads"),
        ({"cache_lens": torch.tensor([2, 8])}, "cache too short"),
        ({"cache_lens": torch.tensor([-1, 0])}, "non-negative"),
        ({"cache_lens": torch.tensor([2])}, "cache_lens must be a tensor of shape"),
        ({"cache_lens": torch.tensor([2.0, 3.0])}, "integer tensor"),
        ({"tree_mask": torch.ones(3, 3)}, "bool tensor"),
        ({"tree_mask": torch.ones(4, 4, dtype=torch.bool)}, "tree_mask must have shape"),
        ({"tree_mask": torch.ones(3, 3, 3, dtype=torch.bool)}, "tree_mask must have shape"),
        ({"q": torch.randn(2, 4, 3, 8)}, "does not match q shape"),
        ({"v_cache": torch.randn(2, 2, 11, 16)}, "shapes differ"),
        ({"q": torch.randn(2, 4, 3, 16).half()}, "share a dtype"),
        ({"q": torch.randn(2, 4, 16)}, "4-d tensor"),
        ({"q": torch.ones(2, 4, 3, 16, dtype=torch.int32)}, "fp16, bf16, fp32 or fp64"),
    ],
)
def test_validation_errors(change: dict[str, torch.Tensor], message: str) -> None:
    inputs = {**_valid_inputs(), **change}
    with pytest.raises(ValueError, match=message):
        tree_attention(**inputs)


def test_num_splits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="num_splits must be >= 1"):
        tree_attention(**_valid_inputs(), num_splits=0)


def test_tree_longer_than_the_cache_is_refused_without_reading_lengths() -> None:
    inputs = {**_valid_inputs(), "k_cache": torch.randn(2, 2, 2, 16)}
    inputs["v_cache"] = inputs["k_cache"].clone()
    with pytest.raises(ValueError, match="3 tree nodes do not fit a cache of length 2"):
        tree_attention(**inputs, check_lens=False)


def test_empty_and_long_prefixes_in_one_batch_with_unchecked_lengths(poison_empty) -> None:
    """A row with no prefix beside a 300-token one, split five ways, lengths not read back."""
    q, k, v, _, mask, trees = make_case(
        B=2, Hkv=2, group=4, T=5, D=64, dtype=torch.float32, prefix_max=0, shared_tree=False,
        seed=11,
    )  # fmt: skip
    cache_lens = torch.tensor([0, 300], device=DEVICE)
    S = 300 + 5
    gen = torch.Generator().manual_seed(3)
    k = torch.randn(2, 2, S, 64, generator=gen).to(DEVICE)
    v = torch.randn(2, 2, S, 64, generator=gen).to(DEVICE)
    k[0, :, 5:] = v[0, :, 5:] = float("nan")  # row 0 must read only its 5 tree slots
    out = tree_attention(q, k, v, cache_lens, mask, num_splits=5, check_lens=False)
    expected = oracle(q, k, v, cache_lens, trees, 64**-0.5)
    torch.testing.assert_close(out.double().cpu(), expected, atol=TOLERANCE[torch.float32], rtol=0)


def test_split_rule_follows_flashdecoding() -> None:
    """Llama3-8B shapes, one row: 8 KV heads x 3 m-tiles of 128 rows (G=4 x T=69 = 276 rows)."""
    rule = ta.num_splits_heuristic
    # Waves of 132 programs: 24 x s / 132 is 0.73 of a wave at s=4 and 0.91 at s=5 (the best;
    # s=6 and 7 spill into a second wave); s=5 is the fewest within 85% of the best.
    assert rule(24, 4096, 276, sm_count=132) == 5
    # Two programs per SM double the wave: 24 x 6 / 264 = 0.55 is within 85% of s=7's 0.64.
    assert rule(24, 4096, 276, sm_count=132, ctas_per_sm=2) == 6
    assert rule(132, 4096, 276, sm_count=132) == 1  # a full wave already: no split
    assert rule(106, 4096, 276, sm_count=132) == 1  # >= 80% of a wave
    # A 32k cache capacity as the bound would split 5 ways; 300 real keys allow one split.
    assert rule(24, 32768, 276, sm_count=132) == 5
    assert rule(24, 300, 276, sm_count=132) == 1
    assert rule(24, 0, 276, sm_count=132) == 1
    # Partial traffic: 276 rows x 2 splits of fp32 partials would outweigh 1000 keys of K/V.
    assert rule(1, 1000, 276, sm_count=132) == 1
    assert rule(1, 1000, 16, sm_count=132) == 3  # 1000 // 256 caps it; 3 is within 85% of 3
    with pytest.raises(ValueError, match="sm_count"):
        rule(24, 4096, 276, sm_count=0)


def test_split_count_follows_the_host_length_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under the interpreter a long prefix splits four ways: the real bound, not the capacity."""
    launches = []
    real_merge = ta._merge_splits_kernel

    class Spy:
        def __getitem__(self, grid):
            launches.append(grid)
            return real_merge[grid]

    monkeypatch.setattr(ta, "_merge_splits_kernel", Spy())
    q, _, _, _, mask, trees = make_case(
        B=2, Hkv=1, group=2, T=5, D=16, dtype=torch.float32, prefix_max=0, shared_tree=True, seed=9
    )
    S = 5000  # capacity: 4 splits if it were the bound (S // 1024 = 4)
    gen = torch.Generator().manual_seed(4)
    k = torch.randn(2, 1, S, 16, generator=gen).to(DEVICE)
    v = torch.randn(2, 1, S, 16, generator=gen).to(DEVICE)
    cache_lens = torch.tensor([30, 200], device=DEVICE)
    expected = oracle(q, k, v, cache_lens, trees, 16**-0.5)
    for kwargs, splits in (
        ({"check_lens": False}, True),  # no bound known: the capacity decides
        ({"check_lens": False, "max_cache_len": 200}, False),
        ({"check_lens": True}, False),  # cache_lens.max() was read back anyway
        ({"check_lens": False, "max_cache_len": 0}, False),  # a wrong bound: still exact
    ):
        launches.clear()
        out = tree_attention(q, k, v, cache_lens, mask, **kwargs)
        assert bool(launches) is splits, kwargs
        torch.testing.assert_close(out.double().cpu(), expected, atol=2e-5, rtol=0)
    with pytest.raises(ValueError, match="max_cache_len must be >= 0"):
        tree_attention(q, k, v, cache_lens, mask, max_cache_len=-1)


@pytest.fixture
def cpu_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dispatch as on a CPU without the interpreter: tree_attention takes its SDPA path."""
    if DEVICE.type != "cpu":
        pytest.skip("the SDPA path is the CPU path")
    monkeypatch.setenv("TRITON_INTERPRET", "0")


SDPA_CASES = [
    # (B, group, D, T, shared_tree, prefix_max): ragged rows, shared prefixes, GQA, T = 1
    (3, 4, 64, 21, False, 60),
    (2, 1, 48, 5, True, 30),
    (2, 8, 64, 1, True, 200),
    (1, 3, 64, 69, True, 300),
]


@pytest.mark.parametrize(("B", "group", "D", "T", "shared_tree", "prefix_max"), SDPA_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_sdpa_path_matches_oracle(B, group, D, T, shared_tree, prefix_max, dtype, cpu_path):
    """Cache slots past each row's tree hold NaN: a row that read another row's keys would show."""
    q, k, v, cache_lens, mask, trees = make_case(
        B=B, Hkv=2, group=group, T=T, D=D, dtype=dtype, prefix_max=prefix_max,
        shared_tree=shared_tree, seed=17 * T + D,
    )  # fmt: skip
    calls = []
    real = ta.tree_attention_sdpa
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ta, "tree_attention_sdpa", lambda *a, **kw: calls.append(1) or real(*a, **kw))
        out = tree_attention(q, k, v, cache_lens, mask)
    assert calls and out.dtype == dtype and out.shape == q.shape
    expected = oracle(q, k, v, cache_lens, trees, D**-0.5)
    torch.testing.assert_close(out.double(), expected, atol=TOLERANCE[dtype], rtol=0)


def test_cpu_sdpa_path_equal_prefixes_one_call_and_unseen_nodes(
    cpu_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows of one length share a call; a node that sees nothing (no prefix, empty mask row)
    gets zeros; a custom scale is honoured."""
    q, k, v, _, _, _ = make_case(
        B=2, Hkv=1, group=2, T=4, D=32, dtype=torch.float32, prefix_max=0, shared_tree=True, seed=2
    )
    parents = [-1, 0, 0, 1]
    mask = ancestor_mask(parents)
    mask[2] = False  # node 2 sees no key at all
    real_sdpa, calls = ta.F.scaled_dot_product_attention, []

    def counted_sdpa(*args, **kwargs):
        calls.append(1)
        return real_sdpa(*args, **kwargs)

    monkeypatch.setattr(ta.F, "scaled_dot_product_attention", counted_sdpa)
    for cache_len in (0, 7):
        calls.clear()
        cache_lens = torch.tensor([cache_len, cache_len])
        S = cache_len + 4
        k_cache = torch.randn(2, 1, S, 32, generator=torch.Generator().manual_seed(cache_len))
        v_cache = torch.randn_like(k_cache)
        out = tree_attention(q, k_cache, v_cache, cache_lens, mask, sm_scale=0.4)
        expected = tree_attention_reference(
            q.double(), k_cache.double(), v_cache.double(), cache_lens, mask, sm_scale=0.4
        )
        torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=0)
        assert len(calls) == 1 and not out.isnan().any()
        assert bool((out[:, :, 2] == 0).all()) is (cache_len == 0)
    empty = tree_attention(q[:0], k_cache[:0], v_cache[:0], cache_lens[:0], mask)
    assert empty.shape == (0, *q.shape[1:])


def test_cpu_dispatch_takes_sdpa_but_float64_and_msn_kernels_torch_the_reference(
    cpu_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    taken = []
    monkeypatch.setattr(ta, "tree_attention_sdpa", lambda *a, **kw: taken.append("sdpa"))
    monkeypatch.setattr(ta, "tree_attention_reference", lambda *a, **kw: taken.append("ref"))
    for dtype in (torch.float32, torch.float64):
        inputs = _valid_inputs()
        inputs["q"] = inputs["q"].to(dtype)
        inputs["k_cache"], inputs["v_cache"] = (inputs[n].to(dtype) for n in ("k_cache", "v_cache"))
        tree_attention(**inputs)
    monkeypatch.setenv("MSN_KERNELS", "torch")
    tree_attention(**_valid_inputs())
    assert taken == ["sdpa", "ref", "ref"]
