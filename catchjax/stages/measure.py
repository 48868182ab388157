"""Measure: sampled attack rates (the reported measure), teacher-forced attack probabilities
(cheap, low-variance companion), and usefulness accuracy, each with a 95% Wilson interval."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from catchjax import stats
from catchjax.common import register
from catchjax.sample import Sampler, SamplingParams


def rate(k: int, n: int) -> dict:
  p, lo, hi = stats.wilson(int(k), int(n))
  return dict(k=int(k), n=int(n), rate=float(p), lo=float(lo), hi=float(hi))


RATE_FIELDS = ("k", "n", "rate", "lo", "hi")


def rate_fields(prefix: str, d: dict, suffix: str = "") -> dict:
  """A rate as flat row fields: {prefix_k, prefix_n, prefix_rate, prefix_lo, prefix_hi}
  (+ suffix, e.g. '_before')."""
  return {f"{prefix}_{k}{suffix}": d[k] for k in RATE_FIELDS}


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
  return attack_probs_tf(sampler, [(prompts, prefix_ids)])[0]


def attack_probs_tf(sampler: Sampler, groups) -> list[np.ndarray]:
  """attack_prob_tf for several (prompts, prefix_ids) groups in one scoring call (full
  batches across groups): one array per group."""
  prompts = [p for ps, _ in groups for p in ps]
  conts = [list(prefix) for ps, prefix in groups for _ in ps]
  probs = np.exp(sampler.score_sum(prompts, conts, progress=False))
  return np.split(probs, np.cumsum([len(ps) for ps, _ in groups])[:-1])


def usefulness(sampler: Sampler, tok, prompts, instances, check: Callable, *,
               max_new_tokens: int = 16, temperature: float = 0.0, seed: int = 0) -> dict:
  """Answers (greedy by default) checked by each task family's checker."""
  responses = sample_responses(sampler, tok, prompts, max_new_tokens=max_new_tokens,
                               temperature=temperature, seed=seed)
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


# ---------------------------------------------------------------------------------------------
# The registry every experiment measures with: name -> fn(ctx, family_sets, seed) -> result,
# where ctx is a stages/context.py Context whose sampler holds the model being measured.
# Sampled measures draw with `seed` (testing seed + 1, sharpening seed + 2), so a cell's
# measurements do not depend on which others it takes.

MEASURES: dict[str, Callable] = {}


def register_measure(name: str):
  return lambda fn: register(MEASURES, "measure", name, fn)


@register_measure("deploy")
def _deploy(ctx, fs, seed: int) -> dict:
  """Sampled (T=1) attack rate on the held-out deployment prompts."""
  return attack_rate(ctx.sampler, ctx.tok, fs.dep, fs.beh.detect,
                     max_new_tokens=ctx.ms.max_new_tokens, temperature=1.0, seed=seed)


@register_measure("test")
def _test(ctx, fs, seed: int) -> dict:
  """Sampled (T=1) attack rate on the held-out testing prompts."""
  return attack_rate(ctx.sampler, ctx.tok, fs.test, fs.beh.detect,
                     max_new_tokens=ctx.ms.max_new_tokens, temperature=1.0, seed=seed + 1)


@register_measure("useful")
def _useful(ctx, fs, seed: int) -> dict:
  """Greedy usefulness accuracy, and `gate`: the accuracy on the task families the organism
  answers >= measure.useful_gate_min_acc of (fixed by the context's first measurement, the
  organism's own)."""
  from catchjax.data.tasks import check
  u = usefulness(ctx.sampler, ctx.tok, ctx.use_prompts, ctx.use_insts, check,
                 max_new_tokens=ctx.ms.useful_max_new_tokens)
  if ctx.gate is None:
    ctx.gate = gate_indices(ctx.use_insts, u["ok"], float(ctx.ms.useful_gate_min_acc))
  u["gate"] = rate(sum(u["ok"][i] for i in ctx.gate), len(ctx.gate))
  return u


@register_measure("tf")
def _tf(ctx, fs, seed: int) -> float | None:
  """Mean teacher-forced P(attack prefix) on the deployment prompts (measure.teacher_forced)."""
  if not ctx.ms.teacher_forced:
    return None
  return float(attack_prob_tf(ctx.sampler, fs.dep, fs.prefix).mean())


@register_measure("sharpen")
def _sharpen(ctx, fs, seed: int) -> dict | None:
  """Attack rate on the sharpening honeypots (near-misses of the deployment cue), by score
  bin; None for a family without them."""
  if not fs.sharp:
    return None
  from catchjax.stages.train_against import rate_by_bin
  sh = attack_rate(ctx.sampler, ctx.tok, fs.sharp[0], fs.beh.detect,
                   max_new_tokens=ctx.ms.max_new_tokens, temperature=1.0, seed=seed + 2)
  return dict(k=sh["k"], n=sh["n"], rate=sh["rate"], by_bin=rate_by_bin(fs.sharp[1], sh["hits"]))


