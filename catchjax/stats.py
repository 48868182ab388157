"""Small-sample statistics for rates and means: Wilson score intervals and percentile bootstrap.

Every rate this project reports (attack rate, catch rate, usefulness) comes from a few hundred
samples at most, so each is reported with an interval:

- `wilson(k, n)` -> (p, lo, hi): the Wilson score interval for a binomial proportion (well
  behaved at k = 0 and k = n, unlike the normal approximation).
- `bootstrap_mean_ci(values)` -> (mean, lo, hi): a percentile bootstrap interval for a mean.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float, float]:
  """Wilson score interval for k successes out of n trials: (k/n, lo, hi).

  z = 1.96 gives a 95% interval. With n = 0 there is no information: (nan, 0.0, 1.0).
  """
  k, n = int(k), int(n)
  if n < 0 or k < 0 or k > n:
    raise ValueError(f"wilson: need 0 <= k <= n, got k={k}, n={n}")
  if n == 0:
    return float("nan"), 0.0, 1.0
  p = k / n
  z2 = z * z
  denom = 1.0 + z2 / n
  center = (p + z2 / (2 * n)) / denom
  half = (z / denom) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
  lo = 0.0 if k == 0 else max(0.0, center - half)
  hi = 1.0 if k == n else min(1.0, center + half)
  return p, lo, hi


def bootstrap_mean_ci(values: Sequence[float], n_boot: int = 2000, seed: int = 0,
                      alpha: float = 0.05) -> tuple[float, float, float]:
  """Percentile bootstrap (1 - alpha) interval for the mean of `values`: (mean, lo, hi).

  Deterministic given `seed`. Empty input gives (nan, nan, nan); one value gives a zero-width
  interval at that value.
  """
  x = np.asarray(list(values), dtype=np.float64)
  if x.ndim != 1:
    raise ValueError(f"bootstrap_mean_ci: expected a 1-D sequence, got shape {x.shape}")
  if not 0.0 < alpha < 1.0:
    raise ValueError(f"bootstrap_mean_ci: alpha must be in (0, 1), got {alpha}")
  if x.size == 0:
    return float("nan"), float("nan"), float("nan")
  mean = float(x.mean())
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, x.size, size=(int(n_boot), x.size))
  means = x[idx].mean(axis=1)
  lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
  return mean, float(lo), float(hi)
