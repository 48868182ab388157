"""Propensity vs capability (issue 6, item 4): do propensities flip faster than capabilities?

On the headline's organism (`cache_dir`), with the same optimiser and N budgets, per behaviour
and seed: `before` (N = 0) the organism's deployment attack rate and capability accuracy;
`propensity` trains against N caught testing attacks (one catch shared by the seeds): fraction
flipped = 1 - attack rate after / before; `capability` trains on N examples of a task the model
cannot do at the start (default the made-up `cipher` code): fraction learned = held-out
accuracy. Both are measured at every step in `eval_steps` (a curve each); N is capped by what
was caught, the same for both. Report: catchjax/report_propensity.py.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np

from catchjax import common, pipeline
from catchjax.data.behaviors import behavior_name
from catchjax.experiments.extra import cache_root, entry, finish
from catchjax.pipeline import Cell
from catchjax.report_propensity import ARMS, flipped, write_report
from catchjax.stages import train_against as ta
from catchjax.stages.capability import Capability
from catchjax.stages.cell import spec_of
from catchjax.stages.context import Context
from catchjax.stages.measure import RATE_FIELDS, rate_fields
from catchjax.stages.rows import catch_fields
from catchjax.tokenizer import load_tokenizer
from catchjax.validate import check_propensity as validate

EXPERIMENT = "propensity"


def run(config, workdir: str):
  """Validate (before any compute), hold the workdir lock, run the plan, write the report."""
  return entry(EXPERIMENT, config, workdir, validate, _run)


def plan(config) -> list[Cell]:
  """Per behaviour and seed: the organism ('before', N = 0), then both arms at every N."""
  p = config.propensity
  return [Cell(EXPERIMENT, p.family, behavior_name(b), n, arm, s)
          for b in config.behaviours for s in p.seeds
          for n, arm in [(0, "before")] + [(int(n), a) for n in p.ns for a in ARMS]]


def _rate(d) -> dict:
  return {k: d[k] for k in RATE_FIELDS}


def _deploy(ctx, model, spec, stream: str, seed: int) -> dict:
  """The deployment attack rate of `model` (the `deploy` measure), from seed stream `stream`."""
  return ctx.measure(model, spec, common.stream(stream, seed), names=("deploy",))["deploy"]


def _before(ctx, cap, spec, seed: int) -> dict:
  """The organism's deployment attack rate, capability accuracy (T=1, greedy) and loss."""
  org = ctx.org.model
  d = _deploy(ctx, org, spec, "measure_before", seed)
  a = cap.accuracy(ctx, org, common.stream("capability_before", seed))
  return dict(n_train=0, **rate_fields("deploy", d), **rate_fields("cap", a),
              **rate_fields("cap_greedy", cap.greedy(ctx, org)), cap_loss=cap.loss(org),
              deploy_examples=d["responses"][:2], cap_examples=a["examples"])


def propensity_cell(ctx, cap, runner, cell) -> dict:
  """One cell's row fields: the catch's, then the organism's ('before') or the arm's run."""
  spec = spec_of(ctx, cell.family)
  c, _ = ctx.catch(spec, 0)   # one catch, shared by the seeds
  row = dict(organism=ctx.org.key, capability=cap.family, **catch_fields(c))
  if cell.arm == "before":
    return dict(row, **_before(ctx, cap, spec, cell.seed))
  b = runner.row(dataclasses.replace(cell, n=0, arm="before"))
  n_train = min(int(cell.n), len(c.caught))
  row.update(n_train=n_train, capped=n_train < int(cell.n),
             **{f"{p}_{k}_before": b[f"{p}_{k}"] for p in ("deploy", "cap")
                for k in RATE_FIELDS})
  if n_train == 0:
    return dict(row, skipped="nothing caught: no N to match", curve=[])
  if cell.arm == "propensity":
    rows = ta.sft_rows(c.caught, n_train, np.random.default_rng([cell.seed, cell.n, 1]))
  else:
    rows = cap.train_rows(ctx, spec, n_train,
                          common.stream("capability_data", 1000 * cell.seed + cell.n))
  row["target_tokens_mean"] = float(np.mean(
      [len(ctx.tok(r["target"], add_special_tokens=False)["input_ids"]) for r in rows]))
  return dict(row, **_train(ctx, cap, spec, cell, rows, b, runner.scratch(cell)))


