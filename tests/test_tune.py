"""`msn tune` and `--threads` on a tiny checkpoint (shapes of the output, never timings)."""

import torch

import msn.latency
from msn.cli import default_threads
from msn.cli import main as cli_main


def test_tune_prints_the_curve_and_calibrates(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MSN_KERNELS", "torch")
    monkeypatch.setattr(msn.latency, "DEFAULT_TOKENS", (1, 2, 3, 4))
    monkeypatch.setattr(msn.latency, "_MEMORY", {})
    png = tmp_path / "curve.png"
    threads = torch.get_num_threads()
    try:
        argv = ["tune", "--model", str(tiny_checkpoint), "--output", str(png), "--threads", "1"]
        assert cli_main([*argv, "--calibrate", "1", "--max-new-tokens", "4"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "| tree tokens T | ms/step | vs T=1 |" in out and "threads 1" in out
    assert "acceptance statistics" in out
    assert png.stat().st_size > 0


def test_threads_default_and_bad_value(tiny_checkpoint, capsys):
    assert 1 <= default_threads() <= 8
    argv = ["generate", "--model", str(tiny_checkpoint), "--prompt", "x", "--threads", "0"]
    assert cli_main(argv) == 2
    assert "--threads must be >= 1" in capsys.readouterr().err
