"""Properties of MSN noise: `add_noise` (the paper's procedure) and its batched form."""

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from msn.noise import add_noise, add_noise_batch


def seed_procedure(ids: list[int], source_len: int, noise_len: int, rng: random.Random):
    """The contract in DESIGN.md, restated literally."""
    ids = list(ids)
    start = rng.randrange(source_len, len(ids) - noise_len)
    for i in range(start, start + noise_len):
        ids[i] = rng.choice(ids[:i])
    return ids


@st.composite
def examples(draw, min_response: int = 0):
    """(ids, source_len, noise_len) with tokens from a small vocabulary, so repeats happen."""
    noise_len = draw(st.integers(0, 8))
    source_len = draw(st.integers(0, 20))
    response = draw(st.integers(min_response, 40))
    ids = draw(
        st.lists(st.integers(0, 50), min_size=source_len + response, max_size=source_len + response)
    )
    return ids, source_len, noise_len


def changed(a, b) -> list[int]:
    return [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]


@settings(max_examples=300, deadline=None)
@given(examples(), st.integers(0, 2**32))
def test_prompt_and_last_token_never_change(example, seed):
    ids, source_len, noise_len = example
    noised = add_noise(ids, source_len, noise_len, random.Random(seed))
    assert len(noised) == len(ids)
    assert noised[:source_len] == ids[:source_len]
    if ids:
        assert noised[-1] == ids[-1]


@settings(max_examples=300, deadline=None)
@given(examples(), st.integers(0, 2**32))
def test_changes_lie_in_one_span_inside_the_response(example, seed):
    ids, source_len, noise_len = example
    noised = add_noise(ids, source_len, noise_len, random.Random(seed))
    diff = changed(ids, noised)
    if diff:
        assert diff[0] >= max(source_len, 1)
        assert diff[-1] - diff[0] < noise_len
        assert diff[-1] < len(ids) - 1


@settings(max_examples=300, deadline=None)
@given(examples(), st.integers(0, 2**32))
def test_each_replacement_occurs_earlier_in_the_noised_sequence(example, seed):
    ids, source_len, noise_len = example
    noised = add_noise(ids, source_len, noise_len, random.Random(seed))
    for i in changed(ids, noised):
        assert noised[i] in noised[:i]


@settings(max_examples=200, deadline=None)
@given(examples(), st.integers(0, 2**32))
def test_seeded_rng_reproduces(example, seed):
    ids, source_len, noise_len = example
    first = add_noise(ids, source_len, noise_len, random.Random(seed))
    assert add_noise(ids, source_len, noise_len, random.Random(seed)) == first


@settings(max_examples=300, deadline=None)
@given(examples(), st.integers(0, 2**32))
def test_equals_the_seed_procedure_when_the_span_fits(example, seed):
    ids, source_len, noise_len = example
    if source_len < 1 or len(ids) - source_len <= noise_len:
        return  # the seed procedure would raise here; covered by the short-response tests
    expected = seed_procedure(ids, source_len, noise_len, random.Random(seed))
    assert add_noise(ids, source_len, noise_len, random.Random(seed)) == expected


@settings(max_examples=100, deadline=None)
@given(examples(), st.integers(0, 2**32))
def test_tensor_in_tensor_out_and_input_untouched(example, seed):
    ids, source_len, noise_len = example
    tensor = torch.tensor(ids, dtype=torch.int32)
    before = tensor.clone()
    noised = add_noise(tensor, source_len, noise_len, random.Random(seed))
    assert isinstance(noised, torch.Tensor) and noised.dtype == torch.int32
    assert torch.equal(tensor, before)
    assert noised.tolist() == add_noise(ids, source_len, noise_len, random.Random(seed))


def test_list_input_is_not_mutated():
    ids = list(range(30))
    add_noise(ids, 5, 5, random.Random(0))
    assert ids == list(range(30))


@pytest.mark.parametrize(
    ("length", "source_len", "noise_len"), [(12, 3, 5), (40, 10, 5), (8, 1, 3)]
)
def test_span_starts_cover_their_whole_range(length, source_len, noise_len):
    ids = list(range(100, 100 + length))  # distinct tokens: the first change marks the start
    starts = set()
    for seed in range(2000):
        noised = add_noise(ids, source_len, noise_len, random.Random(seed))
        starts.add(changed(ids, noised)[0] if changed(ids, noised) else None)
    # A replacement may draw the token it replaces only when it was moved there by noise, which
    # distinct tokens rule out for the first position of the span.
    assert starts == set(range(source_len, length - noise_len))


