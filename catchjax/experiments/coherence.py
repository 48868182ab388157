"""Coherence auxiliary objective ablation: does mixing usefulness examples into train-against
(ratio r, stages/train_against.py `aux_ratio`) change how much misalignment is retained?

The plan, per behaviour (the cached multi-family organism), seed and family: one "before"
cell, then per arm and ratio r a cell that trains against N caught (treatment) or N clean
(control) prompts of the family + round(r * N) usefulness examples, measured on the family's
held-out deployment prompts (retained = after / before) and on usefulness prompts.
Rows: arm "<arm>:aux=<r>"; report.md, coherence_summary.csv and
figures/coherence_<behaviour>.png (catchjax/report_extra.py).
"""
from __future__ import annotations

import dataclasses
import functools
import time

from catchjax import common, report_extra, validate_extra
from catchjax.common import stream
from catchjax.data.behaviors import behavior_name
from catchjax.experiments import extra
from catchjax.pipeline import Cell
from catchjax.report_extra import coherence_summary as summary_rows  # (re-exported)
from catchjax.stages import cell as cell_stage
from catchjax.stages import rows as fields

EXPERIMENT = "coherence"
ARMS = validate_extra.TRAIN_ARMS
BEFORE_KEYS = ("deploy_rate", "deploy_k", "deploy_n", "useful_rate", "useful_k", "useful_n")


def arm_label(arm: str, r: float) -> str:
  return f"{arm}:aux={float(r):g}"


def validate(config):
  """Reject bad input before any compute, naming the field (catchjax/validate_extra.py)."""
  validate_extra.check_coherence(config)


def families(config) -> list[str]:
  a = config.coherence
  return validate_extra.chosen_families("config.coherence.families", a.families,
                                        config.organism.families)


def cells(config, bname: str) -> list[Cell]:
  """Per seed and family: the "before" cell, then every (arm, ratio)."""
  a = config.coherence
  out = []
  for seed in a.seeds:
    for fam in families(config):
      out.append(Cell(EXPERIMENT, fam, bname, 0, "before", int(seed)))
      out += [Cell(EXPERIMENT, fam, bname, int(a.n), arm_label(arm, r), int(seed))
              for arm in a.arms for r in a.aux_ratios]
  return out


def plan(config, workdir) -> dict:
  a = config.coherence
  cache = extra.cache_root(config, workdir)
  runs = len(config.behaviours) * len(families(config)) * len(a.seeds) * len(a.arms) * len(
      a.aux_ratios)
  return dict(experiment=EXPERIMENT, config_hash=common.config_hash(config), cache_dir=cache,
              organisms=extra.organisms_status(config, cache), families=families(config),
              aux_ratios=list(a.aux_ratios), arms=list(a.arms), n=a.n, seeds=list(a.seeds),
              train_runs=runs, cells=runs)


def run(config, workdir: str):
  return extra.entry(EXPERIMENT, config, workdir, validate, _run, plan)


def _run(config, workdir):
  a, t = config.coherence, config.train_against
  plans = [(config, b, cells(config, behavior_name(b))) for b in config.behaviours]
  runner = extra.run_plans(EXPERIMENT, config, workdir, plans,
                           lambda ctx, runner: functools.partial(coherence_cell, ctx, runner),
                           n_eval=a.n_eval, n_test=a.n_test, n_useful=a.n_useful)
  meta = dict(n=a.n, aux_ratios=list(a.aux_ratios), arms=list(a.arms), seeds=list(a.seeds),
              match_against_passes=a.match_against_passes, n_eval=a.n_eval,
              n_useful=a.n_useful, train_against=t.train.to_dict(),
              cache_dir=extra.cache_root(config, workdir))
  return extra.finish(runner, workdir, meta, write_report)


def coherence_cell(ctx, runner, cell: Cell) -> dict:
  """A "before" cell: the organism's measures. Otherwise: train against the cell's arm with
  its usefulness mixture (with match_against_passes, round(steps * (1 + r)) steps, so the
  caught rows get as many passes as at r = 0), then measure."""
  config, a = ctx.config, ctx.config.coherence
  spec = cell_stage.spec_of(ctx, cell.family)
  if cell.arm == "before":
    return dict(organism=ctx.org.key, **fields.measure_fields(
        ctx, ctx.org.model, spec, stream("measure_before", cell.seed)))
  arm, r = next((x, float(y)) for x in a.arms for y in a.aux_ratios
                if arm_label(x, y) == cell.arm)
  steps0 = int(config.train_against.train.steps)
  steps = int(round(steps0 * (1 + r))) if a.match_against_passes and steps0 > 0 else steps0
  c, _ = ctx.catch(spec, 0)
  b = runner.row(dataclasses.replace(cell, n=0, arm="before"))
  t_run = time.time()
  res, n_train = fields.train_on(config, ctx.org.model, ctx.tok, c, arm, cell.n, cell.seed,
                                  runner.scratch(cell), aux_ratio=r,
                                  train_overrides=dict(steps=steps) if steps0 > 0 else None)
  row = dict(organism=ctx.org.key, train_arm=arm, aux_ratio=r,
             n_aux=max(1, int(round(r * n_train))) if r > 0 and n_train else 0,
             match_against_passes=bool(a.match_against_passes), **fields.catch_fields(c),
             n_train=n_train, capped=n_train < cell.n, **fields.before_fields(b, BEFORE_KEYS))
  row.update(fields.trained_fields(ctx, res, spec, cell.seed, b["deploy_rate"], t_run))
  return row


def write_report(rows: list[dict], workdir: str, meta: dict) -> dict:
  """coherence_summary.csv, report.md and one figure per behaviour."""
  return report_extra.write_coherence(rows, workdir, meta)


__all__ = ["run", "validate", "plan", "cells", "summary_rows", "write_report", "arm_label"]
