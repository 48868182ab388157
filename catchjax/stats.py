"""Small-sample statistics for rates and means: Wilson score intervals, percentile bootstrap and
Newcombe's interval for a difference of two rates, all computed by kept libraries.

Every rate this project reports (attack rate, catch rate, usefulness) comes from a few hundred
samples at most, so each is reported with an interval:

- `wilson(k, n)` -> (p, lo, hi): the Wilson score interval for a binomial proportion (well
  behaved at k = 0 and k = n, unlike the normal approximation), from
  `scipy.stats.binomtest(k, n).proportion_ci(method='wilson')`.
- `bootstrap_mean_ci(values)` -> (mean, lo, hi): a percentile bootstrap interval for a mean,
  from `scipy.stats.bootstrap(method='percentile')`.
- `newcombe_diff(k1, n1, k2, n2)` -> (p1 - p2, lo, hi): Newcombe's (1998) hybrid score interval
  for a difference of two independent proportions, from
  `statsmodels.stats.proportion.confint_proportions_2indep(method='newcomb')`.

This module keeps only the edge rules (n = 0, k = 0, k = n, empty or constant samples) and the
argument checks; the libraries do the arithmetic.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import stats as sps
from statsmodels.stats.proportion import confint_proportions_2indep


def _check_counts(fn: str, k, n) -> tuple[int, int]:
  k, n = int(k), int(n)
  if n < 0 or k < 0 or k > n:
    raise ValueError(f"{fn}: need 0 <= k <= n, got k={k}, n={n}")
  return k, n


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float, float]:
  """Wilson score interval for k successes out of n trials: (k/n, lo, hi).

  z = 1.96 gives a 95% interval. With n = 0 there is no information: (nan, 0.0, 1.0).
  """
  k, n = _check_counts("wilson", k, n)
  if n == 0:
    return float("nan"), 0.0, 1.0
  level = 2.0 * float(sps.norm.cdf(z)) - 1.0
  ci = sps.binomtest(k, n).proportion_ci(confidence_level=level, method="wilson")
  lo = 0.0 if k == 0 else max(0.0, float(ci.low))
  hi = 1.0 if k == n else min(1.0, float(ci.high))
  return k / n, lo, hi


def bootstrap_mean_ci(values: Sequence[float], n_boot: int = 2000, seed: int = 0,
                      alpha: float = 0.05) -> tuple[float, float, float]:
  """Percentile bootstrap (1 - alpha) interval for the mean of `values`: (mean, lo, hi).

  Deterministic given `seed`. Empty input gives (nan, nan, nan); one value (or all values
  equal) gives a zero-width interval at the mean.
  """
  x = np.asarray(list(values), dtype=np.float64)
  if x.ndim != 1:
    raise ValueError(f"bootstrap_mean_ci: expected a 1-D sequence, got shape {x.shape}")
  if not 0.0 < alpha < 1.0:
    raise ValueError(f"bootstrap_mean_ci: alpha must be in (0, 1), got {alpha}")
  if x.size == 0:
    return float("nan"), float("nan"), float("nan")
  mean = float(x.mean())
  if np.all(x == x[0]):  # scipy refuses or warns on a degenerate bootstrap distribution
    return mean, mean, mean
  res = sps.bootstrap((x,), np.mean, n_resamples=int(n_boot), confidence_level=1.0 - alpha,
                      method="percentile", vectorized=True, axis=-1,
                      rng=np.random.default_rng(seed))
  ci = res.confidence_interval
  return mean, float(ci.low), float(ci.high)


def newcombe_diff(k1: int, n1: int, k2: int, n2: int,
                  alpha: float = 0.05) -> tuple[float, float, float]:
  """p1 - p2 with Newcombe's (1998) hybrid score (1 - alpha) interval: (diff, lo, hi).

  Built from the two Wilson intervals at z = Phi^-1(1 - alpha/2). An empty arm (n = 0) gives
  (nan, nan, nan).
  """
  k1, n1 = _check_counts("newcombe_diff", k1, n1)
  k2, n2 = _check_counts("newcombe_diff", k2, n2)
  if not 0.0 < alpha < 1.0:
    raise ValueError(f"newcombe_diff: alpha must be in (0, 1), got {alpha}")
  if n1 == 0 or n2 == 0:
    return float("nan"), float("nan"), float("nan")
  lo, hi = confint_proportions_2indep(k1, n1, k2, n2, method="newcomb", compare="diff",
                                      alpha=alpha)
  return k1 / n1 - k2 / n2, float(lo), float(hi)
