"""Paired comparisons of two arms of a learning benchmark, with a confidence interval.

Each arm is scored per (seed, problem): row s of both arms comes from the same seed (same
initialisation and data order), column p from the same held-out problem. The difference is
paired on both: a bootstrap draw resamples seeds and problems with replacement, the same draw
for both arms, so seed-to-seed and problem-to-problem variation cancel where they are shared
(the two-level bootstrap of Efron & Tibshirani, ch. 8, applied to seeds x problems).
"""

from __future__ import annotations

import numpy as np


def paired_bootstrap(arm, base, n_boot: int = 10_000, level: float = 0.95, seed: int = 0) -> dict:
    """Mean of arm - base over seeds and problems, and its `level` percentile bootstrap
    interval. `arm`, `base`: (seeds, problems) arrays of scores (1/0 for exact match).
    Returns {"diff", "low", "high", "seeds", "problems", "n_boot"}."""
    a, b = np.asarray(arm, dtype=np.float64), np.asarray(base, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2 or 0 in a.shape:
        raise ValueError(f"arm and base must be (seeds, problems) arrays of one shape, got {a.shape} and {b.shape}")
    d = a - b
    s, p = d.shape
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    for i in range(n_boot):
        rows = d[rng.integers(0, s, s)]
        means[i] = rows[:, rng.integers(0, p, p)].mean()
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return {"diff": float(d.mean()), "low": float(low), "high": float(high), "seeds": s, "problems": p,
            "n_boot": n_boot}
