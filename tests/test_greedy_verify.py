"""greedy_verify: hand-built trees with exact answers, and property tests over random trees.

The Triton path runs through the interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1).
"""

import importlib
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from msn_kernels import VerifyResult, greedy_verify, greedy_verify_reference

gv = importlib.import_module("msn_kernels.greedy_verify")  # the package re-exports the function
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def poison_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.empty returns NaN / -7777 filled tensors, so anything left unwritten shows."""
    empty = torch.empty
    fill = lambda t: t.fill_(float("nan") if t.is_floating_point() else -7777)
    monkeypatch.setattr(torch, "empty", lambda *size, **kw: fill(empty(*size, **kw)))


def one_hot_logits(argmax_tokens: list[list[int]], V: int = 8) -> torch.Tensor:
    """Logits [B, T, V] whose argmax at (b, t) is argmax_tokens[b][t]."""
    logits = torch.zeros(len(argmax_tokens), len(argmax_tokens[0]), V)
    for b, row in enumerate(argmax_tokens):
        for t, token in enumerate(row):
            logits[b, t, token] = 1.0
    return logits


def oracle(logits: torch.Tensor, tokens: torch.Tensor, parents: list[int]) -> VerifyResult:
    """Plain Python: walk every node's root path."""
    B, T, _ = logits.shape
    depth = [0] * T
    for i in range(1, T):
        depth[i] = depth[parents[i]] + 1
    amax = logits.cpu().argmax(-1).tolist()
    tok = tokens.tolist()
    lens, paths, nexts = [], [], []
    for b in range(B):
        accepted = [True] + [False] * (T - 1)
        for i in range(1, T):
            p = parents[i]
            accepted[i] = accepted[p] and tok[b][i] >= 0 and tok[b][i] == amax[b][p]
        best = max(range(T), key=lambda i: (accepted[i], depth[i], -i))
        path = [best]
        while parents[path[-1]] >= 0:
            path.append(parents[path[-1]])
        path.reverse()
        lens.append(depth[best])
        paths.append(path + [-1] * (max(depth) + 1 - len(path)))
        nexts.append(amax[b][best])
    return VerifyResult(torch.tensor(lens), torch.tensor(paths), torch.tensor(nexts))


def assert_result(result: VerifyResult, expected: VerifyResult) -> None:
    for name, got, want in zip(VerifyResult._fields, result, expected, strict=True):
        assert got.dtype == torch.int64 and got.device.type == DEVICE.type, name
        assert torch.equal(got.cpu(), want.cpu().long()), f"{name}: got {got}, want {want}"


