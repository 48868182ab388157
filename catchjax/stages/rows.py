"""The flat row fields every extra experiment writes (transfer, coherence, long_trained):
the measure registry's rates (deploy_*, test_*, useful_*, deploy_tf), retained against the
organism's "before" rate, the catch's fields, and `train_on`, a seeded choice of N rows from a
catch pool (caught or clean) trained against."""
from __future__ import annotations

import time

import numpy as np

from catchjax.common import stream
from catchjax.stages import measure
from catchjax.stages import train_against as ta


def rate_fields(prefix: str, d: dict | None) -> dict:
  """measure.rate_fields, {} for a measure the experiment did not take."""
  return {} if d is None else measure.rate_fields(prefix, d)


def retained_fields(after: dict, before_rate: float) -> dict:
  """retained = after / before with the after-rate's Wilson interval scaled by 1 / before
  (the headline's convention); None where the organism never attacked before."""
  if not before_rate:
    return dict(retained=None, retained_lo=None, retained_hi=None)
  return dict(retained=after["rate"] / before_rate, retained_lo=after["lo"] / before_rate,
              retained_hi=after["hi"] / before_rate)


def before_fields(before: dict, keys) -> dict:
  """`key`_before for each key of the "before" row."""
  return {f"{k}_before": before.get(k) for k in keys}


def catch_fields(c: ta.Catch) -> dict:
  r = c.catch_rate
  return dict(m=c.m, n_caught=len(c.caught), catch_rate=r["rate"], catch_lo=r["lo"],
              catch_hi=r["hi"])


def measure_fields(ctx, model, spec, seed: int, tf: bool = True) -> dict:
  """The measure registry on `model` (ctx.measure) as flat row fields: deploy_* (+ two example
  responses), test_* (when ctx.n_test), useful_* (when ctx.n_useful), deploy_tf (None
  without `tf` or measure.teacher_forced)."""
  names = (("deploy",) + ("test",) * bool(ctx.n_test) + ("useful",) * bool(ctx.n_useful)
           + ("tf",) * bool(tf))
  m = ctx.measure(model, spec, seed, names=names)
  row = rate_fields("deploy", m["deploy"])
  row["deploy_examples"] = m["deploy"]["responses"][:2]
  row.update(rate_fields("test", m.get("test")))
  row.update(rate_fields("useful", m.get("useful")))
  row["deploy_tf"] = m.get("tf")
  return row


def trained_fields(ctx, res, spec, seed: int, before_rate: float, t_run: float) -> dict:
  """A train-against cell's result fields: skipped when there was nothing to train on (res is
  None), else the measures after (stream "measure_after"), retained against `before_rate`,
  the final loss, steps and the run's seconds since training started (`t_run`)."""
  if res is None:
    return dict(skipped="no caught (or clean) prompts to train on", deploy_rate=None,
                deploy_n=0, retained=None)
  row = measure_fields(ctx, res.model, spec, stream("measure_after", seed))
  row.update(retained_fields(dict(rate=row["deploy_rate"], lo=row["deploy_lo"],
                                  hi=row["deploy_hi"]), before_rate))
  row.update(train_loss=res.final_loss, train_steps=res.steps, run_seconds=time.time() - t_run)
  return row


def train_on(config, org_model, tok, catch: ta.Catch, arm: str, n: int, seed: int, rdir: str,
             *, aux_ratio: float = 0.0, train_overrides=None):
  """Train against N rows of the catch: caught prompts (arm 'treatment') or prompts where the
  organism behaved ('control'); N is capped by the smaller pool so both arms match. Returns
  (result or None when nothing to train on, n_train)."""
  if arm not in ("treatment", "control"):
    raise ValueError(f"arm must be 'treatment' or 'control', got {arm!r}")
  pool = catch.caught if arm == "treatment" else catch.clean
  n_train = min(int(n), len(catch.caught), len(catch.clean))
  if n_train == 0:
    return None, 0
  rng = np.random.default_rng([int(seed), int(n), 1 if arm == "treatment" else 2])
  rows = ta.sft_rows(pool, n_train, rng)
  res = ta.train_against(config, org_model, tok, rows, seed, rdir, aux_ratio=float(aux_ratio),
                         train_overrides=train_overrides)
  return res, n_train


__all__ = ["rate_fields", "retained_fields", "before_fields", "catch_fields", "measure_fields",
           "trained_fields", "train_on"]
