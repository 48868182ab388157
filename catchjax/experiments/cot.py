"""Training against dangerous chain-of-thought (issue 6, item 2).

A plan of cells per behaviour x measured family of a *scratchpad organism*
(config.organism.scratchpad; it writes `<scratchpad>REASONING</scratchpad> ACTION`, see
data/reasoning.py), each measured on held-out deployment prompts with the `reasoning` measure
(stages/measure.py: every response sorted into (a) attack + dangerous reasoning, (b) attack +
benign or no reasoning, i.e. opaque, (c) no attack; the attack detector reads the action):
  before       (N = 0) the organism itself, stream "measure_before";
  scratchpad   train against N caught testing attacks (one catch of M prompts per family,
               shared by the seeds) to `<scratchpad>BENIGN</scratchpad> ANSWER`, loss on the
               scratchpad tokens only (answer and EOS masked): training against the reasoning;
  full         the same target, loss on the whole response (+ EOS);
both arms with the same N caught prompts, steps and optimiser, measured with stream
"measure_after". Rows -> results.jsonl; report.md, summary.csv and figures/cot_abc.png
(catchjax/report_cot.py).
"""
from __future__ import annotations

import functools
import os

import numpy as np

from catchjax import common, pipeline, report
from catchjax.data import reasoning
from catchjax.data.behaviors import behavior_name
from catchjax.experiments.extra import cache_root, entry
from catchjax.pipeline import Cell
from catchjax.report_cot import write_report
from catchjax.stages import organism as org_stage
from catchjax.stages import train_against as ta
from catchjax.stages.cell import spec_of
from catchjax.stages.context import Context
from catchjax.tokenizer import load_tokenizer
from catchjax.validate import check_cot as validate

EXPERIMENT = "cot"


def families(config) -> list:
  """The measured family specs (config.cot.families, empty: every organism family)."""
  specs = org_stage.family_specs(config.organism.families)
  chosen = set(config.cot.families or [org_stage.family_name(s) for s in specs])
  return [s for s in specs if org_stage.family_name(s) in chosen]


def run(config, workdir: str):
  """Validate (before any compute), hold the workdir lock, run the plan, write the report."""
  return entry(EXPERIMENT, config, workdir, validate, _run)


def plan(config) -> list[Cell]:
  """Per behaviour, family and seed: the organism ('before', N = 0), then every (N, arm)."""
  x = config.cot
  return [Cell(EXPERIMENT, org_stage.family_name(spec), behavior_name(b), n, arm, s)
          for b in config.behaviours for spec in families(config) for s in x.seeds
          for n, arm in [(0, "before")] + [(int(n), a) for n in x.ns for a in x.arms]]


def _abc(ctx, model, spec, stream: str, seed: int) -> dict:
  """The `reasoning` measure (a / b / c counts) of `model`, drawn from seed stream `stream`."""
  return ctx.measure(model, spec, common.stream(stream, seed), names=("reasoning",))["reasoning"]


def cot_cell(ctx, runner, cell) -> dict:
  """One cell's row fields: the catch's, then the organism's ('before') or the trained
  model's a / b / c counts."""
  x, spec = ctx.config.cot, spec_of(ctx, cell.family)
  c, _ = ctx.catch(spec, 0)   # one catch per family, shared by the seeds
  cls = [reasoning.classify(r["sampled"], ctx.beh.detect) for r in c.caught]
  row = dict(organism=ctx.org.key, benign=x.benign, m=c.m, n_caught=len(c.caught),
             catch_rate=c.catch_rate["rate"], catch_lo=c.catch_rate["lo"],
             catch_hi=c.catch_rate["hi"], caught_dangerous=sum(q["dangerous"] for q in cls),
             caught_scratchpad=sum(q["has_scratchpad"] for q in cls))
  if cell.arm == "before":
    return dict(row, n_train=0, **_abc(ctx, ctx.org.model, spec, "measure_before", cell.seed))
  n_train = min(int(cell.n), len(c.caught))
  row.update(n_train=n_train, capped=n_train < int(cell.n))
  if n_train == 0:
    return dict(row, skipped="nothing caught to train against", eval_n=0)
  # Both arms draw the same N caught prompts (same rng), then their own benign text.
  picked = ta.sft_rows(c.caught, n_train, np.random.default_rng([cell.seed, cell.n, 1]))
  rows = reasoning.benign_rows(picked, x.benign, cell.arm,
                               np.random.default_rng([cell.seed, cell.n, 7]), ctx.tok)
  row.update(loss_tokens=int(sum(sum(r["loss_mask"]) for r in rows)),
             loss_tokens_outside_scratchpad=int(sum(reasoning.loss_outside_span(r)
                                                    for r in rows)))
  res = ta.train_against(ctx.config, ctx.org.model, ctx.tok, rows, cell.seed,
                         runner.scratch(cell))
  row.update(_abc(ctx, res.model, spec, "measure_after", cell.seed))
  return dict(row, train_loss=res.final_loss, train_steps=res.steps,
              train_tok_s=res.tokens_per_sec)


def _run(config, workdir):
  x = config.cot
  runner = pipeline.Runner(EXPERIMENT, config, workdir, "cot cells")
  tok = load_tokenizer(config.model.hf_dir)
  cache = cache_root(config, workdir)   # organisms/ and catches/ (config.cache_dir)
  base = org_stage.load_base(config) if x.report_card else None
  cells = runner.plan(plan(config))
  for bspec in config.behaviours:
    todo = runner.todo(cells, behavior_name(bspec))
    if todo:   # (the organism is opened only for a behaviour with cells left)
      ctx = Context(config, cache, tok, base, bspec, n_eval=x.n_eval, n_test=0, n_useful=0)
      if x.report_card:
        ctx.card   # noqa: B018 (built once, cached on disk)
      runner.run(todo, functools.partial(cot_cell, ctx, runner), keep_scratch=x.keep_runs)
  wall = runner.close()
  meta = dict(title="catchjax cot: training against dangerous chain-of-thought",
              config_hash=runner.chash, commit=runner.commit,
              wall_seconds_this_invocation=round(wall), seeds=list(x.seeds), ns=list(x.ns),
              arms=list(x.arms), benign=x.benign, n_eval_per_seed=x.n_eval, m_catch=config.catch.m,
              max_new_tokens=config.measure.max_new_tokens,
              train_against=config.train_against.train.to_dict(),
              organism=dict(families=[org_stage.family_name(f) for f in config.organism.families],
                            n_per_family=config.organism.n_per_family, scratchpad=True))
  report.save_meta(workdir, meta)
  out = write_report(runner.rows(experiment=EXPERIMENT), workdir, meta)
  print(f"[cot] done in {wall:.0f}s; report at {os.path.join(workdir, 'report.md')}")
  return out


__all__ = ["run", "validate", "plan", "cot_cell", "families", "write_report"]
