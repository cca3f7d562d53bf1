"""transformers' own greedy and prompt lookup beside msn: same outputs, run by msn bench."""

import json

import torch

import msn
from msn.baselines import generate_reference, load_reference
from msn.cli import main as cli_main


def test_reference_methods_equal_msn_greedy(tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("MSN_KERNELS", "torch")
    model = msn.load_model(tiny_checkpoint, dtype=torch.float32)
    reference = load_reference(tiny_checkpoint)
    prompt = [5, 9, 11, 5, 9, 11, 5]
    greedy = msn.generate(model, prompt, 12, method="greedy", eos_token_id=[])
    for method in ("hf-greedy", "hf-prompt-lookup"):
        result = generate_reference(reference, prompt, 12, method, eos_token_id=[])
        assert torch.equal(result.output_ids, greedy.output_ids), method
        assert result.new_tokens == 12 and result.tokens_per_second > 0


def test_bench_baselines_and_tree_report(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MSN_KERNELS", "torch")
    out = tmp_path / "bench"
    argv = ["bench", "--model", str(tiny_checkpoint), "--limit", "1", "--max-new-tokens", "5"]
    argv += ["--methods", "greedy", "tr-jacobi", "--baselines", "--threads", "1"]
    threads = torch.get_num_threads()
    try:
        assert cli_main([*argv, "--no-progress", "--output", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "| overall | hf-greedy |" in printed and "| overall | hf-prompt-lookup |" in printed
    report = (out / "report.md").read_text()
    assert "- threads: 1" in report and "- tree (tr-jacobi): auto:" in report
    turns = {}
    for method in ("greedy", "tr-jacobi", "hf-greedy", "hf-prompt-lookup"):
        lines = (out / f"answers-{method}.jsonl").read_text().splitlines()
        turns[method] = [json.loads(line)["choices"][0]["turns"] for line in lines]
    assert turns["hf-greedy"] == turns["greedy"] == turns["tr-jacobi"]
