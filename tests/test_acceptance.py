"""Acceptance statistics: priors, online updates, persistence."""

from msn.acceptance import (
    AcceptanceStats,
    jacobi_key,
    prior,
    retrieval_key,
)


def test_keys_and_priors():
    assert jacobi_key(9, 7, 0.99) == ("J", 5, 3, 9)
    assert retrieval_key(1, 5) == ("R", 1, 4, 0)
    assert retrieval_key(2, 1, "H", streak=3) == ("H", 2, 1, 1)
    assert prior(jacobi_key(1, 0, 0.99)) > prior(jacobi_key(1, 0, 0.05))
    assert prior(retrieval_key(1, 3)) > prior(retrieval_key(1, 1))


def test_estimates_follow_observations(tmp_path):
    stats = AcceptanceStats()
    key = retrieval_key(1, 1)
    start = stats.estimate(key)
    for _ in range(50):
        stats.record(key, True)
    assert stats.estimate(key) > 0.9 > start
    for _ in range(2000):
        stats.record(key, False)
    assert stats.estimate(key) < 0.05  # a window: old counts fade
    stats.save(tmp_path / "s.json")
    loaded = AcceptanceStats.load(tmp_path / "s.json")
    assert loaded.counts == stats.counts
    assert "retrieval depth 1 match 1" in loaded.table()
    merged = AcceptanceStats()
    merged.merge(loaded)
    assert merged.observations == stats.observations