# (parents, argmax at each node per row, tokens per row, accept_len, accepted_nodes, next_token)
HAND_BUILT = {
    "chain_all_accepted": (
        [-1, 0, 1, 2], [[3, 5, 1, 6]], [[9, 3, 5, 1]], [3], [[0, 1, 2, 3]], [6],
    ),
    "nothing_accepted": (
        [-1, 0, 1, 2], [[3, 5, 1, 6]], [[9, 4, 5, 1]], [0], [[0, -1, -1, -1]], [3],
    ),
    "root_only": ([-1], [[4]], [[0]], [0], [[0]], [4]),
    "equal_depth_tie_goes_to_smallest_node": (
        [-1, 0, 0, 1, 2], [[2, 6, 7, 0, 0]], [[0, 2, 2, 6, 7]], [2], [[0, 1, 3]], [0],
    ),
    "deepest_wins_over_earlier_branch": (
        [-1, 0, 0, 1, 2, 4], [[2, 6, 7, 0, 1, 5]], [[0, 2, 2, 6, 7, 1]], [3], [[0, 2, 4, 5]], [5],
    ),
    "dead_slot_blocks_its_subtree": (
        [-1, 0, 1, 0], [[2, 6, 1, 3]], [[0, -1, 6, 2]], [1], [[0, 3, -1]], [3],
    ),
    "rows_differ": (
        [-1, 0, 0, 2],
        [[1, 4, 5, 6], [2, 3, 3, 3]],
        [[0, 1, 7, 5], [0, 7, 2, 3]],
        [1, 2],
        [[0, 1, -1], [0, 2, 3]],
        [4, 3],
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(HAND_BUILT))
@pytest.mark.parametrize("implementation", ["dispatch", "reference"])
def test_hand_built(case: str, implementation: str, poison_empty) -> None:
    parents, argmax_tokens, tokens, accept_len, nodes, next_token = HAND_BUILT[case]
    fn = greedy_verify if implementation == "dispatch" else greedy_verify_reference
    logits = one_hot_logits(argmax_tokens).to(DEVICE)
    result = fn(logits, torch.tensor(tokens, device=DEVICE), parents)
    expected = VerifyResult(torch.tensor(accept_len), torch.tensor(nodes), torch.tensor(next_token))
    assert_result(result, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_argmax_ties_go_to_the_first_token(dtype: torch.dtype, poison_empty) -> None:
    """Token 2 and token 2500 share the root's maximum (across vocabulary chunks): 2 wins."""
    V = 3000
    logits = torch.zeros(1, 3, V, dtype=dtype, device=DEVICE)
    logits[0, 0, [2, 2500]] = 4.0
    logits[0, 1, [V - 1]] = -1.0  # all others 0: argmax is the first 0, token 0
    tokens = torch.tensor([[7, 2500, 2]], device=DEVICE)
    result = greedy_verify(logits, tokens, torch.tensor([-1, 0, 0]))
    assert_result(
        result, VerifyResult(torch.tensor([1]), torch.tensor([[0, 2]]), torch.tensor([0]))
    )


def test_strided_logits_and_all_minus_inf_rows(poison_empty) -> None:
    full = torch.randn(2, 9, 40, device=DEVICE)
    full[1, 2] = float("-inf")  # argmax of an all -inf row is token 0, as in torch.argmax
    logits = full[:, 2:7]  # (2, 5, 40), not contiguous over nodes
    parents = [-1, 0, 1, 1, 3]
    amax = logits.argmax(-1)
    tokens = torch.stack([amax[:, 0], amax[:, 0], amax[:, 1], amax[:, 1], amax[:, 3]], dim=1)
    tokens[:, 0] = 11
    assert_result(greedy_verify(logits, tokens, parents), oracle(logits, tokens, parents))


def test_msn_kernels_torch_forces_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(gv, "greedy_verify_triton", lambda *a: calls.append(a))
    monkeypatch.setenv("MSN_KERNELS", "torch")
    result = greedy_verify(torch.randn(1, 2, 5), torch.tensor([[0, 1]]), [-1, 0])
    assert not calls and isinstance(result, VerifyResult)
    monkeypatch.delenv("MSN_KERNELS")
    greedy_verify(torch.randn(1, 2, 5), torch.tensor([[0, 1]]), [-1, 0])
    assert len(calls) == 1


@st.composite
def verify_inputs(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Random tree, small-integer logits (many ties), tokens that often match their parent."""
    T = draw(st.integers(1, 24))
    B = draw(st.integers(1, 3))
    V = draw(st.sampled_from([3, 17, 1100]))
    parents = [-1] + [draw(st.integers(0, i - 1)) for i in range(1, T)]
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randint(-3, 4, (B, T, V), generator=gen).float()
    amax = logits.argmax(-1)  # (B, T)
    parent_index = torch.tensor(parents).clamp(min=0)
    tokens = torch.where(torch.rand(B, T, generator=gen) < 0.75, amax[:, parent_index],
                         torch.randint(-1, V, (B, T), generator=gen))  # fmt: skip
    return logits, tokens, parents


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(verify_inputs())
def test_random_trees_match_the_oracle(inputs: tuple[torch.Tensor, torch.Tensor, list[int]]):
    logits, tokens, parents = (inputs[0].to(DEVICE), inputs[1].to(DEVICE), inputs[2])
    expected = oracle(logits, tokens, parents)
    assert_result(greedy_verify(logits, tokens, parents), expected)
    assert_result(greedy_verify_reference(logits, tokens, torch.tensor(parents)), expected)


@pytest.mark.parametrize(
    ("logits", "tokens", "parents", "message"),
    [
        (torch.randn(2, 3), torch.zeros(2, 3, dtype=torch.long), [-1, 0, 0], r"\[B, T, V\]"),
        (torch.randn(1, 3, 5), torch.zeros(1, 4, dtype=torch.long), [-1, 0, 0], "shape"),
        (torch.randn(1, 3, 5), torch.zeros(1, 3), [-1, 0, 0], "integer tensor"),
        (torch.randn(1, 3, 5), torch.zeros(1, 3, dtype=torch.long), [-1, 0], "2 entries"),
        (torch.randn(1, 3, 5), torch.zeros(1, 3, dtype=torch.long), [0, 0, 0], "must be -1"),
        (torch.randn(1, 3, 5), torch.zeros(1, 3, dtype=torch.long), [-1, 0, 2], "parents"),
        (torch.randn(1, 3, 5), torch.zeros(1, 3, dtype=torch.long), torch.zeros(3), "1-d integer"),
        (torch.ones(1, 3, 5, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long), [-1, 0, 0],
         "floating point"),
    ],
)  # fmt: skip
def test_validation_errors(logits, tokens, parents, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        greedy_verify(logits, tokens, parents)


@pytest.mark.parametrize("T", [69, 128, 256])
def test_large_trees_match_the_oracle(T: int, poison_empty) -> None:
    """The walk kernel's widest configurations (T_PAD = 128, 256), which the property test skips."""
    rng = random.Random(T)
    for seed in range(3):
        # Deep and bushy trees: parents drawn from the last few nodes.
        parents = [-1] + [rng.randrange(max(0, i - 4), i) for i in range(1, T)]
        gen = torch.Generator().manual_seed(seed)
        logits = torch.randint(-3, 4, (2, T, 300), generator=gen).float()
        amax = logits.argmax(-1)
        tokens = torch.where(torch.rand(2, T, generator=gen) < 0.85,
                             amax[:, torch.tensor(parents).clamp(min=0)],
                             torch.randint(-1, 300, (2, T), generator=gen))  # fmt: skip
        logits, tokens = logits.to(DEVICE), tokens.to(DEVICE)
        assert_result(greedy_verify(logits, tokens, parents), oracle(logits, tokens, parents))


@pytest.mark.skipif(DEVICE.type == "cpu" and not gv.use_triton(gv._argmax_partial_kernel, DEVICE),
                    reason="the limit is the Triton kernel's")  # fmt: skip
def test_trees_over_256_nodes_are_a_clear_error() -> None:
    T = gv.MAX_TRITON_NODES + 1
    logits = torch.zeros(1, T, 4, device=DEVICE)
    tokens = torch.zeros(1, T, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="at most 256 nodes, got T=257"):
        greedy_verify(logits, tokens, [-1] + list(range(T - 1)))
