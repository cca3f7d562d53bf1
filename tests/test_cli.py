"""The `msn` command line on a tiny checkpoint: info, generate, and its user errors."""

import json

import pytest
from conftest import build_tiny_tokenizer, save_tiny_llama

from msn.cli import main


def test_info(tiny_checkpoint, capsys):
    assert main(["info", str(tiny_checkpoint), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layers"] == 2 and info["kv_heads"] == 2 and info["head_dim"] == 16
    assert (
        info["parameters"]
        == 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 128) + 2 * 320 * 64 + 64
    )
    assert info["weight_bytes"] == 4 * info["parameters"]
    assert info["kv_cache_bytes_per_token"] == 2 * 2 * 2 * 16 * 4
    assert main(["info", str(tiny_checkpoint)]) == 0
    assert "kv cache bytes per token" in capsys.readouterr().out


def test_generate_json_with_compare(tiny_checkpoint, capsys):
    code = main([
        "generate", "--model", str(tiny_checkpoint), "--prompt", "def add(a, b):",
        "--max-new-tokens", "12", "--compare", "--json", "--dtype", "float64",
    ])  # fmt: skip
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["identical"] is True
    assert summary["new_tokens"] == 12 or summary["stop_reason"] == "eos"
    per_step = (summary["new_tokens"] - 1) / summary["steps"]  # the prefill's token is no step's
    assert summary["tokens_per_step"] == pytest.approx(per_step, abs=1e-3)
    for key in ("text", "tokens_per_second", "greedy_tokens_per_second", "speedup"):
        assert key in summary
    assert lines[0].startswith(summary["text"].splitlines()[0] if summary["text"] else "")


def test_generate_chat(tiny_checkpoint, capsys):
    code = main([
        "generate", "--model", str(tiny_checkpoint), "--prompt", "hello", "--chat",
        "--method", "jacobi", "--max-new-tokens", "5", "--json",
    ])  # fmt: skip
    assert code == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["method"] == "jacobi"


@pytest.mark.parametrize(
    ("flag", "expect_chat"), [(None, True), ("--chat", True), ("--raw", False)]
)
def test_generate_uses_the_chat_template_unless_raw(
    tiny_checkpoint, monkeypatch, flag, expect_chat
):
    import msn.commands.generate as generate_command

    seen = []
    original = generate_command.encode_prompt
    monkeypatch.setattr(
        generate_command,
        "encode_prompt",
        lambda tokenizer, text, chat: seen.append(chat) or original(tokenizer, text, chat),
    )
    argv = ["generate", "--model", str(tiny_checkpoint), "--prompt", "hi", "--max-new-tokens", "2"]
    assert main(argv + ([flag] if flag else [])) == 0
    assert seen == [expect_chat]


def test_generate_chat_without_template_is_a_clear_error(tmp_path, capsys):
    tokenizer = build_tiny_tokenizer(chat_template=None)
    save_tiny_llama(tmp_path, tokenizer)
    code = main(["generate", "--model", str(tmp_path), "--prompt", "hi", "--chat"])
    assert code == 2
    assert "has no chat template" in capsys.readouterr().err


def test_missing_model_is_a_clear_error(tmp_path, capsys):
    assert main(["info", str(tmp_path / "absent")]) == 2
    assert "no checkpoint directory" in capsys.readouterr().err
