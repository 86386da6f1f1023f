"""Latency statistics: robust summaries, the noisy-machine test, and the paired bootstrap of a ratio.

See the package docstring (:mod:`sparsecompile.profile`) for the statistics used and why.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

BOOTSTRAP_RESAMPLES = 2000
CONFIDENCE = 0.95
NOISY_P90_OVER_P50 = 1.5
NOISY_MAD_OVER_MEDIAN = 0.10


def latency_stats(samples_ms: Sequence[float]) -> dict:
    """Robust summary of per-iteration latencies in milliseconds."""
    values = np.asarray(samples_ms, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no samples")
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {
        "n": int(values.size),
        "p50": float(p50), "p90": float(p90), "p99": float(p99),
        "min": float(values.min()), "max": float(values.max()), "mean": float(values.mean()),
        "mad": float(np.median(np.abs(values - p50))),
    }


def noise_reasons(stats: dict) -> list[str]:
    """Why a latency distribution looks like a noisy machine (empty when it does not)."""
    reasons = []
    if stats["p50"] > 0 and stats["p90"] / stats["p50"] > NOISY_P90_OVER_P50:
        reasons.append(f"p90/p50 = {stats['p90'] / stats['p50']:.2f} > {NOISY_P90_OVER_P50}")
    if stats["p50"] > 0 and stats["mad"] / stats["p50"] > NOISY_MAD_OVER_MEDIAN:
        reasons.append(f"MAD/median = {stats['mad'] / stats['p50']:.2f} > {NOISY_MAD_OVER_MEDIAN}")
    return reasons


def bootstrap_ratio(numerator: Sequence[float], denominator: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES,
                    confidence: float = CONFIDENCE, seed: int = 0) -> dict:
    """``median(numerator) / median(denominator)`` with a paired percentile-bootstrap interval.

    ``numerator[i]`` and ``denominator[i]`` must be one pair of back-to-back
    iterations; pairs are resampled together.
    """
    a = np.asarray(numerator, dtype=np.float64)
    b = np.asarray(denominator, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError("need two equally long, non-empty series of paired samples")
    ratio = float(np.median(a) / np.median(b))
    rng = np.random.default_rng(seed)
    ratios = np.empty(resamples)
    chunk = max(1, 2_000_000 // a.size)  # bound memory for long series
    for start in range(0, resamples, chunk):
        count = min(chunk, resamples - start)
        index = rng.integers(0, a.size, size=(count, a.size))
        ratios[start:start + count] = np.median(a[index], axis=1) / np.median(b[index], axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(ratios, [tail, 1.0 - tail])
    return {"ratio": ratio, "ci_low": float(low), "ci_high": float(high), "confidence": confidence,
            "resamples": resamples, "method": "paired percentile bootstrap of the ratio of medians"}
