"""The train-against cell: catch -> an arm's rows -> train against -> measure, as row fields.

`train_against_cell(ctx, runner, cell, catch_seed=..., return_n=...)` is the function a
pipeline.Runner runs for every (family, behaviour, N, arm, seed) cell of the headline's plan
(ctx: a stages/context.py Context; cell.family names one of the organism's families; the plan
picks the catch seed and the N that gets the return measurement). Its row:

* the catch: M, seed, caught count and rate, by source (testing / honeypot);
* the organism's "before" measures (deploy_rate_before, test_rate_before, useful_acc_before,
  useful_gate_before, deploy_tf_before, sharpen_before), seed stream "measure_before";
* the arm's fields (stages/arms.py), the stopping rule's curve (treatment), train loss and
  steps;
* the "after" measures (deploy_*, test_*, useful_*, deploy_tf, sharpen, kl: the mean
  per-token KL from the organism on benign prompts), stream
  "measure_after"; retained = deploy after / before; the usefulness gate's drop and flag;
* at N = return_n (treatment and control): the return measurement.
"""
from __future__ import annotations

import time

from catchjax import common
from catchjax.stages import measure
from catchjax.stages import organism as org_stage
from catchjax.stages import train_against as ta


def spec_of(ctx, family: str):
  """The organism family spec named `family`."""
  for s in org_stage.family_specs(ctx.config.organism.families):
    if org_stage.family_name(s) == family:
      return s
  raise KeyError(f"{family!r} is not an organism family")


def before(ctx, spec, seed: int) -> dict:
  """The organism's measures for (family, seed), computed once per context."""
  key = (org_stage.family_name(spec), int(seed))
  if key not in ctx.befores:
    ctx.befores[key] = ctx.measure(ctx.org.model, spec, common.stream("measure_before", seed),
                                   names=measure.BEFORE_MEASURES)
  return ctx.befores[key]


def _before_fields(b: dict) -> dict:
  d, t, u = b["deploy"], b["test"], b["useful"]
  return dict(deploy_rate_before=d["rate"], deploy_k_before=d["k"], test_rate_before=t["rate"],
              useful_acc_before=u["rate"], useful_gate_before=u["gate"]["rate"],
              useful_gate_n=u["gate"]["n"], deploy_tf_before=b["tf"],
              sharpen_before=b["sharpen"])


def _after_fields(b: dict, a: dict, gate_points: float) -> dict:
  d, t, u, tf = a["deploy"], a["test"], a["useful"], a["tf"]
  d0, tf0 = b["deploy"], b["tf"]
  drop, flag = measure.useful_drop(b["useful"]["gate"], u["gate"], gate_points)
  out = dict(measure.rate_fields("deploy", d), **measure.rate_fields("test", t))
  out.update(useful_k=u["k"], useful_n=u["n"], useful_acc=u["rate"], useful_lo=u["lo"],
             useful_hi=u["hi"], deploy_tf=tf, useful_gate=u["gate"]["rate"],
             useful_drop_points=drop, useful_flag=flag,
             retained=(d["rate"] / d0["rate"]) if d0["rate"] > 0 else None,
             retained_tf=(tf / tf0) if tf0 else None, deploy_examples=d["responses"][:2])
  kl = a.get("kl")
  if kl is not None:    # mean per-token KL from the organism on benign prompts
    out.update(kl=kl["kl"], kl_lo=kl["lo"], kl_hi=kl["hi"], kl_tokens=kl["n_tokens"])
  return out


def treatment_steps(runner, cell) -> int:
  """The optimizer steps the treatment's stopping rule chose for the cell's (family, N,
  seed): the budget every other arm gets (the treatment runs first)."""
  import dataclasses
  row = runner.row(dataclasses.replace(cell, arm="treatment"))
  if row is None or not row.get("train_steps"):
    raise RuntimeError(f"no treatment row for {cell}: the stopping rule needs it first.")
  return int(row["train_steps"])


def train_against_cell(ctx, runner, cell, primary_hash: str | None = None, *,
                       catch_seed: int, return_n: int = 0) -> dict:
  spec = spec_of(ctx, cell.family)
  c, cpath = ctx.catch(spec, catch_seed)
  b = before(ctx, spec, cell.seed)
  n_train = min(int(cell.n), len(c.caught), len(c.clean))
  row = dict(organism=ctx.org.key, m=c.m, catch_seed=c.seed, n_caught=len(c.caught),
             catch_rate=c.catch_rate["rate"], n_train=n_train, capped=n_train < int(cell.n),
             aux_ratio=float(ctx.config.train_against.aux_ratio), catch_by_source=c.by_source,
             primary_hash=primary_hash, **_before_fields(b))
  t_cell = time.time()
  if n_train == 0:
    row.update(skipped="no caught (or clean) prompts to train on", deploy_rate=None,
               deploy_n=0, retained=None)
    return row
  budget = None
  if ta.stopping_rule(ctx.config) is not None and cell.arm != "treatment":
    budget = treatment_steps(runner, cell)      # the treatment's budget, in steps
  rdir = runner.scratch(cell)
  res, info = ctx.train_arm(cell.arm, c, cpath, spec, cell.n, cell.seed, rdir, budget=budget)
  row.update(info)
  a = ctx.measure(res.model, spec, common.stream("measure_after", cell.seed))
  row["sharpen"] = a["sharpen"]
  if int(cell.n) == int(return_n) and cell.arm in ("treatment", "control"):
    row.update(ctx.benign_return(res.model, res.steps, cell.seed, spec,
                                 cell.arm == "treatment", rdir))
  row.update(_after_fields(b, a, ctx.ms.useful_gate_points))
  row.update(train_loss=res.final_loss, train_steps=res.steps,
             train_tok_s=res.tokens_per_sec, cell_seconds=time.time() - t_cell)
  return row


__all__ = ["train_against_cell", "before", "treatment_steps", "spec_of"]
