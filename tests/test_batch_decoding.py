"""Batched decoding: every row equals that prompt's own msn.generate (the reference)."""

import pytest
import torch
from conftest import save_tiny_llama
from transformers import LlamaForCausalLM

import msn
from msn.acceptance import AcceptanceStats
from msn.autotree import BuiltTree
from msn.batch_decoding import BatchShare, pad_trees, verify_row_trees
from msn.latency import LatencyProfile
from msn.tree import comb_tree
from msn_kernels import greedy_verify_reference

NEW_TOKENS = 24
# Flat up to 8 tokens, then 1 ms per token: trees pay at batch 1 and shrink in a batch.
FLAT = LatencyProfile.synthetic(0.01, 8, 0.001)


@pytest.fixture(scope="module")
def tiny_fp64(tmp_path_factory):
    path = tmp_path_factory.mktemp("batch-model")
    save_tiny_llama(path, max_position_embeddings=128)
    return msn.load_model(path, dtype=torch.float64), path


def ragged_prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(11)
    random = [torch.randint(2, 320, (n,), generator=generator).tolist() for n in (5, 23, 12)]
    return [*random, [11, 12, 13, 14] * 5, [42] * 7 + [43, 44] * 3]


def auto_options(retrieval: bool = True) -> dict:
    return dict(method="tr-jacobi", latency=FLAT, acceptance=AcceptanceStats(), retrieval=retrieval)


FIXED = {
    "greedy": dict(method="greedy"),
    "jacobi": dict(method="jacobi"),
    "paper": dict(method="tr-jacobi", tree="paper"),
    "comb-noretrieval": dict(method="tr-jacobi", tree=comb_tree([3, 2, 1]), retrieval=False),
}


def per_prompt(model, prompts, max_new_tokens, **options):
    return [msn.generate(model, p, max_new_tokens, **options) for p in prompts]


def assert_same_outputs(batch, reference, same_steps: bool):
    assert len(batch) == len(reference)
    for i, (got, want) in enumerate(zip(batch, reference, strict=True)):
        assert torch.equal(got.output_ids, want.output_ids), i
        assert (got.new_tokens, got.stop_reason) == (want.new_tokens, want.stop_reason), i
        assert got.steps == len(got.accept_lengths)
        assert sum(got.accept_lengths) == max(got.new_tokens - 1, 0)
        if same_steps:  # the same decoder state per row: the same steps, not just the output
            assert got.accept_lengths == want.accept_lengths, i


@pytest.mark.parametrize("name", FIXED)
def test_fixed_methods_equal_generate_row_by_row(tiny_fp64, name):
    model, _ = tiny_fp64
    prompts = ragged_prompts()
    options = FIXED[name]
    reference = per_prompt(model, prompts, NEW_TOKENS, eos_token_id=[], **options)
    batch = msn.generate_batch(model, prompts, NEW_TOKENS, eos_token_id=[], **options)
    assert_same_outputs(batch, reference, same_steps=True)
    assert all(r.method == options["method"] for r in batch)


@pytest.mark.parametrize("retrieval", [True, False], ids=["retrieval", "noretrieval"])
def test_auto_tree_equals_generate(tiny_fp64, retrieval):
    model, _ = tiny_fp64
    prompts = ragged_prompts()
    reference = per_prompt(model, prompts, NEW_TOKENS, eos_token_id=[], method="greedy")
    batch = msn.generate_batch(
        model, prompts, NEW_TOKENS, eos_token_id=[], **auto_options(retrieval)
    )
    assert_same_outputs(batch, reference, same_steps=False)
    assert all(r.tree["tree"] == "auto" for r in batch)


def test_rows_finish_at_different_times_and_slots_are_refilled(tiny_fp64):
    model, _ = tiny_fp64
    prompts = ragged_prompts()
    free = per_prompt(model, prompts, NEW_TOKENS, eos_token_id=[], method="greedy")
    new = [r.output_ids[0, len(p) :].tolist() for r, p in zip(free, prompts, strict=True)]
    eos = [new[0][2], new[2][9]]  # row 0 stops early, row 2 later; others may run to the end
    reference = per_prompt(model, prompts, NEW_TOKENS, eos_token_id=eos, method="greedy")
    lengths = {r.new_tokens for r in reference}
    reasons = {r.stop_reason for r in reference}
    assert len(lengths) >= 2 and reasons == {"eos", "max_new_tokens"}  # the setup holds
    for options in (*FIXED.values(), auto_options()):
        for batch_size in (None, 2):  # all at once (rows move), or a queue refilling slots
            batch = msn.generate_batch(
                model, prompts, NEW_TOKENS, eos_token_id=eos, batch_size=batch_size, **options
            )
            assert_same_outputs(batch, reference, same_steps=options["method"] == "greedy")


