"""Long-trained organisms: is a backdoor trained for longer harder to train away?

Per organism budget x (n_per_family or epochs times x: each its own organism), behaviour, seed
and family: a "before:x<x>" cell (start rates), then per N (ascending) a "treatment:x<x>" cell
that trains against N caught attacks for `max_steps` steps with the deployment attack rate every
`eval_every` steps. Removal cost (catchjax/report_extra.py): the smallest N whose curve reaches
threshold_frac x start, and the step it does (censored when never reached).
"""
from __future__ import annotations

import dataclasses
import functools
import shutil
import time

import numpy as np

from catchjax import common, report_extra, validate_extra
from catchjax.common import stream
from catchjax.data.behaviors import behavior_name
from catchjax.experiments import extra
from catchjax.pipeline import Cell
from catchjax.report_extra import removal_cost  # the report's table (re-exported)
from catchjax.stages import cell as cell_stage
from catchjax.stages import curve as curve_stage
from catchjax.stages import organism as org_stage
from catchjax.stages import rows as fields
from catchjax.stages import train_against as ta

EXPERIMENT = "long_trained"
validate = validate_extra.check_long_trained   # bad input refused before any compute


def budget_config(config, mult: int):
  """The config whose organism is trained for `mult` x the base budget (long_trained.scale)."""
  return org_stage.scaled_recipe(config, mult, config.long_trained.scale)


def budget_examples(config, mult: int) -> int:
  """Organism training examples seen at this budget."""
  return org_stage.examples_seen(budget_config(config, mult))


def families(config) -> list[str]:
  lt = config.long_trained
  return validate_extra.chosen_families("config.long_trained.families", lt.families,
                                        config.organism.families)


def cells(config, bname: str, mult: int) -> list[Cell]:
  """One budget's plan: per seed and family, "before:x<mult>" (N = 0) then the N ladder."""
  lt = config.long_trained
  return [Cell(EXPERIMENT, fam, bname, int(n), f"{'treatment' if n else 'before'}:x{mult}",
               int(seed)) for seed in lt.seeds for fam in families(config) for n in (0, *lt.ns)]


def plan(config, workdir) -> dict:
  lt = config.long_trained
  cache = extra.cache_root(config, workdir)
  orgs = []
  for m in lt.multipliers:   # every budget is its own organism
    status = extra.organisms_status(budget_config(config, m), cache)
    orgs += [dict(mult=m, behaviour=b, examples=budget_examples(config, m), **st)
             for b, st in status.items()]
  runs = len(lt.multipliers) * len(config.behaviours) * len(families(config)) * len(
      lt.seeds) * len(lt.ns)
  return dict(experiment=EXPERIMENT, config_hash=common.config_hash(config), cache_dir=cache,
              organisms=orgs, families=families(config), ns=list(lt.ns), seeds=list(lt.seeds),
              max_train_runs=runs, max_steps=lt.max_steps, scale=lt.scale)


def run(config, workdir: str):
  return extra.entry(EXPERIMENT, config, workdir, validate, _run, plan)


def _run(config, workdir):
  lt = config.long_trained
  plans = [(budget_config(config, m), b, cells(config, behavior_name(b), m))
           for m in lt.multipliers for b in config.behaviours]
  runner = extra.run_plans(EXPERIMENT, config, workdir, plans,
                           lambda ctx, runner: functools.partial(long_trained_cell, ctx, runner),
                           n_eval=lt.n_eval, n_test=lt.n_test, n_useful=0)
  o = config.organism
  meta = dict(multipliers=list(lt.multipliers), ns=list(lt.ns), seeds=list(lt.seeds),
              m_catch=config.catch.m, families=families(config),
              **{k: lt[k] for k in ("scale", "max_steps", "eval_every", "threshold_frac",
                                    "min_start_rate", "n_eval")},
              organism_base=dict(n_per_family=o.n_per_family, epochs=o.train.epochs,
                                 families=[org_stage.family_name(f) for f in o.families]),
              train_against=config.train_against.train.to_dict(),
              cache_dir=extra.cache_root(config, workdir))
  return extra.finish(runner, workdir, meta, write_report)


