"""``sparsecompile.profile.stats``: robust latency summaries, the noisy-machine flags, the paired bootstrap."""

from __future__ import annotations

import numpy as np
import pytest

from sparsecompile.profile import bootstrap_ratio, latency_stats, noise_reasons


def test_latency_stats_on_known_values():
    stats = latency_stats(np.arange(1, 102, dtype=float))  # 1..101
    assert stats["n"] == 101
    assert stats["p50"] == 51 and stats["p90"] == 91 and stats["p99"] == 100
    assert stats["min"] == 1 and stats["max"] == 101 and stats["mean"] == 51
    assert stats["mad"] == 25  # median of |x - 51| over 1..101
    assert latency_stats([2.0, 2.0, 2.0])["mad"] == 0


def test_noise_flags():
    quiet = latency_stats(np.full(100, 10.0) + np.linspace(0, 0.5, 100))
    assert noise_reasons(quiet) == []
    spiky = latency_stats(np.r_[np.full(80, 10.0), np.full(20, 20.0)])  # p90 = 20 -> p90/p50 = 2
    assert any("p90/p50" in r for r in noise_reasons(spiky))
    spread = latency_stats(np.linspace(5, 15, 101))  # MAD/median = 2.5/10
    assert any("MAD/median" in r for r in noise_reasons(spread))


def _paired_series(n, seed, true_ratio=0.8):
    rng = np.random.default_rng(seed)
    drift = 1.0 + 0.5 * np.sin(np.linspace(0, 6, n))  # the machine slows down and speeds up for both
    dense = 10.0 * drift * rng.lognormal(0.0, 0.1, n)
    sparse = true_ratio * 10.0 * drift * rng.lognormal(0.0, 0.1, n)
    return sparse, dense


def test_bootstrap_interval_contains_true_ratio_and_narrows():
    widths = {}
    for n in (40, 1000):
        sparse, dense = _paired_series(n, seed=n)
        result = bootstrap_ratio(sparse, dense, resamples=1000, seed=1)
        assert result["ci_low"] <= 0.8 <= result["ci_high"], (n, result)
        assert result["ci_low"] <= result["ratio"] <= result["ci_high"]
        widths[n] = result["ci_high"] - result["ci_low"]
    assert widths[1000] < widths[40] / 3
    # Over many synthetic runs a 95% interval misses the truth rarely (not never).
    misses = 0
    for seed in range(40):
        sparse, dense = _paired_series(60, seed=100 + seed)
        r = bootstrap_ratio(sparse, dense, resamples=400, seed=seed)
        misses += not (r["ci_low"] <= 0.8 <= r["ci_high"])
    assert misses <= 6
    with pytest.raises(ValueError):
        bootstrap_ratio([1.0, 2.0], [1.0])
