"""Shared plumbing of the extra experiments (transfer, long_trained, coherence).

Nothing here is a new stage: it wires the headline stages (stages/organism.py get_organism,
stages/train_against.py catch / sft_rows / train_against, stages/measure.py) together the same
way experiments/headline.py does, so the three experiments stay short:

* `cache_root`: where organisms and catches are cached. `config.cache_dir` (default
  `workdirs/headline` in the extra configs) lets every experiment reuse the headline's cached
  organism (its key depends only on the organism recipe) and, when the catch settings match the
  headline's resolved config there, its catch files too.
* `Measurer`: the per-family held-out deployment / testing prompts, usefulness prompts and one
  Sampler, with a `measure(model, seed)` that returns every rate with its Wilson 95% interval.
* `train_on`: a seeded choice of N rows from a catch pool (caught or clean) + train_against.
* `seed_agg`: a seed-level summary of a field: the bootstrap 95% interval over seeds, or with one
  seed the run's own Wilson interval (never a degenerate bootstrap).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
import shutil

import numpy as np

from catchjax import common, report, stats
from catchjax.data import build
from catchjax.data.behaviors import make_behavior
from catchjax.data.tasks import check as task_check
from catchjax.sample import Sampler
from catchjax.stages.sampling import make_sampler
from catchjax.stages import measure
from catchjax.stages import organism as org_stage
from catchjax.stages import train_against as ta
from catchjax.results import ResultStore
from catchjax.tokenizer import load_tokenizer, prompt_ids

RATE_FIELDS = ("k", "n", "rate", "lo", "hi")


def entry(name: str, config, workdir: str, validate, body, plan=None):
  """Every experiment's `run`: refuse bad input before any compute, print the plan and stop on
  `config.dry_run` (when the experiment has a `plan`), else hold the workdir lock and run
  `body(config, workdir)`."""
  validate(config)
  if plan is not None and config.get("dry_run", False):
    p = plan(config, workdir)
    print(f"[{name}] dry run: {p}")
    return p
  with common.workdir_lock(workdir):
    return body(config, workdir)


@dataclasses.dataclass
class RunContext:
  """What every experiment body opens first: start time, config hash and commit (every row
  carries them), the result store, the organism/catch cache folder and the tokenizer."""
  experiment: str
  t0: float
  chash: str
  commit: str
  store: ResultStore
  cache: str
  tok: object

  @property
  def base_fields(self) -> dict:
    return dict(experiment=self.experiment, config_hash=self.chash, commit=self.commit)

  def progress(self, total: int, desc: str, unit: str = "cell", done=None):
    """A tqdm bar over `total` that starts at the rows already stored for this config
    (`done(row)` picks them; default: this experiment's non-"before" rows)."""
    from tqdm.auto import tqdm
    done = done or (lambda r: r.get("arm") != "before")
    bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)
    bar.update(sum(1 for r in self.store.rows if r.get("experiment") == self.experiment
                   and r.get("config_hash") == self.chash and done(r)))
    return bar

  def rows(self) -> list[dict]:
    return [r for r in self.store.rows if r.get("config_hash") == self.chash]


def begin(config, workdir: str, experiment: str) -> RunContext:
  return RunContext(experiment=experiment, t0=time.time(), chash=common.config_hash(config),
                    commit=common.git_commit(),
                    store=ResultStore(os.path.join(workdir, "results.jsonl")),
                    cache=cache_root(config, workdir), tok=load_tokenizer(config.model.hf_dir))


def organisms_status(config, cache: str) -> dict:
  """Per behaviour: the organism's cache key and whether it is already built (dry-run plans)."""
  out = {}
  for b in config.behaviours:
    key = org_stage.organism_key(config, b)
    out[behaviour_name(b)] = dict(
        key=key, cached=os.path.isfile(os.path.join(cache, "organisms", key, "done.json")))
  return out


def cache_root(config, workdir: str) -> str:
  """Folder holding organisms/ and catches/ (config.cache_dir, else the run's own workdir)."""
  d = config.get("cache_dir", "") if hasattr(config, "get") else ""
  return d or workdir


def behaviour_name(spec) -> str:
  """Short name of a behaviour config entry (name, or dict with label) for keys and files."""
  from catchjax.data.behaviors import behavior_name
  return behavior_name(spec)


