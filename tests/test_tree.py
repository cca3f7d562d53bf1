import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from msn.tree import (
    JACOBI,
    MC_SIM_7B_63,
    RETRIEVAL,
    ROOT,
    TreeSpec,
    chain_tree,
    comb_tree,
    pack_mask,
    paper_tree,
    parse_tree,
    unpack_mask,
)


def brute_force_mask(parents: tuple[int, ...]) -> torch.Tensor:
    t = len(parents)
    mask = torch.zeros(t, t, dtype=torch.bool)
    for i in range(t):
        j = i
        while j >= 0:
            mask[i, j] = True
            j = parents[j]
    return mask


def check_invariants(tree: TreeSpec) -> None:
    t = tree.num_nodes
    assert tree.parents[0] == -1 and tree.depths[0] == 0 and tree.kinds[0] == ROOT
    for i in range(1, t):
        assert 0 <= tree.parents[i] < i
        assert tree.depths[i] == tree.depths[tree.parents[i]] + 1
    assert list(tree.depths) == sorted(tree.depths)
    assert torch.equal(tree.mask, brute_force_mask(tree.parents))
    assert torch.equal(unpack_mask(tree.mask_bits, t), tree.mask)
    assert tree.mask_bits.shape == (t, -(-t // 64))
    # Every leaf appears once in paths, every path is a root-to-leaf chain.
    assert tree.paths.shape == (len(tree.leaves), tree.max_depth + 1)
    for row, leaf in zip(tree.paths.tolist(), tree.leaves, strict=True):
        nodes = [n for n in row if n >= 0]
        assert nodes[0] == 0 and nodes[-1] == leaf
        assert all(tree.parents[b] == a for a, b in zip(nodes, nodes[1:], strict=False))
        assert row[len(nodes) :] == [-1] * (len(row) - len(nodes))


def test_paper_tree_shape():
    tree = paper_tree()
    assert tree.num_nodes == 69
    assert tree.max_depth == 5
    assert tree.kinds.count(JACOBI) == 63
    assert tree.kinds.count(RETRIEVAL) == 5
    assert tree.top_k == (10, 10, 10, 2, 0)
    assert tree.max_top_k == 10
    assert [tree.depths[i] for i in tree.retrieval_nodes] == [1, 2, 3, 4, 5]
    assert tree.parents[tree.retrieval_nodes[0]] == 0
    assert all(tree.ranks[i] == -1 for i in tree.retrieval_nodes)
    check_invariants(tree)


def test_paper_tree_node_tokens_follow_rank_paths():
    tree = paper_tree()
    node_paths = set()
    for i in range(1, tree.num_nodes):
        if tree.kinds[i] == JACOBI:
            node_paths.add(tuple(tree.ranks[n] for n in tree.ancestors(i)[1:]))
    assert node_paths == set(MC_SIM_7B_63)


def test_without_retrieval():
    tree = paper_tree().without_retrieval()
    assert tree == paper_tree(retrieval=False)
    assert tree.num_nodes == 64 and tree.max_depth == 4 and not tree.has_retrieval
    assert tree.mask_bits.shape == (64, 1)
    check_invariants(tree)


def test_chain_tree():
    tree = chain_tree(5)
    assert tree.parents == (-1, 0, 1, 2, 3, 4)
    assert tree.ranks == (-1, 0, 0, 0, 0, 0)
    assert tree.top_k == (1, 1, 1, 1, 1)
    assert tree.leaves == (5,)
    assert tree.paths.tolist() == [[0, 1, 2, 3, 4, 5]]
    assert torch.equal(tree.mask, torch.tril(torch.ones(6, 6, dtype=torch.bool)))
    assert comb_tree([1] * 5) == tree


def test_comb_tree_and_parse():
    tree = comb_tree([10, 1, 1], retrieval_depth=2)
    assert tree.num_nodes == 1 + 12 + 2
    assert tree.top_k == (10, 1, 1)
    assert parse_tree("comb:10,1,1+r2") == tree
    assert parse_tree("chain:3") == chain_tree(3)
    assert parse_tree("paper") == paper_tree()
    assert parse_tree("paper-noretrieval") == paper_tree(retrieval=False)
    check_invariants(tree)


@pytest.mark.parametrize("spec", ["tree", "chain", "chain:x", "comb:0", "paper:3"])
def test_parse_tree_errors(spec):
    with pytest.raises(ValueError, match="tree spec"):
        parse_tree(spec)


def test_normalisation_order_independent():
    shuffled = list(reversed(MC_SIM_7B_63))
    assert TreeSpec.build([list(p) for p in shuffled], retrieval_depth=5) == paper_tree()
    assert hash(TreeSpec.build(shuffled, retrieval_depth=5)) == hash(paper_tree())


def test_retrieval_only_and_root_only():
    tree = TreeSpec.build([], retrieval_depth=3)
    assert tree.parents == (-1, 0, 1, 2)
    assert tree.top_k == (0, 0, 0) and tree.max_top_k == 0
    root = TreeSpec.build([])
    assert root.num_nodes == 1 and root.max_depth == 0 and root.paths.tolist() == [[0]]


@pytest.mark.parametrize(
    ("paths", "retrieval_depth", "message"),
    [
        ([[0], [1, 0]], 0, r"prefix \[1\]"),
        ([[0], [0, -1]], 0, "negative rank"),
        ([[0], []], 0, "empty rank path"),
        ([[0], [0]], 0, "duplicate"),
        ([[0], [0.5]], 0, "non-integer"),
        ([0, 1], 0, "sequence of ints"),
        ([[0]], -1, "retrieval_depth"),
    ],
)
def test_validation_errors(paths, retrieval_depth, message):
    with pytest.raises(ValueError, match=message):
        TreeSpec.build(paths, retrieval_depth=retrieval_depth)


def test_too_deep():
    with pytest.raises(ValueError, match="max_depth=3"):
        TreeSpec.build([[0], [0, 0], [0, 0, 0], [0, 0, 0, 0]], max_depth=3)
    with pytest.raises(ValueError, match="max_depth=4"):
        TreeSpec.build(MC_SIM_7B_63, retrieval_depth=5, max_depth=4)
    assert TreeSpec.build(MC_SIM_7B_63, retrieval_depth=5, max_depth=5) == paper_tree()
    with pytest.raises(ValueError, match="chain depth"):
        chain_tree(0)


def test_tensors_cached_per_device():
    tree = paper_tree()
    tensors = tree.tensors_on("cpu")
    assert tree.tensors_on(torch.device("cpu")) is tensors
    assert tree.mask_on("cpu") is tensors.mask
    assert tensors.parents.tolist() == list(tree.parents)
    assert tensors.depths.tolist() == list(tree.depths)
    assert tensors.ranks.tolist() == list(tree.ranks)
    assert tensors.is_retrieval.nonzero().flatten().tolist() == list(tree.retrieval_nodes)
    assert torch.equal(tensors.mask_bits, tree.mask_bits)


@pytest.mark.parametrize("word_bits", [32, 64])
@pytest.mark.parametrize("t", [1, 31, 32, 33, 63, 64, 65, 69, 130])
def test_pack_round_trip(word_bits, t):
    mask = torch.rand(3, t, t, generator=torch.Generator().manual_seed(t)) < 0.5
    mask[..., -1] = True  # the top bit of the last word, where it is a full word
    words = pack_mask(mask, word_bits)
    assert words.dtype == (torch.int32 if word_bits == 32 else torch.int64)
    assert words.shape == (3, t, -(-t // word_bits))
    assert torch.equal(unpack_mask(words, t), mask)


def test_pack_bit_layout():
    mask = torch.zeros(1, 70, dtype=torch.bool)
    mask[0, [0, 3, 63, 64, 69]] = True
    words = pack_mask(mask)[0].tolist()
    assert words[0] == (1 | 1 << 3) - 2**63
    assert words[1] == 1 | 1 << 5
    assert pack_mask(mask, 32)[0].tolist() == [1 | 1 << 3, -(2**31), 1 | 1 << 5]


def test_pack_errors():
    with pytest.raises(ValueError, match="word_bits"):
        pack_mask(torch.ones(2, 2, dtype=torch.bool), 16)
    with pytest.raises(ValueError, match="int32 or int64"):
        unpack_mask(torch.ones(2, 1, dtype=torch.int16), 2)


@st.composite
def rank_path_sets(draw):
    paths: list[tuple[int, ...]] = []
    for _ in range(draw(st.integers(0, 30))):
        parent = draw(st.sampled_from([(), *paths]))
        if len(parent) < 6:
            candidate = parent + (draw(st.integers(0, 4)),)
            if candidate not in paths:
                paths.append(candidate)
    return paths


@settings(max_examples=60, deadline=None)
@given(rank_path_sets(), st.integers(0, 7), st.randoms(use_true_random=False))
def test_random_trees(paths, retrieval_depth, rnd):
    rnd.shuffle(paths)
    tree = TreeSpec.build(paths, retrieval_depth=retrieval_depth)
    assert tree.num_nodes == 1 + len(paths) + retrieval_depth
    assert set(tree.rank_paths) == set(paths)
    check_invariants(tree)