def test_finished_rows_cost_no_forward_work(tiny_fp64):
    model, _ = tiny_fp64
    prompts = ragged_prompts()
    free = per_prompt(model, prompts[:1], NEW_TOKENS, eos_token_id=[], method="greedy")
    eos = [free[0].output_ids[0, len(prompts[0]) + 3].item()]
    widths = []

    def record(module, args, kwargs):
        if kwargs.get("cache_lens") is not None:
            widths.append(args[0].shape[0])

    hook = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        batch = msn.generate_batch(
            model, prompts, NEW_TOKENS, eos_token_id=eos, tree="paper", batch_size=3
        )
    finally:
        hook.remove()
    # Each decoding pass feeds exactly the rows still decoding: one row-pass per row-step.
    assert sum(widths) == sum(r.steps for r in batch)
    assert max(widths) == 3 and widths[-1] < 3


def test_no_new_tokens_and_a_batch_of_one(tiny_fp64):
    model, _ = tiny_fp64
    prompts = ragged_prompts()
    for options in (*FIXED.values(), auto_options()):
        results = msn.generate_batch(model, prompts, 0, **options)
        for result, prompt in zip(results, prompts, strict=True):
            assert result.output_ids[0].tolist() == prompt
            assert (result.new_tokens, result.steps, result.stop_reason) == (
                0,
                0,
                "max_new_tokens",
            )
    for options in FIXED.values():
        (one,) = msn.generate_batch(model, [prompts[1]], NEW_TOKENS, **options)
        want = msn.generate(model, prompts[1], NEW_TOKENS, **options)
        assert_same_outputs([one], [want], same_steps=True)


def test_prompts_as_tensors_and_a_transformers_model(tiny_fp64):
    model, path = tiny_fp64
    prompts = ragged_prompts()[:3]
    want = msn.generate_batch(model, prompts, 10, tree="paper", eos_token_id=[])
    as_tensors = [torch.tensor(p) for p in prompts]
    got = msn.generate_batch(model, as_tensors, 10, tree="paper", eos_token_id=[])
    assert_same_outputs(got, want, same_steps=True)
    hf = LlamaForCausalLM.from_pretrained(path, dtype=torch.float64)
    from_hf = msn.generate_batch(hf, prompts, 10, tree="paper", eos_token_id=[])
    assert_same_outputs(from_hf, want, same_steps=True)


def test_end_of_context_matches_generate(tiny_fp64):
    model, _ = tiny_fp64
    limit = model.max_seq_len
    prompts = [[5, 6, 7], (torch.arange(limit - 6) % 300 + 2).tolist()]
    with pytest.warns(UserWarning, match="end of the model's context"):
        reference = per_prompt(model, prompts, 30, eos_token_id=[], tree="paper")
    with pytest.warns(UserWarning, match=r"prompts \[1\] stopped at the end"):
        batch = msn.generate_batch(model, prompts, 30, eos_token_id=[], tree="paper")
    assert_same_outputs(batch, reference, same_steps=True)
    assert [r.stop_reason for r in batch] == ["max_new_tokens", "context"]


def test_bad_inputs_name_the_prompt_and_the_fix(tiny_fp64):
    model, _ = tiny_fp64
    limit = model.max_seq_len
    with pytest.raises(ValueError, match="prompts is empty"):
        msn.generate_batch(model, [])
    with pytest.raises(ValueError, match=r"prompts\[2\] has 129 tokens, more than .* 128; shorten"):
        msn.generate_batch(model, [[3], [4, 5], [6] * (limit + 1)])
    with pytest.raises(ValueError, match=r"prompts\[1\]: input_ids is empty"):
        msn.generate_batch(model, [[3], []])
    with pytest.raises(ValueError, match=r"prompts\[0\]: .*outside the model's vocabulary"):
        msn.generate_batch(model, [[3, 10_000]])
    with pytest.raises(ValueError, match=r"msn.generate\(model, prompt, do_sample=True"):
        msn.generate_batch(model, [[3]], do_sample=True)
    with pytest.raises(ValueError, match="unknown method"):
        msn.generate_batch(model, [[3]], method="beam")
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        msn.generate_batch(model, [[3]], batch_size=0)
    with pytest.raises(ValueError, match="must be a list of prompts"):
        msn.generate_batch(model, "hello")