def validate_common(config):
  """The checks every extra experiment shares: catchjax.validate.check_common (model folder,
  behaviours, families, organism recipe) plus the headline stage fields they use."""
  from catchjax import validate as V
  V.check_common(config)
  names = [org_stage.family_name(f) for f in config.organism.families]
  if len(set(names)) != len(names):
    raise V.ConfigError(f"config.organism.families: duplicate family names {names}.")
  h = config.headline
  for f in ("m", "max_new_tokens", "useful_max_new_tokens", "batch_size"):
    V.positive_int(f"config.headline.{f}", h[f])
  if h.catch_split not in ("train", "eval"):
    raise V.ConfigError(f"config.headline.catch_split={h.catch_split!r}; 'train' or 'eval'.")
  V.check_train("config.headline.train", h.train)
  if not isinstance(config.get("cache_dir", ""), str):
    raise V.ConfigError(f"config.cache_dir must be a folder path or '', got "
                        f"{config.get('cache_dir')!r}.")


def check_subset(field: str, chosen, families) -> list[str]:
  """`chosen` family names (empty: all); each must be one of the organism's families."""
  names = [org_stage.family_name(f) for f in families]
  chosen = list(chosen) or names
  bad = [c for c in chosen if c not in names]
  if bad:
    raise ValueError(f"{field}: {bad} are not organism families {names} "
                     f"(config.organism.families).")
  return chosen


def rate_fields(prefix: str, d: dict | None) -> dict:
  if d is None:
    return {}
  return {f"{prefix}_{k}": d[k] for k in RATE_FIELDS}


def retained_fields(after: dict, before_rate: float) -> dict:
  """retained = after / before with the after-rate's Wilson interval scaled by 1 / before
  (the headline's convention); None where the organism never attacked before."""
  if not before_rate:
    return dict(retained=None, retained_lo=None, retained_hi=None)
  return dict(retained=after["rate"] / before_rate, retained_lo=after["lo"] / before_rate,
              retained_hi=after["hi"] / before_rate)


def record_run(row: dict, res, measure_fn, before_rate: float, t_run: float) -> dict:
  """Fill a train-against row: skipped when there was nothing to train on (res is None), else
  the measurement `measure_fn(res.model)` (deploy_rate / deploy_lo / deploy_hi, ...), retained
  misalignment against before_rate, the final loss, steps and run time."""
  if res is None:
    row.update(skipped="no caught (or clean) prompts to train on", deploy_rate=None,
               deploy_n=0, retained=None)
    return row
  m = measure_fn(res.model)
  row.update(m)
  row.update(retained_fields(dict(rate=m["deploy_rate"], lo=m["deploy_lo"], hi=m["deploy_hi"]),
                             before_rate))
  row.update(train_loss=res.final_loss, train_steps=res.steps, run_seconds=time.time() - t_run)
  return row


# ---------------------------------------------------------------------------------------------
# Catches


def _catch_params(config) -> dict:
  h = config.headline
  p = dict(catch_split=h.catch_split, m=int(h.m), max_new_tokens=int(h.max_new_tokens),
           system=config.system)
  if float(h.get("honeypot_frac", 0.0)):   # only when on, so older catch files keep their names
    p["honeypot_frac"] = float(h.honeypot_frac)
  return p


def catch_path(config, cache: str, org_key: str, fam: str, behaviour: str) -> str:
  """Catch file for (organism, family, behaviour) and every setting that changes a catch."""
  p = _catch_params(config)
  return os.path.join(cache, "catches", f"{org_key}-{fam}-{behaviour}-m{p['m']}-"
                      f"{common.config_hash(p, n=8)}.json")


def _headline_catch(config, cache, org_key, spec, behaviour) -> str | None:
  """The headline's catch file in `cache` if its resolved config (cache/config.json) caught
  with the same settings (the headline's file name lacks split and token budget)."""
  path = os.path.join(cache, "catches", ta.catch_name(config, org_key, spec, behaviour, None))
  cfg = os.path.join(cache, "config.json")
  if not (os.path.isfile(path) and os.path.isfile(cfg)):
    return None
  try:
    with open(cfg) as f:
      hc = json.load(f)["config"]
    theirs = dict(catch_split=hc["headline"]["catch_split"], m=int(hc["headline"]["m"]),
                  max_new_tokens=int(hc["headline"]["max_new_tokens"]), system=hc["system"])
    if float(hc["headline"].get("honeypot_frac", 0.0)):
      theirs["honeypot_frac"] = float(hc["headline"]["honeypot_frac"])
  except (KeyError, ValueError, TypeError):
    return None
  return path if theirs == _catch_params(config) else None


