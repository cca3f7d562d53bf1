"""LoRA adapters merged by msn (no peft at load time) against peft's own merge."""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import msn
from msn.adapter import merge_adapter_into_checkpoint


def save_random_adapter(base_dir, path, **options):
    """A peft LoRA adapter with random (non-zero) A and B, saved as peft saves it."""
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float64)
    settings = dict(r=4, lora_alpha=8, target_modules="all-linear")
    settings.update(options)
    peft_model = get_peft_model(model, LoraConfig(**settings))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.05)
    peft_model.save_pretrained(path)
    return peft_model.merge_and_unload()


@pytest.mark.parametrize("options", [{}, {"use_rslora": True, "target_modules": ["q_proj"]}])
def test_merge_on_load_equals_peft(tiny_checkpoint, tmp_path, options):
    merged = save_random_adapter(tiny_checkpoint, tmp_path / "adapter", **options)
    ids = torch.tensor([[5, 9, 100, 7, 31]])
    ours = msn.load_model(tiny_checkpoint, dtype=torch.float64, adapter=tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), merged(ids).logits, atol=1e-10, rtol=1e-10)


def test_merged_checkpoint_directory(tiny_checkpoint, tmp_path):
    merged = save_random_adapter(tiny_checkpoint, tmp_path / "adapter")
    out = merge_adapter_into_checkpoint(tiny_checkpoint, tmp_path / "adapter", tmp_path / "out")
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    weights = load_file(out / "model.safetensors")
    reference = merged.state_dict()
    name = "model.layers.1.mlp.down_proj.weight"
    torch.testing.assert_close(weights[name].double(), reference[name], atol=1e-6, rtol=1e-6)


def test_adapter_errors(tiny_checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json is missing"):
        msn.load_model(tiny_checkpoint, adapter=tmp_path)

    save_random_adapter(tiny_checkpoint, tmp_path / "dora", use_dora=True)
    with pytest.raises(ValueError, match="only plain LoRA.*use_dora"):
        msn.load_model(tiny_checkpoint, adapter=tmp_path / "dora")

    # An adapter trained on another base: the shapes disagree, and the error says so.
    from conftest import save_tiny_llama

    other = tmp_path / "other-base"
    save_tiny_llama(other, hidden_size=32, intermediate_size=64)
    save_random_adapter(other, tmp_path / "other-adapter")
    with pytest.raises(ValueError, match="trained on another base model"):
        msn.load_model(tiny_checkpoint, adapter=tmp_path / "other-adapter")
    config = json.loads((tmp_path / "other-adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4
