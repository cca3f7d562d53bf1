"""Parity of the slim model with transformers' LlamaForCausalLM on tiny random checkpoints."""

import json

import pytest
import torch
from conftest import save_tiny_llama
from transformers import LlamaForCausalLM

import msn
from msn_kernels.tree_attention import TRITON_HEAD_DIMS

LLAMA3 = dict(num_attention_heads=8, num_key_value_heads=2, hidden_size=64, rope_theta=500000.0)
LLAMA31 = dict(
    LLAMA3,
    max_position_embeddings=512,
    rope_scaling=dict(
        rope_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=64,
    ),
)
DEEPSEEK_CODER = dict(num_attention_heads=4, num_key_value_heads=4, rope_theta=100000.0)
TIED_BIASES_HEAD_DIM = dict(
    tie_word_embeddings=True, attention_bias=True, mlp_bias=True, head_dim=32
)
DYNAMIC = dict(max_position_embeddings=32, rope_scaling=dict(rope_type="dynamic", factor=2.0))


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours.double() - reference.double()).abs().max() / reference.abs().max())


def rewrite_config(path, **changes):
    """Edit config.json in place; a value of None deletes the key."""
    config_path = path / "config.json"
    config = json.loads(config_path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    config_path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    "overrides",
    [LLAMA3, LLAMA31, TIED_BIASES_HEAD_DIM, DYNAMIC],
    ids=["llama3", "llama3.1-rope-scaling", "tied-biases-head-dim", "dynamic-rope"],
)
def test_logits_match_transformers_fp32(tmp_path, overrides):
    reference = save_tiny_llama(tmp_path, **overrides)
    model = msn.load_model(tmp_path, max_seq_len=64)  # dynamic rope runs past its context
    tokens = torch.randint(0, 320, (2, 48))
    with torch.no_grad():
        expected = reference(tokens).logits
    assert relative_error(model(tokens), expected) < 1e-4


def test_deepseek_coder_config_with_4x_keys(tmp_path):
    """No GQA, theta 100000 and linear scaling 4, written the way transformers 4.x does."""
    reference = save_tiny_llama(
        tmp_path, **DEEPSEEK_CODER, rope_scaling=dict(rope_type="linear", factor=4.0)
    )
    rewrite_config(
        tmp_path,
        rope_parameters=None,
        rope_theta=100000.0,
        rope_scaling={"type": "linear", "factor": 4.0},
        torch_dtype="float32",
        dtype=None,
    )
    model = msn.load_model(tmp_path)
    assert model.config.rope.type == "linear" and model.config.rope.factor == 4.0
    assert model.config.rope.theta == 100000.0
    tokens = torch.randint(0, 320, (1, 40))
    with torch.no_grad():
        expected = reference(tokens).logits
    assert relative_error(model(tokens), expected) < 1e-4


def test_sharded_checkpoint(tmp_path):
    reference = save_tiny_llama(tmp_path / "ckpt", **LLAMA3)
    reference.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 2
    model = msn.load_model(tmp_path / "sharded")
    tokens = torch.randint(0, 320, (1, 16))
    with torch.no_grad():
        expected = reference(tokens).logits
    assert relative_error(model(tokens), expected) < 1e-4


def test_bf16_checkpoint_loaded_as_fp32(tmp_path):
    save_tiny_llama(tmp_path / "fp32", **LLAMA3).to(torch.bfloat16).save_pretrained(
        tmp_path / "bf16"
    )
    reference = LlamaForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32)
    model = msn.load_model(tmp_path / "bf16", dtype=torch.float32)
    assert msn.load_model(tmp_path / "bf16").dtype == torch.bfloat16
    assert model.dtype == torch.float32
    tokens = torch.randint(0, 320, (1, 16))
    with torch.no_grad():
        expected = reference(tokens).logits
    assert relative_error(model(tokens), expected) < 1e-4


def test_float64_matches_transformers_closely(tmp_path):
    reference = save_tiny_llama(tmp_path, **LLAMA3).to(torch.float64)
    model = msn.load_model(tmp_path, dtype=torch.float64)
    tokens = torch.randint(0, 320, (1, 32))
    with torch.no_grad():
        expected = reference(tokens).logits
    assert model(tokens).dtype == torch.float64
    assert relative_error(model(tokens), expected) < 1e-10


@pytest.mark.parametrize("overrides", [LLAMA3, DEEPSEEK_CODER], ids=["gqa", "mha"])
def test_incremental_decoding_matches_full_pass(tmp_path, overrides):
    save_tiny_llama(tmp_path, **overrides)
    model = msn.load_model(tmp_path, dtype=torch.float64, max_seq_len=64)
    tokens = torch.randint(0, 320, (2, 30))
    full = model(tokens)
    model.setup_cache(batch_size=2, max_seq_len=64)
    prefill = model(tokens[:, :12])
    steps = [
        model(tokens[:, t : t + 1], cache_lens=torch.tensor([t, t]))[:, 0] for t in range(12, 30)
    ]
    assert torch.allclose(prefill, full[:, :12], rtol=0, atol=1e-12)
    assert torch.allclose(torch.stack(steps, dim=1), full[:, 12:], rtol=0, atol=1e-10)