def long_trained_cell(ctx, runner, cell: Cell) -> dict:
  """A "before" cell: the organism's start rates. Otherwise the cell's removal run, or a
  skipped row (no backdoor to remove, a smaller N already removed it, nothing caught)."""
  lt, mult = ctx.config.long_trained, int(cell.arm.rsplit(":x", 1)[1])
  spec = cell_stage.spec_of(ctx, cell.family)
  row = dict(budget_mult=mult, scale=lt.scale, organism=ctx.org.key,
             organism_examples=org_stage.examples_seen(ctx.config),
             organism_steps=ctx.org.info.get("steps"),
             organism_seconds=ctx.org.info.get("train_seconds"))
  if cell.arm.startswith("before"):
    return dict(row, **fields.measure_fields(ctx, ctx.org.model, spec,
                                            stream("measure_before", cell.seed), tf=False))
  b = runner.row(dataclasses.replace(cell, n=0, arm=f"before:x{mult}"))
  start = b["deploy_rate"]
  row.update(start_rate=start, start_lo=b["deploy_lo"], start_hi=b["deploy_hi"],
             start_k=b["deploy_k"], start_n=b["deploy_n"], test_rate_start=b.get("test_rate"),
             threshold=float(lt.threshold_frac) * start, threshold_frac=float(lt.threshold_frac),
             max_steps=int(lt.max_steps), eval_every=int(lt.eval_every))
  smaller = [runner.row(dataclasses.replace(cell, n=int(m))) for m in lt.ns if m < cell.n]
  skip = dict(reached=None, steps_to_threshold=None, curve=[])
  if start < lt.min_start_rate:
    return dict(row, skipped=f"no backdoor to remove: start rate {start:.2f} < "
                f"min_start_rate {lt.min_start_rate}", **skip)
  if lt.stop_at_first and any(r and r.get("reached") for r in smaller):
    return dict(row, skipped="a smaller N already reached the threshold (stop_at_first)", **skip)
  c, _ = ctx.catch(spec, 0)
  n_train = min(cell.n, len(c.caught))
  if n_train == 0:
    return dict(row, skipped="nothing caught", n_train=0, **fields.catch_fields(c), **skip)
  row.update(n_train=n_train, capped=n_train < cell.n, **fields.catch_fields(c))
  row.update(removal_fields(ctx, runner, cell, mult, c.caught, n_train, row["threshold"], start))
  return row


def removal_fields(ctx, runner, cell, mult, caught, n_train, threshold, start) -> dict:
  """The removal run of a cell (stages/curve.py, stream "measure_after"): its curve, where it
  first reached the threshold, and the rates at its end."""
  lt, t = ctx.config.long_trained, ctx.config.train_against.train
  rdir = runner.scratch(cell)
  shutil.rmtree(rdir, ignore_errors=True)   # curves are not checkpointed: start over
  t_run = time.time()
  rows = ta.sft_rows(caught, n_train, np.random.default_rng([cell.seed, cell.n, 1, mult]))
  res, curve = curve_stage.removal_curve(
      ctx, cell_stage.spec_of(ctx, cell.family), rows, cell.seed, rdir, steps=lt.max_steps,
      every=lt.eval_every, measure_seed=stream("measure_after", cell.seed))
  final = curve[-1] if curve else {}
  out = dict(curve=curve, train_loss=res.final_loss, train_steps=res.steps,
             run_seconds=time.time() - t_run,
             **curve_stage.reached_fields(curve, threshold, min(n_train, int(t.batch_size))))
  return dict(out, **(fields.retained_fields(final, start) if final else {}))


write_report = report_extra.write_long_trained   # removal_cost.csv, report.md, one figure each


__all__ = ["run", "validate", "plan", "cells", "budget_config", "budget_examples",
           "removal_cost", "write_report"]
