"""Cross-domain transfer: does training against caught attacks in one domain remove the
misalignment in the others?

The plan, per behaviour (the multi-family organism, restored from the cache) and seed:
  1. "before" cells: the organism's sampled deployment attack rate on every target family;
  2. "<arm>:<source>" cells, one per target: train against N caught attacks of the source
     (treatment) or N source prompts where the organism behaved (control), with the headline's
     train-against settings, then measure the target's deployment attack rate; retained =
     after / before. A (source, arm, seed) is trained once and measured on every target.
Rows (results.jsonl): one per (target, behaviour, N, arm "<arm>:<source>", seed) plus one
"before" row per (target, seed); report.md, transfer_summary.csv and
figures/transfer_matrix_<behaviour>.png (catchjax/report_extra.py).
"""
from __future__ import annotations

import dataclasses
import shutil
import time

from catchjax import common, report_extra, validate_extra
from catchjax.common import stream
from catchjax.data.behaviors import behavior_name
from catchjax.experiments import extra
from catchjax.pipeline import Cell
from catchjax.report_extra import transfer_matrix as matrix  # (re-exported)
from catchjax.stages import cell as cell_stage
from catchjax.stages import rows as fields
from catchjax.stats import newcombe_diff  # re-exported: the tests import it here

EXPERIMENT = "transfer"
ARMS = validate_extra.TRAIN_ARMS
BEFORE_KEYS = ("deploy_rate", "deploy_k", "deploy_n", "deploy_lo", "deploy_hi", "deploy_tf")


def validate(config):
  """Reject bad input before any compute, naming the field (catchjax/validate_extra.py)."""
  validate_extra.check_transfer(config)


def families(config) -> tuple[list[str], list[str]]:
  """(source names, target names), in the organism's family order."""
  t, fams = config.transfer, config.organism.families
  return (validate_extra.chosen_families("config.transfer.sources", t.sources, fams),
          validate_extra.chosen_families("config.transfer.targets", t.targets, fams))


def cells(config, bname: str) -> list[Cell]:
  """The plan of one behaviour: per seed, the targets' "before" cells, then per source and arm
  every target (consecutive cells share one train-against run)."""
  t = config.transfer
  sources, targets = families(config)
  out = []
  for seed in t.seeds:
    out += [Cell(EXPERIMENT, tg, bname, 0, "before", int(seed)) for tg in targets]
    out += [Cell(EXPERIMENT, tg, bname, int(t.n), f"{arm}:{s}", int(seed))
            for s in sources for arm in t.arms for tg in targets]
  return out


def plan(config, workdir) -> dict:
  """What a run would do (dry run): cells, cache folder and which organisms are cached."""
  t = config.transfer
  sources, targets = families(config)
  cache = extra.cache_root(config, workdir)
  runs = len(config.behaviours) * len(t.seeds) * len(sources) * len(t.arms)
  return dict(experiment=EXPERIMENT, config_hash=common.config_hash(config), cache_dir=cache,
              organisms=extra.organisms_status(config, cache), sources=sources,
              targets=targets, arms=list(t.arms), n=t.n, seeds=list(t.seeds), train_runs=runs,
              cells=runs * len(targets))


def run(config, workdir: str):
  return extra.entry(EXPERIMENT, config, workdir, validate, _run, plan)


def _run(config, workdir):
  t, k, ta_ = config.transfer, config.catch, config.train_against
  plans = [(config, b, cells(config, behavior_name(b))) for b in config.behaviours]
  runner = extra.run_plans(EXPERIMENT, config, workdir, plans, TransferCells, n_eval=t.n_eval,
                           n_test=t.n_test, n_useful=t.n_useful)
  meta = dict(n=t.n, seeds=list(t.seeds), n_eval_per_target=t.n_eval, m_catch=k.m,
              train_against=ta_.train.to_dict(), aux_ratio=ta_.aux_ratio,
              max_new_tokens=config.measure.max_new_tokens, cache_dir=extra.cache_root(config, workdir))
  return extra.finish(runner, workdir, meta, write_report)


class TransferCells:
  """The cell function of one behaviour's plan. It memoises the one train-against run that
  consecutive cells share, keyed by (source, arm, seed), and drops it (and its scratch
  folder) when a cell asks for another."""

  def __init__(self, ctx, runner):
    self.ctx, self.runner, self.config = ctx, runner, ctx.config
    self.key, self.held = None, None

  def trained(self, source: str, arm: str, seed: int):
    """(catch, result or None, n_train, start time, scratch folder) of the source's run."""
    if self.key != (source, arm, seed):
      self.close()
      ctx, n = self.ctx, int(self.config.transfer.n)
      c, _ = ctx.catch(cell_stage.spec_of(ctx, source), 0)
      rdir = self.runner.scratch(Cell(EXPERIMENT, source, ctx.bname, n, arm, seed))
      t_run = time.time()
      res, n_train = fields.train_on(self.config, ctx.org.model, ctx.tok, c, arm, n, seed, rdir,
                                      aux_ratio=float(self.config.train_against.aux_ratio))
      self.key, self.held = (source, arm, seed), (c, res, n_train, t_run, rdir)
    return self.held

  def close(self) -> None:
    if self.held is not None and not self.config.train_against.keep_runs:
      shutil.rmtree(self.held[-1], ignore_errors=True)
    self.key, self.held = None, None

  def __call__(self, cell: Cell) -> dict:
    ctx, spec = self.ctx, cell_stage.spec_of(self.ctx, cell.family)
    if cell.arm == "before":
      return dict(organism=ctx.org.key, target=cell.family, **fields.measure_fields(
          ctx, ctx.org.model, spec, stream("measure_before", cell.seed)))
    arm, source = cell.arm.split(":", 1)
    c, res, n_train, t_run, _ = self.trained(source, arm, cell.seed)
    b = self.runner.row(dataclasses.replace(cell, n=0, arm="before"))
    row = dict(organism=ctx.org.key, source=source, target=cell.family, train_arm=arm,
               in_domain=source == cell.family, **fields.catch_fields(c), n_train=n_train,
               capped=n_train < cell.n, aux_ratio=float(self.config.train_against.aux_ratio),
               **fields.before_fields(b, BEFORE_KEYS))
    row.update(fields.trained_fields(ctx, res, spec, cell.seed, b["deploy_rate"], t_run))
    return row


def write_report(rows: list[dict], workdir: str, meta: dict) -> dict:
  """transfer_summary.csv, report.md and one source x target figure per behaviour."""
  return report_extra.write_transfer(rows, workdir, meta)


__all__ = ["run", "validate", "plan", "cells", "matrix", "write_report", "newcombe_diff"]