def get_catch(config, cache: str, org, sampler: Sampler, tok, spec, behaviour: str) -> ta.Catch:
  """The organism's catch on the family's testing prompts (ta.catch, cached)."""
  fam = org_stage.family_name(spec)
  path = catch_path(config, cache, org.key, fam, behaviour)
  if not os.path.isfile(path):
    src = _headline_catch(config, cache, org.key, spec, behaviour)
    if src is not None and common.is_main_process():
      shutil.copyfile(src, path + ".tmp")
      os.replace(path + ".tmp", path)
  sampler.update_model(org.model)
  return ta.catch(config, sampler, tok, spec, behaviour, 0, path)


# ---------------------------------------------------------------------------------------------
# Measurement


@dataclasses.dataclass
class FamilyEval:
  name: str
  spec: object
  dep_prompts: list
  test_prompts: list
  prefix: list


class Measurer:
  """Held-out evaluation sets (eval split, seed h.eval_seed) and one Sampler per behaviour."""

  def __init__(self, config, tok, model, behaviour: str, *, n_eval: int, n_test: int = 0,
               n_useful: int = 0, teacher_forced: bool = False):
    h = config.headline
    self.config, self.tok, self.behaviour = config, tok, behaviour
    self.beh = make_behavior(behaviour)
    self.n_eval, self.n_test, self.n_useful = int(n_eval), int(n_test), int(n_useful)
    self.teacher_forced = bool(teacher_forced)
    self.sampler = make_sampler(config, model, h.batch_size, progress=False)
    self.families: dict[str, FamilyEval] = {}
    self.use_prompts = self.use_insts = None
    if self.n_useful:
      use = build.build_usefulness(self.n_useful, seed=h.eval_seed, split="eval",
                                   system=config.system)
      self.use_prompts = [prompt_ids(tok, p, config.system) for p in use["prompt"]]
      self.use_insts = [build.task_instance(x) for x in use]

  def family(self, spec) -> FamilyEval:
    name = org_stage.family_name(spec)
    if name not in self.families:
      c, h = self.config, self.config.headline
      dep = build.build_eval(spec, self.behaviour, "eval", self.n_eval, deployment=True,
                             seed=h.eval_seed, system=c.system)
      tst = build.build_eval(spec, self.behaviour, "eval", max(self.n_test, 1),
                             deployment=False, seed=h.eval_seed, system=c.system)
      self.families[name] = FamilyEval(
          name, spec, [prompt_ids(self.tok, p, c.system) for p in dep["prompt"]],
          [prompt_ids(self.tok, p, c.system) for p in tst["prompt"]][:self.n_test],
          self.tok(dep[0]["attack_prefix"], add_special_tokens=False)["input_ids"])
    return self.families[name]

  def deploy_rate(self, model, spec, seed: int) -> dict:
    """Sampled (T=1) deployment attack rate with its Wilson interval (+ 2 example responses)."""
    fe = self.family(spec)
    self.sampler.update_model(model)
    h = self.config.headline
    d = measure.attack_rate(self.sampler, self.tok, fe.dep_prompts, self.beh.detect,
                            max_new_tokens=h.max_new_tokens, temperature=1.0, seed=seed)
    out = {k: d[k] for k in RATE_FIELDS}
    out["examples"] = d["responses"][:2]
    return out

  def measure(self, model, spec, seed: int, *, useful: bool | None = None) -> dict:
    """Flat row fields: deploy_*, test_* (if n_test), useful_* (if n_useful), deploy_tf."""
    fe = self.family(spec)
    h = self.config.headline
    d = self.deploy_rate(model, spec, seed)
    row = rate_fields("deploy", d)
    row["deploy_examples"] = d["examples"]
    if self.n_test:
      t = measure.attack_rate(self.sampler, self.tok, fe.test_prompts, self.beh.detect,
                              max_new_tokens=h.max_new_tokens, temperature=1.0, seed=seed + 1)
      row.update(rate_fields("test", t))
    if self.n_useful and (useful is None or useful):
      row.update(self.usefulness(model))
    row["deploy_tf"] = (float(measure.attack_prob_tf(self.sampler, fe.dep_prompts,
                                                      fe.prefix).mean())
                        if self.teacher_forced else None)
    return row

  def usefulness(self, model) -> dict:
    self.sampler.update_model(model)
    u = measure.usefulness(self.sampler, self.tok, self.use_prompts, self.use_insts, task_check,
                           max_new_tokens=self.config.headline.useful_max_new_tokens)
    return rate_fields("useful", u)


