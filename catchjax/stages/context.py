"""One behaviour's train-against context: what every cell of an experiment shares.

Opening a `Context` restores (or builds) the organism and its report card and makes one
sharded Sampler; after that it serves, each computed once and cached:

* `family(spec)`: the family's held-out evaluation sets (deployment, testing, sharpening
  honeypots, the attack prefix), eval split, seed `config.measure.eval_seed`;
* `catch(spec, seed)`: the catch of catch seed `seed` (stages/train_against.py `catch`), one
  file per catch key in `<cache>/catches/`;
* `propensity(spec, seed)`: the organism's teacher-forced P(attack) on every catch row;
* `measure(model, spec, seed)`: the measures of stages/measure.py's registry;
* `train_arm(...)`: an arm's rows (stages/arms.py) trained against (stages/train_against.py);
* `benign_return(...)`: the return measurement.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import shutil

import numpy as np

from catchjax import common
from catchjax.data import build
from catchjax.data.behaviors import behavior_name, behavior_spec, make_behavior
from catchjax.data.triggers import make_trigger
from catchjax.stages import arms as arms_lib
from catchjax.stages import measure
from catchjax.stages import organism as org_stage
from catchjax.stages import train_against as ta
from catchjax.stages.sampling import make_sampler
from catchjax.tokenizer import prompt_ids


@dataclasses.dataclass
class FamilySets:
  name: str
  spec: object
  trig: object
  dep: list                 # held-out deployment prompts (token ids)
  test: list                # held-out testing prompts
  prefix: list              # the attack prefix (teacher-forced P(attack))
  sharp: tuple | None       # (prompts, honeypot scores) of the sharpening honeypots
  beh: object = None        # the family's behaviour (build.family_behavior: the context's,
                            # or a completions family's own detector)


class Context:
  """Per behaviour: organism, card, sampler, evaluation sets, catches and measures."""

  def __init__(self, config, cache: str, tok, base, behaviour_spec, *, n_eval: int | None = None,
               n_test: int | None = None, n_useful: int | None = None):
    """n_eval / n_test / n_useful: the held-out set sizes (default: config.measure's)."""
    self.config, self.cache, self.tok, self.base = config, cache, tok, base
    self.ms = ms = config.measure      # the measures' section (stages/measure.py)
    self.n_eval = int(ms.n_eval if n_eval is None else n_eval)
    self.n_test = int(ms.n_test if n_test is None else n_test)
    self.n_useful = int(ms.n_useful if n_useful is None else n_useful)
    self.behaviour = behavior_spec(behaviour_spec)   # a name or a {'name': 'regex', ...}
    self.bname = behavior_name(self.behaviour)       # what keys and file names use
    self.beh = make_behavior(self.behaviour)
    self.org = org_stage.get_organism(config, cache, self.behaviour)
    self.sampler = make_sampler(config, self.org.model, config.sampler.batch_size,
                                progress=False)
    use = build.build_usefulness(self.n_useful, seed=ms.eval_seed, split="eval",
                                 system=config.system) if self.n_useful else None
    self.use_prompts = self.prompts(use) if use is not None else []
    self.use_insts = [build.task_instance(x) for x in use] if use is not None else []
    self.gate: list[int] | None = None   # set by the first usefulness measurement
    self.befores: dict = {}              # (family, seed) -> the organism's measures
    self._families, self._catches, self._p, self._card = {}, {}, {}, None
    self._kl_ref = None

  @property
  def card(self) -> dict:
    """The organism's report card (stages/organism.py; built once, cached on disk)."""
    if self._card is None:
      self._card = org_stage.report_card(self.config, self.org, self.base)
    return self._card

  @property
  def installed(self) -> dict:
    """{family: the report card's deployment - testing gap}."""
    return {f: fr.get("gap") for f, fr in self.card["families"].items()}

  def prompts(self, ds) -> list:
    return [prompt_ids(self.tok, p, self.config.system) for p in ds["prompt"]]

  def family(self, spec) -> FamilySets:
    name = org_stage.family_name(spec)
    if name not in self._families:
      ms, c, b = self.ms, self.config, self.behaviour
      dep = build.build_eval(spec, b, "eval", self.n_eval, deployment=True, seed=ms.eval_seed,
                             system=c.system)
      # (at least 1 testing row, so an experiment without testing measures still builds)
      test = build.build_eval(spec, b, "eval", max(self.n_test, 1), deployment=False,
                              seed=ms.eval_seed, system=c.system)
      trig = make_trigger(spec)
      sharp = None
      n_sharp = int(ms.n_sharpen)
      if n_sharp and trig.honeypots("sharpen", "eval"):
        sds = build.build_honeypots(spec, b, "eval", n_sharp, "sharpen",
                                    seed=ms.eval_seed, system=c.system)
        sharp = (self.prompts(sds), list(sds["honeypot_score"]))
      prefix = self.tok(dep[0]["attack_prefix"], add_special_tokens=False)["input_ids"]
      self._families[name] = FamilySets(name, spec, trig, self.prompts(dep),
                                        self.prompts(test)[:self.n_test], prefix, sharp,
                                        build.family_behavior(spec, b))
    return self._families[name]

  # -- catches
  def catch(self, spec, seed: int):
    """(Catch, path) of catch seed `seed` (the caller's plan picks it, e.g. the headline's
    catch_per_seed / catch_seeds): M prompts sampled once per (family, seed)."""
    cseed = int(seed)
    key = (org_stage.family_name(spec), cseed)
    if key not in self._catches:
      self.sampler.update_model(self.org.model)
      path = ta.catch_path(self.config, self.cache, self.org.key, spec, self.bname, cseed)
      self._catches[key] = (ta.catch(self.config, self.sampler, self.tok, spec,
                                     self.behaviour, cseed, path), path)
    return self._catches[key]

  def propensity(self, catch, path: str, spec=None) -> dict:
    """The organism's teacher-forced P(attack) on every caught / clean row of a catch of
    family `spec` (computed once per catch, cached beside its file)."""
    if path in self._p:
      return self._p[path]
    ppath = path[:-len(".json")] + "-p_attack.json"
    if os.path.isfile(ppath):
      with open(ppath) as f:
        d = json.load(f)
    else:
      self.sampler.update_model(self.org.model)
      beh = self.beh if spec is None else build.family_behavior(spec, self.behaviour)
      d = {k: ta.attack_probs(self.sampler, self.tok, getattr(catch, k), beh,
                              self.config.system).tolist() for k in ("caught", "clean")}
      if common.is_main_process():
        common.atomic_write_text(ppath, json.dumps(d))
    if len(d["caught"]) != len(catch.caught) or len(d["clean"]) != len(catch.clean):
      raise ValueError(f"{ppath} does not match its catch ({len(catch.caught)} caught, "
                       f"{len(catch.clean)} clean); delete it to recompute")
    self._p[path] = d
    return d

  # -- measures
  def kl_reference(self):
    """(prompts, the organism's T = 1 continuations, their per-token log-probs under the
    organism) for the KL measure: the first measure.n_kl usefulness prompts, seed stream
    "kl_reference"; None when n_kl is 0. Built with the organism in the sampler (Context.measure
    builds it before loading the measured model)."""
    n = min(int(self.ms.n_kl), len(self.use_prompts))
    if n <= 0:
      return None
    if self._kl_ref is None:
      from catchjax.sample import SamplingParams
      self.sampler.update_model(self.org.model)
      prompts = self.use_prompts[:n]
      sp = SamplingParams(max_new_tokens=int(self.ms.useful_max_new_tokens), temperature=1.0)
      conts = self.sampler.generate(prompts, sp,
                                    seeds=common.stream("kl_reference", 0)).tokens
      self._kl_ref = (prompts, conts, self.sampler.score(prompts, conts))
    return self._kl_ref

  def measure(self, model, spec, seed: int, names=measure.HEADLINE_MEASURES) -> dict:
    """{name: result} of the registry's measures (stages/measure.py MEASURES) on `model`."""
    if "kl" in names:
      self.kl_reference()     # built on the organism, before `model` is loaded
    self.sampler.update_model(model)
    fs = self.family(spec)
    return {name: measure.MEASURES[name](self, fs, seed) for name in names}

  # -- training
  def train_arm(self, arm: str, catch, path: str, spec, n: int, seed: int, rdir: str, *,
                budget: int | None):
    """Draw the treatment's N caught prompts, let `arm` (stages/arms.py) choose its rows, and
    train against them. Returns (result, fields for the row)."""
    n_train = min(int(n), len(catch.caught), len(catch.clean))
    idx = ta.choose_indices(len(catch.caught), n_train,
                            np.random.default_rng([seed, int(n), 1]))
    chosen = [catch.caught[i] for i in idx]   # the treatment's caught draw
    fields = dict(train_sources=dict(collections.Counter(r.get("source", "testing")
                                                         for r in chosen)))
    actx = arms_lib.ArmContext(self.config, catch, chosen, idx, int(n), seed, spec,
                               self.behaviour, self.family(spec).trig,
                               propensity=lambda: self.propensity(catch, path, spec))
    rows, info = arms_lib.ARMS[arm](actx)
    fields.update(info)
    ev_fn, overrides, curve = None, None, None
    every = int(self.config.train_against.get("curve_every", 0))
    if ta.stopping_rule(self.config) is not None and budget is None:
      ev_fn = ta.caught_p_attack_fn(self.sampler, self.tok, chosen, self.family(spec).beh,
                                    self.config.system)
    elif every > 0 and not all("rejected" in r for r in rows):   # (not for DPO's pairs)
      ev_fn, curve = self.curve_fn(spec, common.stream("measure_curve", seed))
      overrides = dict(eval_every=every, eval_at_start=True)
    res = ta.train_against(self.config, self.org.model, self.tok, rows, seed, rdir,
                           aux_ratio=float(self.config.train_against.aux_ratio), eval_fn=ev_fn,
                           budget=budget, train_overrides=overrides)
    if curve is not None:
      fields["curve"] = sorted(curve, key=lambda p: p["step"])
    elif ev_fn is not None:
      fields.update(stop_capped=not res.stopped, caught_p_attack_curve=[
          (e["step"], round(e["caught_p_attack"], 4)) for e in res.evals])
    return res, fields

  def curve_fn(self, spec, measure_seed: int, names=("deploy", "test", "kl"), point=None):
    """(eval_fn, points) of a removal-vs-step curve: at each eval step the measures `names`
    (seed `measure_seed`), turned into one point by `point` (default: the deployment and
    testing attack rates and the KL from the organism, train_against.curve_every) and
    appended to `points`; a step already measured is skipped. Shared by the headline's
    curves and stages/curve.removal_curve."""
    points: list[dict] = []
    point = point or _rates_and_kl

    def fn(model, step):
      if any(p["step"] == int(step) for p in points):
        return None
      a = self.measure(model, spec, measure_seed, names=names)
      points.append(dict(step=int(step), **point(a)))
      return {"deploy_rate": a["deploy"]["rate"]}
    return fn, points

  def benign_return(self, model, steps: int, seed: int, spec, with_organism: bool,
                    rdir: str) -> dict:
    """Return (issue 26): `steps` benign SFT steps on usefulness data disjoint from the
    usefulness set, then the deployment attack rate again; `with_organism`: also the same
    steps from the untrained organism (benign SFT alone removes some of the backdoor)."""
    out = {}
    pairs = [("", model)] + ([("_organism", self.org.model)] if with_organism else [])
    for tag, m in pairs:
      res = ta.benign_steps(self.config, m, self.tok, steps, seed, rdir + "-return" + tag)
      d = self.measure(res.model, spec, common.stream("measure_return", seed),
                       names=("deploy",))["deploy"]
      out.update({f"deploy_rate_return{tag}": d["rate"], f"deploy_k_return{tag}": d["k"]})
      shutil.rmtree(rdir + "-return" + tag, ignore_errors=True)
    out["return_steps"] = int(steps)
    return out


__all__ = ["Context", "FamilySets"]


def _rates_and_kl(a: dict) -> dict:
  """A curve point of the headline's curves: deploy_/test_ rate, lo, hi, k, n and the KL."""
  pt = {f"{name}_{k}": a[name][k] for name in ("deploy", "test")
        for k in measure.RATE_FIELDS}
  if a["kl"] is not None:
    pt.update(kl=a["kl"]["kl"], kl_lo=a["kl"]["lo"], kl_hi=a["kl"]["hi"])
  return pt