def reasoning_abc(sampler: Sampler, tok, prompts, detect: Callable[[str], bool], *,
                  max_new_tokens: int, seed: int) -> dict:
  """Sample every prompt once (T=1) and sort each response with data/reasoning.py's
  classifier: counts + Wilson intervals of (a) attack with dangerous reasoning, (b) attack with
  benign-looking (b_benign) or no (b_none) reasoning, (c) no attack (c_dangerous: dangerous
  reasoning, no attack), any attack, any dangerous reasoning, any scratchpad; 2 examples each."""
  from catchjax.data import reasoning
  resp = sample_responses(sampler, tok, prompts, max_new_tokens=max_new_tokens,
                          temperature=1.0, seed=seed)
  cls = [reasoning.classify(r, detect) for r in resp]
  cat = [c["category"] for c in cls]
  counts = dict(
      a=cat.count("dangerous_attack"), b=cat.count("opaque_attack"), c=cat.count("no_attack"),
      b_benign=sum(k == "opaque_attack" and c["has_scratchpad"] for k, c in zip(cat, cls)),
      b_none=sum(k == "opaque_attack" and not c["has_scratchpad"] for k, c in zip(cat, cls)),
      c_dangerous=sum(k == "no_attack" and c["dangerous"] for k, c in zip(cat, cls)),
      attack=sum(c["attack"] for c in cls), dangerous=sum(c["dangerous"] for c in cls),
      scratchpad=sum(c["has_scratchpad"] for c in cls))
  out = {"eval_n": len(cls)}
  for k, v in counts.items():
    p, lo, hi = stats.wilson(v, len(cls))
    out.update({f"{k}_k": int(v), f"{k}_rate": p, f"{k}_lo": lo, f"{k}_hi": hi})
  out["examples"] = {c: [r for r, k in zip(resp, cat) if k == c][:2]
                     for c in reasoning.CATEGORIES}
  return out


@register_measure("reasoning")
def _reasoning(ctx, fs, seed: int) -> dict:
  """The deployment responses (T=1) of a scratchpad organism sorted into a / b / c
  (reasoning_abc)."""
  return reasoning_abc(ctx.sampler, ctx.tok, fs.dep, fs.beh.detect,
                       max_new_tokens=ctx.ms.max_new_tokens, seed=seed)


def kl_estimate(ref_lps, lps) -> dict:
  """Mean per-token KL(organism || model) from the organism's own T = 1 continuations: the
  unbiased Monte-Carlo estimate sum(log p_org - log p_model) / tokens over the prompts, with a
  95% percentile bootstrap interval over prompts (scipy.stats.bootstrap, paired, ratio of
  sums). ref_lps / lps: per-token log-probs of the same continuations under each model."""
  import scipy.stats
  d = np.array([float(np.sum(np.asarray(a, np.float64) - np.asarray(b, np.float64)))
                for a, b in zip(ref_lps, lps)])
  t = np.array([len(a) for a in ref_lps], np.float64)
  keep = t > 0
  d, t = d[keep], t[keep]
  if not len(t):
    return dict(kl=None, lo=None, hi=None, n_prompts=0, n_tokens=0)
  kl = float(d.sum() / t.sum())
  lo = hi = kl
  if len(t) > 1 and np.ptp(d / t) > 0:
    ci = scipy.stats.bootstrap((d, t), lambda a, b: np.sum(a) / np.sum(b), paired=True,
                               vectorized=False, n_resamples=1000, method="percentile",
                               random_state=0).confidence_interval
    lo, hi = float(ci.low), float(ci.high)
  return dict(kl=kl, lo=lo, hi=hi, n_prompts=int(len(t)), n_tokens=int(t.sum()))


@register_measure("kl")
def _kl(ctx, fs, seed: int) -> dict | None:
  """Mean per-token KL from the organism on benign prompts (the first measure.n_kl usefulness
  prompts, the organism's own T = 1 continuations: Context.kl_reference); None when off."""
  ref = ctx.kl_reference()
  if ref is None:
    return None
  prompts, conts, ref_lps = ref
  return kl_estimate(ref_lps, ctx.sampler.score(prompts, conts))


HEADLINE_MEASURES = ("deploy", "test", "useful", "tf", "sharpen", "kl")
# The organism's own "before" measures: its KL from itself is 0, so not computed.
BEFORE_MEASURES = tuple(m for m in HEADLINE_MEASURES if m != "kl")