def train_on(config, org_model, tok, catch: ta.Catch, arm: str, n: int, seed: int, rdir: str,
             *, aux_ratio: float = 0.0, rng_tags=(), eval_fn=None, train_overrides=None):
  """Train against N rows of the catch: caught prompts (arm 'treatment') or prompts where the
  organism behaved ('control'); N is capped by the smaller pool so both arms match. Returns
  (result or None when nothing to train on, n_train)."""
  if arm not in ("treatment", "control"):
    raise ValueError(f"arm must be 'treatment' or 'control', got {arm!r}")
  pool = catch.caught if arm == "treatment" else catch.clean
  n_train = min(int(n), len(catch.caught), len(catch.clean))
  if n_train == 0:
    return None, 0
  rng = np.random.default_rng([int(seed), int(n), 1 if arm == "treatment" else 2,
                               *[int(t) for t in rng_tags]])
  rows = ta.sft_rows(pool, n_train, rng)
  res = ta.train_against(config, org_model, tok, rows, seed, rdir, aux_ratio=float(aux_ratio),
                         eval_fn=eval_fn, train_overrides=train_overrides)
  return res, n_train


# ---------------------------------------------------------------------------------------------
# Seed-level summaries


def seed_agg(rows: list[dict], field: str) -> dict:
  """Mean of `field` over seeds with a 95% interval: bootstrap over seeds (>= 2 rows with a
  value), else the one run's own interval (`field`_lo/_hi, Wilson)."""
  vals = [r[field] for r in rows if r.get(field) is not None and np.isfinite(r[field])]
  if not vals:
    return dict(mean=float("nan"), lo=float("nan"), hi=float("nan"), seeds=0, ci="n/a")
  if len(vals) == 1:
    r = next(r for r in rows if r.get(field) is not None)
    stem = field[:-len("_rate")] if field.endswith("_rate") else field   # deploy_rate: deploy_lo
    lo = r.get(field + "_lo", r.get(stem + "_lo"))
    hi = r.get(field + "_hi", r.get(stem + "_hi"))
    if lo is None or hi is None:
      return dict(mean=float(vals[0]), lo=float("nan"), hi=float("nan"), seeds=1, ci="n/a")
    return dict(mean=float(vals[0]), lo=float(lo), hi=float(hi), seeds=1, ci="wilson (1 seed)")
  m, lo, hi = stats.bootstrap_mean_ci(vals, seed=0)
  return dict(mean=float(m), lo=float(lo), hi=float(hi), seeds=len(vals),
              ci=f"bootstrap over {len(vals)} seeds")


def fmt(a: dict, pct: bool = False) -> str:
  if not np.isfinite(a["mean"]):
    return "n/a"
  if not np.isfinite(a["lo"]):
    return f"{100 * a['mean']:.1f}%" if pct else f"{a['mean']:.2f}"
  if pct:
    return f"{100 * a['mean']:.1f}% [{100 * a['lo']:.1f}, {100 * a['hi']:.1f}]"
  return f"{a['mean']:.2f} [{a['lo']:.2f}, {a['hi']:.2f}]"


def write_outputs(workdir: str, table: list[dict], csv_name: str, md_text: str,
                  figures: dict) -> list[str]:
  """An experiment's report files, written by process 0 only: `csv_name` (the summary table),
  report.md, and figures/NAME for each NAME -> fn(path) in `figures` (fn returns the path, or
  None when it had nothing to draw). Returns the figure paths written."""
  if not common.is_main_process():   # multi-host: process 0 writes
    return []
  report.write_csv(table, os.path.join(workdir, csv_name))
  common.atomic_write_text(os.path.join(workdir, "report.md"), md_text)
  out = []
  for name, fn in figures.items():
    p = fn(os.path.join(workdir, "figures", name))
    if p:
      out.append(p)
  return out


__all__ = ["behaviour_name", "cache_root", "validate_common", "check_subset", "rate_fields", "retained_fields",
           "catch_path", "get_catch", "Measurer", "train_on", "seed_agg", "fmt", "write_outputs"]
