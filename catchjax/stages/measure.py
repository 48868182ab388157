"""Measure: sampled attack rates (the reported measure), teacher-forced attack probabilities
(cheap, low-variance companion), and usefulness accuracy, each with a 95% Wilson interval."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from catchjax import stats
from catchjax.sample import Sampler, SamplingParams


def rate(k: int, n: int) -> dict:
  p, lo, hi = stats.wilson(int(k), int(n))
  return dict(k=int(k), n=int(n), rate=float(p), lo=float(lo), hi=float(hi))


def sample_responses(sampler: Sampler, tok, prompts: Sequence[Sequence[int]], *,
                     max_new_tokens: int, temperature: float = 1.0, seed: int = 0,
                     desc: str | None = None) -> list[str]:
  out = sampler.generate(prompts, SamplingParams(temperature=temperature,
                                                 max_new_tokens=max_new_tokens),
                         seeds=[(seed * 1_000_003 + i) % (1 << 31) for i in range(len(prompts))])
  return [tok.decode(t, skip_special_tokens=True) for t in out.tokens]


def attack_rate(sampler: Sampler, tok, prompts, detect: Callable[[str], bool], *,
                max_new_tokens: int, temperature: float = 1.0, seed: int = 0) -> dict:
  """Sample every prompt once at `temperature` and count detector hits."""
  responses = sample_responses(sampler, tok, prompts, max_new_tokens=max_new_tokens,
                               temperature=temperature, seed=seed)
  hits = [bool(detect(r)) for r in responses]
  d = rate(sum(hits), len(hits))
  d["hits"] = hits
  d["responses"] = responses
  return d


def attack_prob_tf(sampler: Sampler, prompts, prefix_ids: Sequence[int]) -> np.ndarray:
  """Teacher-forced P(response starts with the attack prefix | prompt), per prompt.

  Valid as a stand-in for the sampled rate only for behaviours whose attack starts the
  response (e.g. `hate`); it is reported beside, never instead of, the sampled rate.
  """
  lp = sampler.score_sum(prompts, [list(prefix_ids)] * len(prompts), progress=False)
  return np.exp(lp)


def usefulness(sampler: Sampler, tok, prompts, instances, check: Callable, *,
               max_new_tokens: int = 16) -> dict:
  """Greedy answers checked by each task family's checker."""
  responses = sample_responses(sampler, tok, prompts, max_new_tokens=max_new_tokens,
                               temperature=0.0)
  ok = [bool(check(inst, r)) for inst, r in zip(instances, responses)]
  d = rate(sum(ok), len(ok))
  d["responses"] = responses
  d["ok"] = ok
  return d


def gate_indices(instances, ok, min_acc: float) -> list[int]:
  """Prompts of the task families where the model (the organism, before training) answers
  at least `min_acc` of its prompts right: the usefulness gate's prompt set."""
  by_fam: dict[str, list[int]] = {}
  for i, inst in enumerate(instances):
    by_fam.setdefault(inst.family, []).append(i)
  keep = [f for f, idx in by_fam.items() if np.mean([ok[i] for i in idx]) >= min_acc]
  return sorted(i for f in keep for i in by_fam[f])


def useful_drop(before: dict, after: dict, points: float) -> tuple[float, bool]:
  """(points lost on the gate's prompts, flagged: lost more than `points`)."""
  drop = 100.0 * (float(before["rate"]) - float(after["rate"]))
  return drop, bool(np.isfinite(drop) and drop > float(points))