@pytest.mark.parametrize(("response", "expected_span"), [(0, 0), (1, 0), (2, 1), (5, 4), (6, 5)])
def test_short_responses_get_a_shorter_span_or_none(response, expected_span):
    ids = list(range(100, 110 + response))[: 10 + response]
    for seed in range(50):
        noised = add_noise(ids, 10, 5, random.Random(seed))
        diff = changed(ids, noised)
        assert len(diff) == expected_span  # distinct tokens: every replacement differs
        assert noised[-1] == ids[-1] if ids else True


def test_whole_sequence_is_prompt_or_empty():
    assert add_noise([], 0, 5, random.Random(0)) == []
    assert add_noise([1, 2, 3], 3, 5, random.Random(0)) == [1, 2, 3]
    assert add_noise([1, 2, 3], 10, 5, random.Random(0)) == [1, 2, 3]


def test_invalid_arguments_raise_value_error():
    with pytest.raises(ValueError, match="noise_len"):
        add_noise([1, 2, 3], 1, -1)
    with pytest.raises(ValueError, match="1-D"):
        add_noise(torch.zeros(2, 3, dtype=torch.long), 1)


# Batched form.


@st.composite
def batches(draw):
    batch = draw(st.integers(1, 6))
    width = draw(st.integers(1, 40))
    lengths = draw(st.lists(st.integers(0, width), min_size=batch, max_size=batch))
    sources = [draw(st.integers(0, n + 2)) for n in lengths]
    spans = draw(st.lists(st.integers(0, 4), min_size=batch, max_size=batch))
    return width, lengths, sources, spans


PAD = 999


def make_batch(width, lengths, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 30, (len(lengths), width), generator=g)
    for b, n in enumerate(lengths):
        ids[b, n:] = PAD
    return ids


@settings(max_examples=200, deadline=None)
@given(batches(), st.integers(1, 8), st.integers(0, 2**32))
def test_batch_keeps_prompt_last_token_and_padding(case, noise_len, seed):
    width, lengths, sources, spans = case
    ids = make_batch(width, lengths, seed)
    before = ids.clone()
    noised = add_noise_batch(
        ids,
        torch.tensor(sources),
        torch.tensor(lengths),
        noise_len,
        num_spans=torch.tensor(spans),
        generator=torch.Generator().manual_seed(seed),
    )
    assert torch.equal(ids, before)
    for b, (n, s, k) in enumerate(zip(lengths, sources, spans, strict=True)):
        row, clean = noised[b].tolist(), before[b].tolist()
        assert row[:s] == clean[:s]
        assert row[n:] == clean[n:]
        if n:
            assert row[n - 1] == clean[n - 1]
        diff = changed(clean, row)
        assert len(diff) <= k * noise_len
        for i in diff:
            assert row[i] in row[:i]


@settings(max_examples=200, deadline=None)
@given(batches(), st.integers(1, 8), st.integers(0, 2**32))
def test_batch_with_one_span_changes_one_span(case, noise_len, seed):
    width, lengths, sources, _ = case
    ids = make_batch(width, lengths, seed)
    noised = add_noise_batch(
        ids,
        torch.tensor(sources),
        torch.tensor(lengths),
        noise_len,
        generator=torch.Generator().manual_seed(seed),
    )
    for b in range(len(lengths)):
        diff = changed(ids[b].tolist(), noised[b].tolist())
        if diff:
            assert diff[-1] - diff[0] < noise_len


def test_batch_is_reproducible_and_noise_fraction_selects_rows():
    ids = torch.arange(64 * 50).reshape(64, 50) % 1000 + 1  # distinct within each row
    sources, lengths = torch.full((64,), 10), torch.full((64,), 50)

    def run(fraction, seed=0):
        g = torch.Generator().manual_seed(seed)
        return add_noise_batch(ids, sources, lengths, 5, noise_fraction=fraction, generator=g)

    assert torch.equal(run(0.5), run(0.5))
    assert not torch.equal(run(0.5, seed=0), run(0.5, seed=1))
    assert torch.equal(run(0.0), ids)
    assert (run(1.0) != ids).any(dim=1).all()
    noised_rows = (run(0.5) != ids).any(dim=1).sum().item()
    assert 16 < noised_rows < 48


def test_batch_span_starts_cover_their_whole_range():
    ids = (torch.arange(12) + 100).repeat(4000, 1)
    noised = add_noise_batch(
        ids, torch.full((4000,), 3), None, 5, generator=torch.Generator().manual_seed(0)
    )
    first = (noised != ids).int().argmax(dim=1)
    assert set(first.tolist()) == set(range(3, 7))


def test_batch_matches_single_example_distribution_of_span_lengths():
    """Shortened spans: the response of 4 tokens allows 3 replacements, as in add_noise."""
    ids = (torch.arange(14) + 100).repeat(200, 1)
    noised = add_noise_batch(
        ids, torch.full((200,), 10), None, 5, generator=torch.Generator().manual_seed(0)
    )
    assert ((noised != ids).sum(dim=1) == 3).all()
