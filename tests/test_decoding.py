"""Decoders: lossless against greedy (and greedy against transformers), exact step counts."""

import importlib
import json

import pytest
import torch
from conftest import save_tiny_llama
from scripted_model import PROMPT, ScriptedModel, by_position, increasing, lagging
from transformers import LlamaForCausalLM

import msn
from msn.acceptance import AcceptanceStats
from msn.tree import chain_tree, comb_tree

NEW_TOKENS = 40


@pytest.fixture(scope="module")
def tiny_fp64(tmp_path_factory):
    path = tmp_path_factory.mktemp("decoding-model")
    save_tiny_llama(path, max_position_embeddings=128)
    return (
        msn.load_model(path, dtype=torch.float64),
        LlamaForCausalLM.from_pretrained(path, dtype=torch.float64),
    )


def prompts():
    generator = torch.Generator().manual_seed(7)
    random = [torch.randint(2, 320, (1, n), generator=generator) for n in (5, 17, 30)]
    repetitive = [torch.tensor([[11, 12, 13, 14] * 6]), torch.tensor([[42] * 9 + [43, 44] * 4])]
    return random + repetitive


@pytest.mark.parametrize("prompt", prompts(), ids=lambda p: f"len{p.shape[1]}")
def test_every_method_equals_greedy_and_greedy_equals_transformers(tiny_fp64, prompt):
    model, reference = tiny_fp64
    greedy = msn.generate(model, prompt, NEW_TOKENS, method="greedy", eos_token_id=[])
    expected = reference.generate(
        prompt, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    assert torch.equal(greedy.output_ids, expected)
    assert greedy.new_tokens == NEW_TOKENS and greedy.steps == NEW_TOKENS - 1
    for options in (
        dict(method="jacobi"),
        dict(method="tr-jacobi"),
        dict(method="tr-jacobi", retrieval=False),
        dict(method="tr-jacobi", tree=comb_tree([4, 2, 1], retrieval_depth=3)),
    ):
        result = msn.generate(model, prompt, NEW_TOKENS, eos_token_id=[], **options)
        assert torch.equal(result.output_ids, greedy.output_ids), options
        assert sum(result.accept_lengths) == NEW_TOKENS - 1
        assert result.steps == len(result.accept_lengths)


def test_cpu_fast_path_matches_float64_and_stays_lossless(tmp_path, monkeypatch):
    """float32 on CPU as users run it: SDPA attention and, from 4 tree tokens, oneDNN-packed
    linears. A tree pass matches the float64 model, and tr-jacobi (auto tree, comb tree) still
    equals greedy."""
    ta = importlib.import_module("msn_kernels.tree_attention")  # the package re-exports the name
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # dispatch as on a CPU without the interpreter
    sdpa_calls = []
    real_sdpa = ta.tree_attention_sdpa
    monkeypatch.setattr(
        ta, "tree_attention_sdpa", lambda *a, **kw: sdpa_calls.append(1) or real_sdpa(*a, **kw)
    )
    save_tiny_llama(tmp_path, max_position_embeddings=128, hidden_size=128, num_attention_heads=8)
    model, model64 = (msn.load_model(tmp_path, dtype=d) for d in (torch.float32, torch.float64))
    prompt = prompts()[2]
    tree = comb_tree([4, 2, 1], retrieval_depth=3)
    tokens = torch.randint(2, 320, (1, tree.num_nodes), generator=torch.Generator().manual_seed(1))
    logits = []
    for m in (model, model64):
        m.setup_cache(1, 128)
        with torch.no_grad():
            m(prompt)
            cache_lens = torch.tensor([prompt.shape[1]])
            positions = cache_lens[:, None] + torch.tensor(tree.depths)[None]
            logits.append(m(tokens, positions=positions, cache_lens=cache_lens,
                            tree_mask=tree.mask))  # fmt: skip
    assert sdpa_calls and model.lm_head._packed_key is not None  # both fast paths ran
    torch.testing.assert_close(logits[0].double(), logits[1], atol=1e-4, rtol=0)
    greedy = msn.generate(model, prompt, NEW_TOKENS, method="greedy", eos_token_id=[])
    for options in (dict(method="tr-jacobi"), dict(method="tr-jacobi", tree=tree)):
        result = msn.generate(model, prompt, NEW_TOKENS, eos_token_id=[], **options)
        assert torch.equal(result.output_ids, greedy.output_ids), options


def test_eos_from_the_checkpoint_and_from_a_list(tiny_fp64):
    model, _ = tiny_fp64
    prompt = prompts()[3]
    free = msn.generate(model, prompt, NEW_TOKENS, method="greedy", eos_token_id=[])
    new = free.output_ids[0, prompt.shape[1] :].tolist()
    eos = new[len(new) // 2]
    cut = new.index(eos) + 1
    for method in ("greedy", "jacobi", "tr-jacobi"):
        result = msn.generate(model, prompt, NEW_TOKENS, method=method, eos_token_id=[999, eos])
        assert result.output_ids[0, prompt.shape[1] :].tolist() == new[:cut]
        assert result.stop_reason == "eos"


def test_eos_list_from_the_checkpoint(tmp_path):
    save_tiny_llama(tmp_path)
    model = msn.load_model(tmp_path, dtype=torch.float64)
    prompt = [5, 9, 11, 5, 9]
    free = msn.generate(model, prompt, 30, method="greedy", eos_token_id=[])
    new = free.output_ids[0, len(prompt) :].tolist()
    config = json.loads((tmp_path / "config.json").read_text())
    config["eos_token_id"] = [999, new[7]]
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = msn.load_model(tmp_path, dtype=torch.float64)
    for method in ("greedy", "tr-jacobi"):
        result = msn.generate(model, prompt, 30, method=method)  # the checkpoint's EOS ids
        assert result.output_ids[0, len(prompt) :].tolist() == new[: new.index(new[7]) + 1]
        assert result.stop_reason == "eos"
    tensor_eos = msn.generate(model, prompt, 30, method="jacobi", eos_token_id=torch.tensor(new[7]))
    assert tensor_eos.stop_reason == "eos"


def test_generate_leaves_no_autograd_history(tiny_fp64):
    model, _ = tiny_fp64
    model.requires_grad_(True)
    try:
        msn.generate(model, [3, 4, 5], 10, method="tr-jacobi")
        assert not model.cache.k.requires_grad and model.cache.k.grad_fn is None
    finally:
        model.requires_grad_(False)


def test_prompt_filling_the_context_decodes_greedily_to_the_end(tiny_fp64):
    model, _ = tiny_fp64
    limit = model.max_seq_len
    for length in (limit - 40, limit - 3, limit):
        prompt = torch.arange(length)[None] % 300 + 2
        with pytest.warns(UserWarning, match="end of the model's context"):
            results = [
                msn.generate(model, prompt, 100, method=method, eos_token_id=[])
                for method in ("greedy", "jacobi", "tr-jacobi")
            ]
        for result in results:
            assert torch.equal(result.output_ids, results[0].output_ids)
            assert result.stop_reason == "context"
            assert result.output_ids.shape[1] == limit + 1


def test_prompt_longer_than_the_context_is_refused(tiny_fp64):
    model, _ = tiny_fp64
    with pytest.raises(ValueError, match="more than the model's context of 128"):
        msn.generate(model, torch.zeros(1, 129, dtype=torch.long))


def test_bad_arguments():
    model = ScriptedModel(by_position)
    with pytest.raises(ValueError, match="unknown method 'medusa'"):
        msn.generate(model, PROMPT, method="medusa")
    with pytest.raises(ValueError, match="one prompt"):
        msn.generate(model, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids is empty"):
        msn.generate(model, [])
    with pytest.raises(ValueError, match="method='jacobi' decodes one chain"):
        msn.generate(model, PROMPT, method="jacobi", tree=chain_tree(3))
    with pytest.raises(ValueError, match="eos_token_id must be"):
        msn.generate(model, PROMPT, eos_token_id="</s>")


# -- exact step counts with scripted models ------------------------------------------------


def run(rule, max_new_tokens=29, **options):
    model = ScriptedModel(rule)
    result = msn.generate(model, PROMPT, max_new_tokens, eos_token_id=[], **options)
    greedy = msn.generate(
        ScriptedModel(rule), PROMPT, max_new_tokens, method="greedy", eos_token_id=[]
    )
    assert torch.equal(result.output_ids, greedy.output_ids)
    assert model.forward_calls == result.steps + 1  # prefill + one pass per step
    return result


def test_no_acceptance_costs_one_step_per_token():
    for options in (dict(method="jacobi"), dict(method="tr-jacobi")):
        result = run(increasing, **options)
        assert result.accept_lengths == [1] * 28


def test_full_acceptance_along_the_chain():
    """Every guess is right: a wasted first step, then the whole chain plus the bonus token."""
    assert run(by_position, method="jacobi").accept_lengths == [1, 6] * 4
    # Paper mode's Jacobi part is 4 deep (its retrieval finds nothing in increasing text).
    paper = run(by_position, max_new_tokens=25, method="tr-jacobi", tree="paper")
    assert paper.accept_lengths == [1, 5] * 4
    # The last chunk is cut to max_new_tokens and counted as cut.
    chain = run(by_position, max_new_tokens=25, method="tr-jacobi", tree=chain_tree(3))
    assert chain.accept_lengths == [1, 4] * 4 + [1, 3]


def test_partial_acceptance_keeps_one_guess_per_step():
    assert run(lagging, method="jacobi").accept_lengths == [1] + [2] * 13 + [1]
    paper = run(lagging, method="tr-jacobi", tree="paper", retrieval=False)
    assert paper.accept_lengths == [1] + [2] * 13 + [1]


def test_retrieval_accepts_whole_drafts_on_repeating_text():
    cycle = [7, 3, 9, 4, 8, 5, 6]

    def repeat(context):
        last = context[-1]
        return cycle[(cycle.index(last) + 1) % len(cycle)] if last in cycle else cycle[0]

    model = ScriptedModel(repeat)
    result = msn.generate(
        model, cycle + cycle[:2], 31, method="tr-jacobi", tree="paper", eos_token_id=[]
    )
    assert result.accept_lengths == [6] * 5
    chain = msn.generate(
        ScriptedModel(repeat), cycle + cycle[:2], 31, method="jacobi", eos_token_id=[]
    )
    assert torch.equal(chain.output_ids, result.output_ids)


def test_eos_and_max_new_tokens_cut_an_accepted_chunk():
    # Outputs: prefill 108, step 1 -> 109, step 2 -> 110..115 (a chunk of six).
    model = ScriptedModel(by_position)
    result = msn.generate(model, PROMPT, 100, method="jacobi", eos_token_id=112)
    assert result.output_ids[0, len(PROMPT) :].tolist() == [108, 109, 110, 111, 112]
    assert result.stop_reason == "eos" and result.steps == 2
    result = msn.generate(ScriptedModel(by_position), PROMPT, 4, method="jacobi", eos_token_id=[])
    assert result.output_ids[0, len(PROMPT) :].tolist() == [108, 109, 110, 111]
    assert result.stop_reason == "max_new_tokens" and result.new_tokens == 4


def test_end_of_context_switches_to_single_steps_and_warns():
    model = ScriptedModel(by_position, max_seq_len=24)
    with pytest.warns(UserWarning, match="end of the model's context"):
        result = msn.generate(model, PROMPT, 100, method="jacobi", eos_token_id=[])
    assert result.output_ids[0].tolist() == list(range(100, 125))
    assert result.stop_reason == "context"


def test_streamer_receives_prompt_then_chunks():
    class Recorder:
        def __init__(self):
            self.calls, self.ended = [], False

        def put(self, value):
            self.calls.append(value.tolist())

        def end(self):
            self.ended = True

    recorder = Recorder()
    result = msn.generate(
        ScriptedModel(by_position), PROMPT, 15, method="jacobi", eos_token_id=[], streamer=recorder
    )
    assert recorder.calls[0] == [PROMPT] and recorder.ended
    streamed = [token for chunk in recorder.calls[1:] for token in chunk]
    assert streamed == result.output_ids[0, len(PROMPT) :].tolist()
    assert [len(c) for c in recorder.calls[2:]] == result.accept_lengths


def test_auto_tree_is_the_default():
    # Fresh statistics for each: generate calls update a shared copy online.
    result = run(by_position, 10, method="tr-jacobi", tree="auto", acceptance=AcceptanceStats())
    default = run(by_position, 10, method="tr-jacobi", acceptance=AcceptanceStats())
    assert result.accept_lengths == default.accept_lengths
    assert default.tree["tree"] == "auto"
    paper = run(by_position, max_new_tokens=10, method="tr-jacobi", tree="paper")
    assert paper.tree["tree"] == "paper" and paper.tree["mean_nodes"] == 69
