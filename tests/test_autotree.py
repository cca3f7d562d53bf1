"""Tree selection: expected tokens per second under stated latency curves (no timings)."""

import pytest
import torch
from conftest import save_tiny_llama
from scripted_model import PROMPT, ScriptedModel, by_position, increasing

import msn
from msn.acceptance import AcceptanceStats, retrieval_key
from msn.autotree import Draft, grow_tree
from msn.latency import LatencyProfile

FLAT = LatencyProfile.synthetic(0.02, 64, 0.0005)  # an H100-like curve: flat to 64 tokens
STEEP = LatencyProfile.synthetic(0.06, 1, 0.06)  # every extra token costs a whole pass
CPU = LatencyProfile((1, 2, 3, 4, 8), (0.060, 0.060, 0.062, 0.090, 0.125))


def rows(depths, width, prob):
    return [[(100 * d + r, prob) for r in range(width)] for d in range(depths)]


def test_flat_curve_grows_a_big_tree_steep_curve_none():
    draft = Draft(rows=rows(5, 8, 0.5), chains=[([7, 8, 9, 10, 11], 3, "R")])
    stats = AcceptanceStats()
    big = grow_tree(1, draft, stats.estimate, FLAT.step_time, max_nodes=64)
    assert big.num_nodes > 20 and big.max_depth >= 4
    none = grow_tree(1, draft, stats.estimate, STEEP.step_time, max_nodes=64)
    assert none.num_nodes == 1 and none.expected_tokens == 1.0  # plain greedy
    cpu = grow_tree(1, draft, stats.estimate, CPU.step_time, max_nodes=8)
    assert cpu.num_nodes == 3  # the free sizes only
    assert cpu.expected_rate >= 1 / CPU.step_time(1)


def test_tree_is_valid_and_values_follow_paths():
    draft = Draft(rows=rows(4, 4, 0.3), chains=[([100, 7, 8], 2, "R")])  # R1 repeats J(1, 0)
    stats = AcceptanceStats()
    tree = grow_tree(5, draft, stats.estimate, FLAT.step_time, max_nodes=30)
    assert tree.parents[0] == -1 and tree.tokens[0] == 5
    for node in range(1, tree.num_nodes):
        parent = tree.parents[node]
        assert 0 <= parent < node
        assert tree.depths[node] == tree.depths[parent] + 1
        assert tree.values[node] <= tree.values[parent] + 1e-12
        assert tree.values[node] == pytest.approx(
            tree.values[parent] * stats.estimate(tree.keys[node])
        )
    siblings = {}
    for node in range(1, tree.num_nodes):
        siblings.setdefault(tree.parents[node], []).append(tree.tokens[node])
    assert all(len(s) == len(set(s)) for s in siblings.values())  # no token twice
    # The retrieval chain continues under the Jacobi node holding its first token.
    first = tree.tokens.index(100)
    assert 7 in [tree.tokens[n] for n in range(tree.num_nodes) if tree.parents[n] == first]


def test_confident_slots_win():
    stats = AcceptanceStats()
    weak = grow_tree(1, Draft(rows=rows(3, 2, 0.02)), stats.estimate, CPU.step_time, 8)
    strong = grow_tree(
        1, Draft(chains=[([4, 5, 6, 7, 8], 3, "R")]), stats.estimate, CPU.step_time, 8
    )
    assert strong.expected_tokens > weak.expected_tokens
    assert all(key[0] == "R" for key in strong.keys[1:])


def test_more_slots_when_stats_say_they_pay():
    draft = Draft(chains=[([4, 5, 6, 7, 8], 3, "R")])
    cold = AcceptanceStats()
    hot = AcceptanceStats()
    for _ in range(200):
        for depth in range(1, 6):
            hot.record(retrieval_key(depth, 3), True)
    small = grow_tree(1, draft, cold.estimate, CPU.step_time, 8)
    large = grow_tree(1, draft, hot.estimate, CPU.step_time, 8)
    assert large.num_nodes > small.num_nodes


@pytest.mark.parametrize("profile", [FLAT, STEEP, CPU], ids=["flat", "steep", "cpu"])
def test_auto_is_lossless_on_a_real_model(tmp_path_factory, profile):
    path = tmp_path_factory.mktemp("auto-model")
    save_tiny_llama(path, max_position_embeddings=128)
    model = msn.load_model(path, dtype=torch.float64)
    prompts = [[11, 12, 13, 14] * 6, list(range(2, 40, 3)), [42] * 9 + [43, 44] * 4]
    for prompt in prompts:
        greedy = msn.generate(model, prompt, 40, method="greedy", eos_token_id=[])
        for retrieval in (True, False):
            auto = msn.generate(
                model, prompt, 40, eos_token_id=[], latency=profile, retrieval=retrieval,
                acceptance=AcceptanceStats(),
            )  # fmt: skip
            assert torch.equal(auto.output_ids, greedy.output_ids)
            assert sum(auto.accept_lengths) == 39
            assert auto.tree["tree"] == "auto"
            if profile is STEEP:
                assert auto.tree["mean_nodes"] == 1.0


def test_auto_accepts_guesses_and_learns():
    stats = AcceptanceStats()
    model = ScriptedModel(by_position)
    result = msn.generate(model, PROMPT, 40, eos_token_id=[], acceptance=stats)
    assert model.forward_calls == result.steps + 1
    assert result.tokens_per_step > 2  # noise slots seed the candidates, which are all right
    assert stats.observations > 0
    none = msn.generate(ScriptedModel(increasing), PROMPT, 20, eos_token_id=[])
    assert none.accept_lengths == [1] * 19


def test_auto_near_the_end_of_the_context():
    model = ScriptedModel(by_position, max_seq_len=24)
    with pytest.warns(UserWarning, match="end of the model's context"):
        result = msn.generate(model, PROMPT, 100, eos_token_id=[], acceptance=AcceptanceStats())
    assert result.output_ids[0].tolist() == list(range(100, 125))


def test_output_memory_recalls_earlier_outputs_within_one_output():
    from msn.drafts import OutputMemory

    memory = OutputMemory()
    memory.begin()
    memory.extend([1, 2, 3, 4, 5])
    memory.begin()
    memory.extend([9, 9])
    assert memory.lookup([7, 2, 3], 8) == ([4, 5], 2)  # stops at the end of that output
    assert memory.lookup([1, 2, 3], 1) == ([4], 3)  # the longest match wins
    assert memory.lookup([8, 3, 4], 2) == ([5], 2)
    assert memory.lookup([5, 9], 4) == ([], 0)  # 5, 9 spans two outputs: never indexed
    memory.enabled = False
    assert memory.lookup([7, 2, 3], 8) == ([], 0)
    memory.enabled = True
    memory.clear()
    assert memory.lookup([7, 2, 3], 8) == ([], 0) and memory.tokens == []
    memory.extend([2, 3, 6])
    assert memory.lookup([2, 3], 4) == ([6], 2)  # usable again after clearing
