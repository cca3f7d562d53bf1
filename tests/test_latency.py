"""Latency profiles: interpolation, persistence, measurement (shape only, never timings)."""

import pytest
import torch
from conftest import save_tiny_llama

import msn
import msn.latency
from msn.latency import LatencyProfile, latency_profile, plot_profile


def test_step_time_interpolates_and_extrapolates():
    profile = LatencyProfile((1, 2, 4, 8), (1.0, 1.0, 2.0, 3.0), prefix_slope=0.01)
    assert profile.step_time(2) == 1.0
    assert profile.step_time(3) == pytest.approx(1.5)
    assert profile.step_time(16) == pytest.approx(5.0)  # the last segment's slope
    assert profile.step_time(1, prefix=profile.prefix_tokens + 100) == pytest.approx(2.0)
    assert "| 4 | 2000.0 | 2.00x |" in profile.table()


def test_bad_profiles_are_refused():
    with pytest.raises(ValueError, match="increasing"):
        LatencyProfile((2, 1), (1.0, 1.0))
    with pytest.raises(ValueError, match="positive"):
        LatencyProfile((1,), (0.0,))


def test_round_trip_and_plot(tmp_path):
    profile = LatencyProfile.synthetic(0.02, 64, 0.001, model="8B", device="H100")
    profile.save(tmp_path / "p.json")
    assert LatencyProfile.load(tmp_path / "p.json") == profile
    assert LatencyProfile.load(tmp_path / "missing.json") is None
    (tmp_path / "bad.json").write_text("{")
    assert LatencyProfile.load(tmp_path / "bad.json") is None
    plot_profile(profile, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0


def test_measured_once_then_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("MSN_KERNELS", "torch")
    monkeypatch.setenv("MSN_CACHE", str(tmp_path))
    monkeypatch.setattr(msn.latency, "_MEMORY", {})
    save_tiny_llama(tmp_path / "model")
    model = msn.load_model(tmp_path / "model", dtype=torch.float32)
    profile = latency_profile(model, tokens=(1, 2, 3))
    assert profile.tokens == (1, 2, 3) and all(s > 0 for s in profile.seconds)
    assert profile.meta["threads"] == torch.get_num_threads()
    assert profile.meta["dtype"] == "float32"
    files = list((tmp_path / "latency").glob("*.json"))
    assert len(files) == 1
    monkeypatch.setattr(msn.latency, "_MEMORY", {})
    assert latency_profile(model) == profile  # read back from the cache
    model.latency_profile = LatencyProfile.synthetic(1.0, 4, 1.0)
    assert latency_profile(model) is model.latency_profile