def random_tree(generator: torch.Generator, size: int) -> BuiltTree:
    parents = [-1] + [int(torch.randint(0, i, (1,), generator=generator)) for i in range(1, size)]
    depths = [0]
    for parent in parents[1:]:
        depths.append(depths[parent] + 1)
    tokens = torch.randint(0, 6, (size,), generator=generator).tolist()
    return BuiltTree(
        tokens=tuple(tokens),
        parents=tuple(parents),
        depths=tuple(depths),
        keys=(None,) * size,
        values=(1.0,) * size,
        seconds=1.0,
    )


def test_verify_row_trees_equals_greedy_verify_per_row():
    generator = torch.Generator().manual_seed(3)
    for _ in range(20):
        trees = [random_tree(generator, n) for n in (1, 7, 4, 9)]
        padded = pad_trees([None, *trees[1:]], [t.tokens[0] for t in trees])
        size = len(padded.tokens[0])
        # A vocabulary of 6 and few logit values: many matches, and ties in the argmax.
        logits = torch.randint(0, 3, (len(trees), size, 6), generator=generator).double()
        depths = torch.tensor(padded.depths)
        verdict = verify_row_trees(
            logits,
            torch.tensor(padded.checked),
            torch.tensor(padded.parents),
            torch.tensor(padded.ancestors),
            depths,
            padded.path_len,
        )
        for b, tree in enumerate(trees):
            n = 1 if b == 0 else tree.num_nodes
            parents = [-1] if b == 0 else list(tree.parents)
            tokens = torch.tensor([padded.checked[b][:n]])
            want = greedy_verify_reference(logits[b : b + 1, :n], tokens, parents)
            assert int(verdict.accept_len[b]) == int(want.accept_len[0])
            assert int(verdict.next_token[b]) == int(want.next_token[0])
            nodes = verdict.accepted_nodes[b].tolist()
            width = want.accepted_nodes.shape[1]
            assert nodes[:width] == want.accepted_nodes[0].tolist()
            assert all(node == -1 for node in nodes[width:])


def test_batch_share_charges_a_row_its_part_of_the_batched_step():
    profile = LatencyProfile((1, 8, 64), (0.010, 0.012, 0.100), prefix_slope=1e-5)
    one, eight = BatchShare(profile, 1), BatchShare(profile, 8)
    assert one.max_tokens == 64 and eight.max_tokens == 8
    assert one.step_time(3, 256) == pytest.approx(profile.step_time(3, 256))
    assert eight.step_time(1) == pytest.approx(profile.step_time(8) / 8)
    assert eight.step_time(8) == pytest.approx(0.100 / 8)
    # The marginal cost of a node grows with the batch: trees shrink as rows are added.
    assert eight.step_time(2) / eight.step_time(1) > one.step_time(2) / one.step_time(1)


def test_auto_trees_shrink_with_the_batch(tiny_fp64):
    model, _ = tiny_fp64
    prompts = [ragged_prompts()[3]] * 8
    options = dict(eos_token_id=[], method="tr-jacobi", acceptance=AcceptanceStats())
    (alone,) = msn.generate_batch(model, prompts[:1], 12, latency=FLAT, **options)
    batch = msn.generate_batch(model, prompts, 12, latency=FLAT, **options)
    # At batch 8 a row may take at most 64 // 8 = 8 nodes of the 64-token profile.
    assert all(r.tree["mean_nodes"] <= 8 for r in batch)
    linear = LatencyProfile((1, 64), (0.01, 0.64))  # every token costs a full step: no tree pays
    greedy = msn.generate_batch(model, prompts, 12, latency=linear, **options)
    assert all(r.tree["mean_nodes"] == 1.0 for r in greedy)
    assert alone.tree["mean_nodes"] > 1.0