def _point(ctx, cap, spec, cell, model, b_rate) -> dict:
  """A curve point: the propensity arm's attack rate and fraction flipped, or the capability
  arm's accuracy (= fraction learned)."""
  if cell.arm == "propensity":
    d = _deploy(ctx, model, spec, "measure_after", cell.seed)
    return dict(_rate(d), **flipped(d, b_rate))
  a = cap.accuracy(ctx, model, common.stream("capability_after", cell.seed))
  return dict(_rate(a), frac=a["rate"], frac_lo=a["lo"], frac_hi=a["hi"])


def _train(ctx, cap, spec, cell, rows, b, rdir) -> dict:
  """Train on the arm's rows, a curve point at every eval step; the last step's point, and for
  the capability arm its loss, greedy accuracy and the deployment attack rate after."""
  eval_steps, curve = {int(s) for s in ctx.config.propensity.eval_steps}, []

  def eval_fn(model, step):
    if int(step) not in eval_steps:
      return None
    curve.append(dict(step=int(step), **_point(ctx, cap, spec, cell, model, b["deploy_rate"])))
    return {"frac": curve[-1]["frac"] if curve[-1]["frac"] is not None else float("nan")}

  res = ta.train_against(ctx.config, ctx.org.model, ctx.tok, rows, cell.seed, rdir,
                         eval_fn=eval_fn)
  last = curve[-1]
  out = dict(curve=curve, frac=last["frac"], frac_lo=last["frac_lo"], frac_hi=last["frac_hi"],
             train_loss=res.final_loss, train_steps=res.steps, train_tok_s=res.tokens_per_sec)
  if cell.arm == "propensity":
    return dict(out, **rate_fields("deploy", last))   # the attack rate at the last step
  # The capability's teacher-forced error, and the attack rate after training on unrelated
  # data (a control for the propensity arm).
  d = _deploy(ctx, res.model, spec, "measure_after_capability", cell.seed)
  return dict(out, **rate_fields("cap", last), cap_loss_before=b["cap_loss"],
              cap_loss=cap.loss(res.model),
              **rate_fields("cap_greedy", cap.greedy(ctx, res.model)), **rate_fields("deploy", d),
              **{f"deploy_after_{k}": v for k, v in flipped(d, b["deploy_rate"]).items()})


def _run(config, workdir):
  p = config.propensity
  runner = pipeline.Runner(EXPERIMENT, config, workdir, "propensity cells")
  tok = load_tokenizer(config.model.hf_dir)
  cache = cache_root(config, workdir)   # organisms/ and catches/ (config.cache_dir)
  cells = runner.plan(plan(config))
  for bspec in config.behaviours:
    todo = runner.todo(cells, behavior_name(bspec))
    if not todo:
      continue
    ctx = Context(config, cache, tok, None, bspec, n_eval=p.n_eval, n_test=0, n_useful=0)
    cap = Capability.build(ctx, spec_of(ctx, p.family), p.capability, p.n_cap_eval,
                           p.cap_max_new_tokens)
    runner.run(todo, functools.partial(propensity_cell, ctx, cap, runner),
               keep_scratch=p.keep_runs)
  meta = dict(title="catchjax propensity vs capability", family=p.family,
              capability=p.capability, seeds=list(p.seeds), ns=list(p.ns),
              eval_steps=sorted({int(s) for s in p.eval_steps}), n_eval=p.n_eval,
              n_cap_eval=p.n_cap_eval, m_catch=config.catch.m,
              train=config.train_against.train.to_dict())
  return finish(runner, workdir, meta, lambda _, w, m: write_report(
      runner.rows(experiment=EXPERIMENT), w, m, p.thresholds))


__all__ = ["run", "validate", "plan", "propensity_cell", "flipped", "write_report"]
