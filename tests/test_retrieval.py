import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from msn.retrieval import NgramIndex, brute_force_lookup


def test_empty_and_no_match():
    index = NgramIndex()
    assert index.lookup() == []
    index.extend([1, 2, 3])
    assert index.lookup() == []
    assert brute_force_lookup([1, 2, 3]) == []
    assert brute_force_lookup([]) == []


def test_longest_suffix_wins():
    # "7 8" occurred before at 0..1 (followed by 9), "8" alone more recently (followed by 5).
    context = [7, 8, 9, 1, 8, 5, 7, 8]
    index = NgramIndex(max_ngram=3, draft_len=3)
    index.extend(context)
    assert index.lookup() == [9, 1, 8]
    assert brute_force_lookup(context, 3, 3) == [9, 1, 8]
    assert brute_force_lookup(context, 1, 3) == [5, 7, 8]


def test_most_recent_earlier_occurrence():
    context = [4, 1, 2, 5, 4, 1, 2, 6, 4, 1, 2]
    index = NgramIndex(draft_len=2)
    index.extend(context)
    assert index.lookup() == [6, 4]


def test_continuation_may_overlap_suffix():
    index = NgramIndex(max_ngram=3, draft_len=5)
    index.extend([1, 2, 1, 2, 1])
    # "1 2 1" ended at position 2; what follows runs into the suffix and to the end.
    assert index.lookup() == [2, 1]
    index.extend([3] * 5)
    assert index.lookup() == [3]
    assert index.lookup(draft_len=1) == [3]


def test_repeated_single_token():
    index = NgramIndex()
    index.extend([5])
    assert index.lookup() == []
    index.extend([5])
    assert index.lookup() == [5]


def test_extend_accepts_tensor_and_rejects_2d():
    index = NgramIndex()
    index.extend(torch.tensor([1, 2, 3, 1, 2]))
    assert index.tokens == (1, 2, 3, 1, 2)
    assert len(index) == 5
    assert index.lookup() == [3, 1, 2]
    with pytest.raises(ValueError, match="1-D"):
        index.extend(torch.tensor([[1, 2]]))


@pytest.mark.parametrize(("max_ngram", "draft_len"), [(0, 5), (3, 0)])
def test_bad_arguments(max_ngram, draft_len):
    with pytest.raises(ValueError, match="must be >= 1"):
        NgramIndex(max_ngram=max_ngram, draft_len=draft_len)


@settings(max_examples=300, deadline=None)
@given(
    tokens=st.lists(st.integers(0, 3), max_size=80),
    chunk_sizes=st.lists(st.integers(1, 7), min_size=1, max_size=20),
    max_ngram=st.integers(1, 4),
    draft_len=st.integers(1, 6),
)
def test_index_matches_brute_force(tokens, chunk_sizes, max_ngram, draft_len):
    index = NgramIndex(max_ngram=max_ngram, draft_len=draft_len)
    position, chunk = 0, 0
    while position < len(tokens):
        size = chunk_sizes[chunk % len(chunk_sizes)]
        index.extend(tokens[position : position + size])
        position += size
        chunk += 1
        expected = brute_force_lookup(tokens[:position], max_ngram, draft_len)
        assert index.lookup() == expected
