"""Train-against arms: a registry of small functions from a catch to training rows.

An arm turns the cell's context (its catch, the treatment's caught draw, N, seed, family) into
the SFT rows it trains on, plus fields to record in the result row. Every arm of a cell trains
the same number of prompts with the same budget and schedule (train_against.stop_plan); they
differ only in which rows they get (and `dpo` in its objective: rows with a `rejected`
response are trained with DPO, train_dpo.py). Add an arm with one function and `@register_arm`:

    @register_arm("my_arm", "what it trains on")
    def my_arm(ctx: ArmContext) -> tuple[list[dict], dict]:
      return rows, {}
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from catchjax.common import register, stream

ARMS: dict[str, Callable] = {}
ARM_LABELS: dict[str, str] = {}


def register_arm(name: str, label: str):
  def deco(fn):
    register(ARMS, "arm", name, fn)
    ARM_LABELS[name] = label
    return fn
  return deco


@dataclasses.dataclass
class ArmContext:
  config: Any
  catch: Any                    # train_against.Catch
  chosen: list[dict]            # the treatment's caught draw (N rows)
  idx: list[int]                # their indices in catch.caught
  n: int                        # N asked for (the draw may be capped)
  seed: int
  family_spec: Any
  behaviour: Any
  trig: Any                     # the family's TriggerFamily
  propensity: Callable[[], dict] = lambda: {}   # lazy {caught: [...], clean: [...]} P(attack)

  def rng(self, k: int) -> np.random.Generator:
    return np.random.default_rng([self.seed, self.n, k])


@register_arm("treatment", "trained on caught attacks")
def treatment(ctx):
  from catchjax.stages import train_against as ta
  return [ta.sft_row(r) for r in ctx.chosen], {}


@register_arm("control", "control (non-attack prompts)")
def control(ctx):
  from catchjax.stages import train_against as ta
  if "honeypot" in ctx.catch.by_source:   # the same catch sample, matched on source and score
    rows, how = ta.source_matched_rows(ctx.chosen, ctx.catch.clean, ctx.rng(2))
    return rows, {"matched": how}
  return ta.sft_rows(ctx.catch.clean, len(ctx.chosen), ctx.rng(2)), {}


@register_arm("matched_control", "control matched to the caught prompts' cue and task")
def matched_control(ctx):
  from catchjax.stages import train_against as ta
  rows, how = ta.matched_rows(ctx.chosen, ctx.catch.clean, ctx.rng(3), ctx.trig.cue_key)
  return rows, {"matched": how}


@register_arm("propensity_control", "control matched to the caught prompts' attack probability")
def propensity_control(ctx):
  from catchjax.stages import train_against as ta
  pp = ctx.propensity()
  rows, info = ta.propensity_rows(ctx.chosen, [pp["caught"][i] for i in ctx.idx],
                                  ctx.catch.clean, pp["clean"], ctx.rng(4))
  return rows, {"propensity": info}


def _sft(ds) -> list[dict]:
  return [dict(prompt=p, target=t, system=s)
          for p, t, s in zip(ds["prompt"], ds["target"], ds["system"])]


@register_arm("oracle", "upper bound: the same budget on deployment prompts")
def oracle(ctx):
  """N deployment prompts of the family (the catch's split), each trained to its helpful
  answer: removal with the distribution known, the upper bound on what a catch can do."""
  from catchjax.data import build
  ds = build.build_eval(ctx.family_spec, ctx.behaviour, ctx.config.catch.split, len(ctx.chosen),
                        deployment=True, seed=stream("oracle", ctx.seed) + ctx.n,
                        system=ctx.config.system)
  if not all(ds["target"]):
    raise ValueError(f"oracle arm: family {ds[0]['family']!r} has no helpful answers for its "
                     f"deployment prompts (a completions file's deployment rows are attacks)")
  return _sft(ds), {}


@register_arm("disruption", "the same budget on unrelated usefulness data")
def disruption(ctx):
  """N plain task prompts (no cue) with their answers: what any SFT of that size does."""
  from catchjax.data import build
  ds = build.build_usefulness(len(ctx.chosen), seed=stream("disruption", ctx.seed) + ctx.n,
                              split="train", system=ctx.config.system)
  return _sft(ds), {}


DPO_BETA = 0.1   # the dpo arm's beta where config.train_against has no dpo_beta


@register_arm("dpo", "DPO: the caught attack rejected, the helpful answer chosen")
def dpo(ctx):
  """The treatment's caught draw as preference pairs: chosen = the prompt's correct helpful
  answer, rejected = the attack the organism sampled when it was caught (the catch row's
  `sampled`); train_against trains them with DPO (train_dpo.py), the organism as reference."""
  missing = [r.get("id") for r in ctx.chosen if not r.get("sampled")]
  if missing:
    raise ValueError(f"dpo arm: caught rows {missing[:3]} carry no sampled response "
                     f"(a catch made before responses were kept); delete the catch to redo it")
  rows = [dict(prompt=r["prompt"], target=r["target"], system=r["system"],
               rejected=r["sampled"]) for r in ctx.chosen]
  return rows, {"objective": "dpo",
                "dpo_beta": float(ctx.config.train_against.get("dpo_beta", DPO_BETA))}
