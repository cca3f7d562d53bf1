"""Checkpoint loading: layouts, dtypes and every error a user can run into."""

import json

import pytest
import torch
from conftest import save_tiny_llama
from safetensors.torch import load_file, save_file

import msn
from msn.checkpoint import hf_to_msn_name


@pytest.fixture()
def checkpoint(tmp_path):
    save_tiny_llama(tmp_path)
    return tmp_path


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_weight_map_names():
    name = "self_attn.k_proj.weight"
    assert hf_to_msn_name(f"model.layers.7.{name}") == f"layers.7.{name}"
    assert hf_to_msn_name("model.embed_tokens.weight") == "embed_tokens.weight"
    assert hf_to_msn_name("lm_head.weight") == "lm_head.weight"
    assert hf_to_msn_name("model.layers.0.self_attn.rotary_emb.inv_freq") is None
    assert hf_to_msn_name("model.layers.0.block_sparse_moe.gate.weight") is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_requested_dtype(checkpoint, dtype):
    model = msn.load_model(checkpoint, dtype=dtype)
    assert all(p.dtype == dtype for p in model.parameters())
    assert model.setup_cache(1, 8).k.dtype == dtype


def test_weights_load_and_the_cache_grows_on_demand(checkpoint):
    model = msn.load_model(checkpoint, max_seq_len=200)
    assert not any(p.is_meta for p in model.parameters())
    assert model.cache is None and model.max_seq_len == 200
    msn.generate(model, [3, 4, 5], max_new_tokens=10, method="tr-jacobi", tree="paper")
    assert model.cache.k.shape == (2, 1, 2, 3 + 10 + 69, 16)  # (layers, B, Hkv, S, D)


def test_tied_checkpoint_with_a_stored_lm_head_copy(tmp_path):
    save_tiny_llama(tmp_path, tie_word_embeddings=True)
    tensors = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in tensors
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model = msn.load_model(tmp_path)
    assert model.lm_head.weight is model.embed_tokens.weight


def test_unsupported_head_class(checkpoint):
    edit_config(checkpoint, architectures=["LlamaForSequenceClassification"])
    with pytest.raises(ValueError, match="LlamaForSequenceClassification"):
        msn.load_model(checkpoint)


def test_unsupported_activation(checkpoint):
    edit_config(checkpoint, hidden_act="gelu")
    with pytest.raises(ValueError, match="unsupported activation: hidden_act='gelu'"):
        msn.load_model(checkpoint)


def test_cuda_asked_without_a_gpu(checkpoint):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match="sees no CUDA GPU"):
        msn.load_model(checkpoint, device="cuda")


def test_corrupt_generation_config(checkpoint):
    (checkpoint / "generation_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="generation_config.json is not valid JSON"):
        msn.load_model(checkpoint)


def test_mistyped_relative_path_is_not_sent_to_the_hub(checkpoint, monkeypatch):
    monkeypatch.chdir(checkpoint.parent)
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        msn.load_model(f"{checkpoint.name}/typo")


def test_eos_ids_merge_generation_config(checkpoint):
    generation = json.loads((checkpoint / "generation_config.json").read_text())
    generation["eos_token_id"] = [1, 7]
    (checkpoint / "generation_config.json").write_text(json.dumps(generation))
    assert msn.load_model(checkpoint).config.eos_token_ids == (1, 7)


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        msn.load_model(tmp_path / "nowhere" / "x" / "y")


def test_missing_config(checkpoint):
    (checkpoint / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        msn.load_model(checkpoint)


def test_unsupported_architecture(checkpoint):
    edit_config(checkpoint, model_type="mixtral", architectures=["MixtralForCausalLM"])
    with pytest.raises(ValueError, match="unsupported architecture: model_type='mixtral'"):
        msn.load_model(checkpoint)


def test_unsupported_rope_type(checkpoint):
    edit_config(checkpoint, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2})
    with pytest.raises(ValueError, match="unsupported rope type: rope_type='yarn'"):
        msn.load_model(checkpoint)


def test_pickle_only_checkpoint_is_refused(checkpoint):
    (checkpoint / "model.safetensors").unlink()
    (checkpoint / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="safetensors only"):
        msn.load_model(checkpoint)


def test_no_weights_at_all(checkpoint):
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
        msn.load_model(checkpoint)


def test_missing_shard(tmp_path):
    save_tiny_llama(tmp_path / "a").save_pretrained(tmp_path / "b", max_shard_size="40KB")
    shard = sorted((tmp_path / "b").glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"missing: {shard.name}"):
        msn.load_model(tmp_path / "b")


def test_tensor_problems_reported_together(checkpoint):
    tensors = load_file(checkpoint / "model.safetensors")
    del tensors["model.norm.weight"]
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    tensors["model.layers.0.block_sparse_moe.gate.weight"] = torch.zeros(2)
    save_file(tensors, checkpoint / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"3 problem\(s\)") as error:
        msn.load_model(checkpoint)
    message = str(error.value)
    assert "missing tensor model.norm.weight" in message
    assert "model.layers.0.mlp.up_proj.weight has shape (3, 3), expected (128, 64)" in message
    assert "unexpected tensor model.layers.0.block_sparse_moe.gate.weight" in message


def test_hub_id_offline_says_what_to_download(monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("offline mode, not in the cache")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match="hf download DecoderImmortal/") as e:
        msn.load_model("DecoderImmortal/Llama3-8B-MSN")
    assert "could not be fetched" in str(e.value) and "LocalEntryNotFoundError" in str(e.value)
    # current huggingface_hub installs the `hf` command; `huggingface-cli` is gone
    assert "huggingface-cli" not in str(e.value)


def test_bad_dtype(checkpoint):
    with pytest.raises(ValueError, match="unsupported dtype 'int8'"):
        msn.load_model(checkpoint, dtype="int8")


def test_tokenizer_loads(tiny_checkpoint):
    tokenizer = msn.load_tokenizer(tiny_checkpoint)
    assert tokenizer.decode(tokenizer.encode("def add(a, b):")).endswith("def add(a, b):")


def test_tokenizer_missing(checkpoint):
    with pytest.raises(ValueError, match="no usable tokenizer"):
        msn.load_tokenizer(checkpoint)