def test_tree_pass_matches_causal_pass_per_path(tmp_path):
    """Each tree node's logits equal a causal pass over prefix + its root-to-node chain."""
    save_tiny_llama(tmp_path, **LLAMA3)
    model = msn.load_model(tmp_path, dtype=torch.float64, max_seq_len=64)
    generator = torch.Generator().manual_seed(0)
    parents = [-1, 0, 0, 1, 1, 2, 3, 0, 6]
    depths = [0]
    for parent in parents[1:]:
        depths.append(depths[parent] + 1)
    size = len(parents)
    mask = torch.eye(size, dtype=torch.bool)
    for node in range(size):
        ancestor = parents[node]
        while ancestor >= 0:
            mask[node, ancestor] = True
            ancestor = parents[ancestor]
    prefix = torch.randint(0, 320, (1, 10), generator=generator)
    tree_tokens = torch.randint(0, 320, (1, size), generator=generator)

    model.setup_cache(1, 64)
    model(prefix)
    prefix_len = torch.tensor([10])
    tree_logits = model(
        tree_tokens,
        positions=prefix_len[:, None] + torch.tensor(depths)[None],
        cache_lens=prefix_len,
        tree_mask=mask,
    )
    for node in range(size):
        chain = mask[node].nonzero().flatten()
        sequence = torch.cat([prefix, tree_tokens[:, chain]], dim=1)
        expected = model(sequence)[:, -1]
        assert torch.allclose(tree_logits[:, node], expected, rtol=0, atol=1e-10), node


def test_model_call_without_cache_and_too_long_input(tmp_path):
    save_tiny_llama(tmp_path, max_position_embeddings=32)
    model = msn.load_model(tmp_path)
    with pytest.raises(ValueError, match="exceed the model's maximum sequence length of 32"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="needs a KV cache"):
        model(torch.zeros(1, 4, dtype=torch.long), cache_lens=torch.tensor([3]))
    model.setup_cache(1, 32)
    with pytest.raises(ValueError, match="does not fit"):
        model(torch.zeros(1, 4, dtype=torch.long), cache_lens=torch.tensor([30]))


def test_llama3_rope_with_4x_keys(tmp_path):
    reference = save_tiny_llama(tmp_path, **LLAMA31)
    rewrite_config(
        tmp_path,
        rope_parameters=None,
        rope_theta=500000.0,
        rope_scaling={**LLAMA31["rope_scaling"]},
    )
    model = msn.load_model(tmp_path)
    assert model.config.rope.type == "llama3" and model.config.rope.theta == 500000.0
    tokens = torch.randint(0, 320, (1, 100))
    with torch.no_grad():
        expected = reference(tokens).logits
    assert relative_error(model(tokens), expected) < 1e-4


def test_ragged_rows_in_one_cached_call(tmp_path):
    """Rows of one batch at different prefix lengths each match their own full pass."""
    save_tiny_llama(tmp_path, **LLAMA3)
    model = msn.load_model(tmp_path, dtype=torch.float64)
    tokens = torch.randint(0, 320, (2, 20))
    full = model(tokens)
    model.setup_cache(2, 32)
    model(tokens[:, :16])
    lens = torch.tensor([9, 14])
    step = torch.stack([tokens[0, 9:12], tokens[1, 14:17]])
    logits = model(step, cache_lens=lens)
    assert torch.allclose(logits[0], full[0, 9:12], rtol=0, atol=1e-10)
    assert torch.allclose(logits[1], full[1, 14:17], rtol=0, atol=1e-10)


def test_dynamic_rope_tree_pass_rotates_like_greedy(tmp_path):
    """Past the original context, each tree node uses its own position's dynamic base."""
    save_tiny_llama(tmp_path, **DYNAMIC)
    model = msn.load_model(tmp_path, dtype=torch.float64, max_seq_len=96)
    prompt = torch.randint(2, 320, (1, 40))
    greedy = msn.generate(model, prompt, 30, method="greedy", eos_token_id=[])
    for method in ("jacobi", "tr-jacobi"):
        result = msn.generate(model, prompt, 30, method=method, eos_token_id=[])
        assert torch.equal(result.output_ids, greedy.output_ids), method


def test_cached_call_reads_the_host_at_most_once(tmp_path):
    """One bounds check per forward, not one per layer (each is a GPU sync on CUDA).

    Head dim 16 takes the Triton kernel (here through the interpreter), as on CUDA; the CPU
    path (`tree_attention_sdpa`) reads the lengths per layer, which costs nothing on a CPU.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountItems(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                CountItems.count += 1
            return func(*args, **(kwargs or {}))

    save_tiny_llama(tmp_path, **{**LLAMA3, "num_attention_heads": 4}, num_hidden_layers=4)
    model = msn.load_model(tmp_path, max_seq_len=64)
    assert model.config.head_dim in TRITON_HEAD_DIMS
    model.setup_cache(1, 64)
    model(torch.randint(0, 320, (1, 8)))
    mask = torch.ones(5, 5, dtype=torch.bool).tril()
    with CountItems():
        model(torch.randint(0, 320, (1, 5)), cache_lens=torch.tensor([8]), tree_mask=mask)
    assert CountItems.count <= 1
