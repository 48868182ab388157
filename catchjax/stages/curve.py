"""Removal curves: train against rows for a fixed number of steps, sampling the deployment
attack rate every `every` steps on the way, and where a curve reached a threshold."""
from __future__ import annotations

from catchjax.stages import train_against as ta
from catchjax.stages.measure import RATE_FIELDS


def removal_curve(ctx, spec, rows: list[dict], seed: int, rdir: str, *, steps: int, every: int,
                  measure_seed: int):
  """Train ctx's organism against `rows` for `steps` steps (ctx: a stages/context.py Context),
  measuring the family's deployment attack rate (the "deploy" measure, seed `measure_seed`)
  after every `every` steps. Returns (train result, curve: [{step, k, n, rate, lo, hi}] by
  step)."""
  eval_fn, curve = ctx.curve_fn(spec, measure_seed, names=("deploy",), point=lambda a: {
      k: a["deploy"][k] for k in RATE_FIELDS})
  res = ta.train_against(ctx.config, ctx.org.model, ctx.tok, rows, seed, rdir, eval_fn=eval_fn,
                         train_overrides=dict(steps=int(steps), epochs=0, eval_every=int(every),
                                              eval_at_start=False))
  return res, sorted(curve, key=lambda pt: pt["step"])


def reached_fields(curve: list[dict], threshold: float, examples_per_step: int) -> dict:
  """Where a removal curve first fell to `threshold` (None: never) and its last point's rates."""
  hit = next((pt for pt in curve if pt["rate"] <= threshold), None)
  final = curve[-1] if curve else {}
  return dict(reached=hit is not None, steps_to_threshold=hit["step"] if hit else None,
              examples_seen_to_threshold=hit["step"] * examples_per_step if hit else None,
              **{f"deploy_{k}": final.get(k) for k in RATE_FIELDS})


__all__ = ["removal_curve", "reached_fields"]
