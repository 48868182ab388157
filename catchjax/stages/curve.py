"""Removal curves: train against rows for a fixed number of steps, sampling the deployment
attack rate every `every` steps on the way (the long-trained experiment's removal cost)."""
from __future__ import annotations

from catchjax.stages import train_against as ta
from catchjax.stages.measure import RATE_FIELDS


def removal_curve(ctx, spec, rows: list[dict], seed: int, rdir: str, *, steps: int, every: int,
                  measure_seed: int):
  """Train ctx's organism against `rows` for `steps` steps (ctx: a stages/context.py Context),
  measuring the family's deployment attack rate (the "deploy" measure, seed `measure_seed`)
  after every `every` steps. Returns (train result, curve: [{step, k, n, rate, lo, hi}] by
  step)."""
  curve: list[dict] = []

  def eval_fn(model, step):
    if any(pt["step"] == int(step) for pt in curve):
      return None
    d = ctx.measure(model, spec, measure_seed, names=("deploy",))["deploy"]
    curve.append(dict(step=int(step), **{k: d[k] for k in RATE_FIELDS}))
    return {"deploy_rate": d["rate"]}

  res = ta.train_against(ctx.config, ctx.org.model, ctx.tok, rows, seed, rdir, eval_fn=eval_fn,
                         train_overrides=dict(steps=int(steps), epochs=0, eval_every=int(every),
                                              eval_at_start=False))
  curve.sort(key=lambda pt: pt["step"])
  return res, curve


__all__ = ["removal_curve"]
