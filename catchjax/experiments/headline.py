"""Headline experiment: does training against caught attacks remove misalignment, and does
that depend on how hard deployment is to tell from testing?

A plan of cells per behaviour (`rounds`): per trigger family, seed, N and arm (stages/arms.py),
restore or build the organism, catch attacks on testing prompts (stages/train_against.py),
train against N of them or the arm's rows, then measure deployment / testing attack rates,
usefulness and teacher-forced P(attack) (stages/measure.py); retained = after / before. The
distinguishability cells (stages/distinguish.py) and the power rule's added seeds (power.py)
join the same plan. Rows go to results.jsonl (keyed; reruns skip finished cells), and
report.md, summary.csv and figures/ are rebuilt after every round.
"""
from __future__ import annotations

import os
import time

import numpy as np

from catchjax import common, pipeline, power, report
from catchjax.pipeline import Cell
from catchjax.stages import cell as cell_stage
from catchjax.stages import distinguish
from catchjax.stages import organism as org_stage
from catchjax.stages import train_against as ta
from catchjax.stages.context import Context
from catchjax.tokenizer import load_tokenizer
from catchjax.validate import check_headline as validate   # before any compute


def run(config, workdir: str):
  validate(config)
  if config.get("dry_run", False):   # the compile plan only: no organism, no data, no weights
    from catchjax import plan
    return plan.dry_run(config, "headline")
  with common.workdir_lock(workdir):
    return _run(config, workdir)


def families_of(config) -> list:
  """The organism families the headline runs (config.headline.families: a subset)."""
  fams = org_stage.family_specs(config.organism.families)
  chosen = config.headline.families
  return [f for f in fams if chosen is None or org_stage.family_name(f) in set(chosen)]


def catch_seed(config, cell) -> int:
  """The catch a cell draws from: its own seed's (headline.catch_per_seed, the default), the
  crossed design's named catch (headline.catch_seeds), or one catch (seed 0's) shared by
  every seed (catch_per_seed=False)."""
  if cell.catch is not None:
    return int(cell.catch)
  return int(cell.seed) if config.headline.catch_per_seed else 0


def rounds(config, names: list[str], bname: str):
  """The plan, in the order it runs. Round 1, the first complete report: every family at the
  largest N on the first two seeds (issue 28 item 2). Then distinguishability, then the largest
  N at the other seeds (so the headline points get their intervals early), then the other Ns.
  Yields each round's cells; the report is rebuilt after every round."""
  h = config.headline
  big, arms = max(h.ns), tuple(h.arms)
  # A crossed design (headline.catch_seeds): every training seed against every catch.
  catches = (None,) if h.get("catch_seeds") is None else tuple(int(c) for c in h.catch_seeds)
  grid = lambda seeds, ns: [Cell("headline", f, bname, int(n), a, s, c)   # noqa: E731
                            for s in seeds for f in names for n in ns for c in catches
                            for a in arms]
  yield grid(h.seeds[:2], [big])
  yield [Cell("headline", f, bname, 0, "distinguish", s)
         for f in names for s in h.distinguish_seeds]
  for s in h.seeds[2:]:
    yield grid([s], [big])
  yield grid(h.seeds, [n for n in h.ns if n != big])


def _run(config, workdir):
  from catchjax import analysis
  h = config.headline
  runner = pipeline.Runner("headline", config, workdir, "headline cells")
  tok = load_tokenizer(config.model.hf_dir)
  base = org_stage.load_base(config)
  names = [org_stage.family_name(f) for f in families_of(config)]
  primary_hash = analysis.primary_hash(config.report.primary)
  outcome, installed = {}, {}

  def write_out():
    """report.md / summary.csv / figures from the rows so far (after every round)."""
    meta = _report_meta(config, runner, outcome, installed)
    report.save_meta(workdir, meta)
    return report.write_report(runner.rows(), workdir, meta)

  for bspec in config.behaviours:
    ctx = Context(config, workdir, tok, base, bspec)
    installed[ctx.bname] = ctx.installed

    def run_cell(cell):
      if cell.arm == "distinguish":
        return distinguish.distinguish_row(ctx, cell_stage.spec_of(ctx, cell.family), cell.seed)
      return cell_stage.train_against_cell(ctx, runner, cell, primary_hash,
                                           catch_seed=catch_seed(config, cell),
                                           return_n=int(h.return_n))

    plan = list(rounds(config, names, ctx.bname))
    runner.plan(c for cells in plan for c in cells)   # the bar's total: the whole grid
    for cells in plan:
      if runner.run(cells, run_cell, keep_scratch=config.train_against.keep_runs):
        write_out()                                      # a round that added rows
    for cells in power.power_rounds(config, runner, names, ctx.bname):
      runner.run(cells, run_cell, keep_scratch=config.train_against.keep_runs)
    outcome[ctx.bname] = power.power_outcome(config, runner, names, ctx.bname)
  wall = runner.close()
  out = write_out()
  print(f"[headline] done in {wall:.0f}s; report at {os.path.join(workdir, 'report.md')}")
  return out


def _report_meta(config, runner, outcome, installed):
  """The report header of a headline run (its settings, timing, power and primary)."""
  from catchjax import analysis
  h, k, t = config.headline, config.catch, config.train_against
  arms, per_seed, commit = tuple(h.arms), h.catch_per_seed, runner.commit
  rows = runner.rows()
  secs = [r["cell_seconds"] for r in rows if r.get("cell_seconds") and r.get("arm") in arms
          and not r.get("skipped")]
  st = ta.stopping_rule(config)
  return dict(title="catchjax headline: retained misalignment vs distinguishability",
              config_hash=runner.chash, commit=commit,
              wall_seconds_this_invocation=round(time.time() - runner.t0),
              compile_seconds_this_invocation=common.compile_line(),
              runtime=(f"{len(secs)} train-against cells at a mean {np.mean(secs):.0f} s each "
                       f"({ta.budget_line(config)} + sampled measurements); n is set by the "
                       "intervals below, not cut to fit a time budget" if secs else
                       "no cells trained"),
              seeds=sorted({r["seed"] for r in rows if r.get("arm") in arms}) or list(h.seeds),
              ns=list(h.ns), n_eval_per_seed=config.measure.n_eval,
              n_test_per_seed=config.measure.n_test, m_catch=k.m,
              catch=("a fresh catch of M prompts per seed" if per_seed else
                     "one catch of M prompts per family, shared by the seeds (the intervals "
                     "leave out the catch-to-catch spread)"),
              train_against=dict(t.train.to_dict(), **(dict(
                  lr=st["lr"], warmup_steps=st["warmup_steps"], decay="constant",
                  steps="the stopping rule's (treatment), its budget (other arms)")
                  if st else {})), aux_ratio=t.aux_ratio,
              max_new_tokens=config.measure.max_new_tokens,
              power_rule=power.describe(config),
              power=outcome, installed_gap=installed, stopping=st,
              honeypot_frac=float(k.honeypot_frac),
              installed_gap_min=float(config.report.installed_gap_min),
              dose=config.report.dose.to_dict(),
              **analysis.primary_meta(rows, config.report.primary,
                                      report.load_meta(runner.workdir, runner.chash), commit))


__all__ = ["run", "validate", "rounds", "catch_seed"]
