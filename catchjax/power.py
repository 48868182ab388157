"""The power rule: a policy that extends the headline's plan (config.headline.power_*).

After the grid, seeds are added at the largest N, one round at a time, to the families whose
headline point has < power_min_seeds runs or a 95% CI half-width over power_goal (on the
paired treatment - control contrast, or on each arm's own interval), up to power_max_seeds.
Each round decides from the seeds before it, so a resumed run adds the same seeds as an
uninterrupted one."""
from __future__ import annotations

import numpy as np

from catchjax import report
from catchjax.pipeline import Cell


def power_rounds(config, runner, names: list[str], bname: str):
  """The power rule (config.headline.power_*), a policy that extends the plan: after the grid,
  seeds are added at the largest N, one round at a time, to the families whose headline
  point has < power_min_seeds runs or a 95% CI half-width over power_goal, up to
  power_max_seeds. Each round decides from the seeds before it, so a resumed run adds the
  same seeds as an uninterrupted one. Yields each round's cells."""
  h = config.headline
  big, arms = max(h.ns), tuple(h.arms)
  goal, lo, hi = float(h.power_goal), int(h.power_min_seeds), int(h.power_max_seeds)
  p_arms = tuple(a for a in ("treatment", "control") if a in arms)
  seed = max(h.seeds)
  while hi > 0 and p_arms:
    seed += 1
    rows = [r for r in runner.rows(behaviour=bname) if r["seed"] < seed]
    pts = _half_widths(config)(rows, big, p_arms)
    todo = [f for f in names if report.needs_seed(pts.get((f, bname)), goal, lo, hi)]
    if not todo:
      return
    runner.status(f"power top-up: seed {seed}, {len(todo)} famil"
                  f"{'y' if len(todo) == 1 else 'ies'}")
    yield [Cell("headline", f, bname, int(big), a, seed) for f in todo for a in arms]


def _half_widths(config):
  return (report.contrast_half_widths if config.headline.get("power_target", "arms") ==
          "contrast" else report.point_half_widths)


def describe(config) -> str:
  """The power rule in one sentence, for the report header."""
  h = config.headline
  if h.power_max_seeds <= 0:
    return "off (fixed seeds)"
  what = ("paired treatment - control retained-gap contrast"
          if h.get("power_target", "arms") == "contrast" else "treatment or control point")
  return (f"seeds added at the largest N while a family's {what} had < {h.power_min_seeds} "
          f"seeds or a 95% CI half-width > {h.power_goal} (at most {h.power_max_seeds} "
          "seeds); a sequential rule, so the stopping intervals are slightly optimistic")


def power_outcome(config, runner, names, bname) -> dict:
  """Each family's power-rule outcome at the largest N, for the report."""
  h = config.headline
  big, goal, hi = max(h.ns), float(h.power_goal), int(h.power_max_seeds)
  p_arms = tuple(a for a in ("treatment", "control") if a in tuple(h.arms))
  pts = _half_widths(config)(runner.rows(behaviour=bname), big, p_arms)
  out = {}
  for f in names:
    p = pts.get((f, bname))
    if p is None:
      continue
    why = ("goal met" if p["measurable"] and p["half_width"] <= goal else
           "not measurable (no retained value in some arm)" if not p["measurable"] else
           f"power_max_seeds={hi} reached" if p["runs"] >= hi else "power rule off")
    out[f] = dict(n=int(big), seeds=p["runs"], why=why,
                  half_width=round(p["half_width"], 4) if np.isfinite(p["half_width"]) else None)
  return out


__all__ = ["power_rounds", "power_outcome", "describe"]
