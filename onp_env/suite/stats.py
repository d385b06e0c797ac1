"""Aggregates of normalised scores, as rliable reports them (Agarwal et al., NeurIPS 2021, "Deep RL at
the Edge of the Statistical Precipice"): the interquartile mean, with a stratified-bootstrap confidence
interval. Written here in a few lines rather than depending on rliable.

Departure: rliable resamples runs within each task; with one run of a deterministic heuristic that
interval would be a point, so models are resampled too (models with replacement, then runs within each
drawn model): the interval covers which models a split happened to draw."""

from __future__ import annotations

import numpy as np


def iqm(scores: np.ndarray) -> float:
    """Mean of the middle 50% of the scores: floor(n / 4) trimmed from each end, as rliable computes
    it (scipy.stats.trim_mean(x, 0.25))."""
    x = np.sort(np.asarray(scores, float).ravel())
    k = len(x) // 4
    return float(x[k : len(x) - k].mean()) if len(x) else float("nan")


def bootstrap_ci(scores: list[np.ndarray], reps: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """(low, high) of the IQM over `scores` (one array of runs per model), resampling models, then runs
    within each drawn model."""
    rng = np.random.default_rng(seed)
    m = len(scores)
    stats = np.empty(reps)
    for b in range(reps):
        drawn = rng.integers(m, size=m)
        stats[b] = iqm(np.concatenate([rng.choice(scores[i], size=len(scores[i])) for i in drawn]))
    tail = (1 - level) / 2 * 100
    return float(np.percentile(stats, tail)), float(np.percentile(stats, 100 - tail))
