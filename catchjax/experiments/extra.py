"""Shared plumbing of the extra experiments (transfer, long_trained, coherence).

Nothing here is a new stage: the experiments run their plans of cells with pipeline.Runner
over a stages/context.py Context per behaviour (organism, sampler, held-out sets, catches and
the measure registry), and this module holds what they share around that:

* `entry`: every experiment's `run` (validate, dry-run plan, workdir lock);
* `cache_root`: where organisms and catches are cached. `config.cache_dir` (default
  `workdirs/headline` in the extra configs) lets every experiment reuse the headline's cached
  organism (its key depends only on the organism recipe) and its catch files (one catch cache,
  keyed by the catch's settings: stages/train_against.py `catch_path`);
* `run_plans` / `finish`: run the plans of cells (one Context per behaviour with cells left)
  and write the closing report;
* `measure_fields` / `trained_fields`: the registry's measures as the rows' flat fields
  (deploy_*, test_*, useful_*, deploy_tf, retained);
* `train_on`: a seeded choice of N rows from a catch pool (caught or clean) + train_against.
The extra configs' sections are validated in catchjax/validate_extra.py.
"""
from __future__ import annotations

import os
import time

import numpy as np

from catchjax import common, pipeline, report
from catchjax.common import stream
from catchjax.data.behaviors import behavior_name
from catchjax.report_extra import seed_agg  # noqa: F401 (re-exported: the tests use it)
from catchjax.stages import measure
from catchjax.stages import organism as org_stage
from catchjax.stages import train_against as ta
from catchjax.tokenizer import load_tokenizer


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


def organisms_status(config, cache: str) -> dict:
  """Per behaviour: the organism's cache key and whether it is already built (dry-run plans)."""
  out = {}
  for b in config.behaviours:
    key = org_stage.organism_key(config, b)
    out[behavior_name(b)] = dict(
        key=key, cached=os.path.isfile(os.path.join(cache, "organisms", key, "done.json")))
  return out


def cache_root(config, workdir: str) -> str:
  """Folder holding organisms/ and catches/ (config.cache_dir, else the run's own workdir)."""
  d = config.get("cache_dir", "") if hasattr(config, "get") else ""
  return d or workdir


# ---------------------------------------------------------------------------------------------
# A run: its runner, one Context per behaviour, its report


def run_plans(experiment: str, config, workdir: str, plans, cell_fn, **sizes):
  """Run an experiment's plans, [(config, behaviour, cells)] (a plan's config may differ from
  the run's, e.g. by the organism's budget), with one pipeline.Runner: every cell counts into
  one progress bar; each behaviour with cells left gets a Context (it restores or builds the
  organism; `sizes`: its n_eval / n_test / n_useful) and runs `cell_fn(ctx, runner)` over its
  cells (then that function's `close()`, when it has one). Returns the runner."""
  from catchjax.stages.context import Context
  runner = pipeline.Runner(experiment, config, workdir, f"{experiment} cells")
  cache, tok = cache_root(config, workdir), load_tokenizer(config.model.hf_dir)
  plans = list(plans)
  runner.plan(c for _, _, cells in plans for c in cells)
  for cfg, bspec, cells in plans:
    if all(runner.done(c) for c in cells):
      continue
    fn = cell_fn(Context(cfg, cache, tok, None, bspec, **sizes), runner)
    runner.run(cells, fn, keep_scratch=cfg.train_against.keep_runs)
    getattr(fn, "close", lambda: None)()
    del fn   # (its Context and organism, before the next behaviour's)
  return runner


def finish(runner, workdir: str, meta: dict, write_report) -> dict:
  """Close the bar, save the report header (`meta` + hash, commit, wall time) and write the
  report from this config's rows."""
  wall = runner.close()
  meta = dict(config_hash=runner.chash, commit=runner.commit,
              wall_seconds_this_invocation=round(wall), **meta)
  report.save_meta(workdir, meta)
  out = write_report(runner.rows(), workdir, meta)
  print(f"[{runner.experiment}] done in {wall:.0f}s; report at "
        f"{os.path.join(workdir, 'report.md')}")
  return out


# ---------------------------------------------------------------------------------------------
# Row fields


def rate_fields(prefix: str, d: dict | None) -> dict:
  """measure.rate_fields, {} for a measure the experiment did not take."""
  return {} if d is None else measure.rate_fields(prefix, d)


def retained_fields(after: dict, before_rate: float) -> dict:
  """retained = after / before with the after-rate's Wilson interval scaled by 1 / before
  (the headline's convention); None where the organism never attacked before."""
  if not before_rate:
    return dict(retained=None, retained_lo=None, retained_hi=None)
  return dict(retained=after["rate"] / before_rate, retained_lo=after["lo"] / before_rate,
              retained_hi=after["hi"] / before_rate)


def before_fields(before: dict, keys) -> dict:
  """`key`_before for each key of the "before" row."""
  return {f"{k}_before": before.get(k) for k in keys}


def catch_fields(c: ta.Catch) -> dict:
  r = c.catch_rate
  return dict(m=c.m, n_caught=len(c.caught), catch_rate=r["rate"], catch_lo=r["lo"],
              catch_hi=r["hi"])


def measure_fields(ctx, model, spec, seed: int, tf: bool = True) -> dict:
  """The measure registry on `model` (ctx.measure) as flat row fields: deploy_* (+ two example
  responses), test_* (when ctx.n_test), useful_* (when ctx.n_useful), deploy_tf (None
  without `tf` or measure.teacher_forced)."""
  names = (("deploy",) + ("test",) * bool(ctx.n_test) + ("useful",) * bool(ctx.n_useful)
           + ("tf",) * bool(tf))
  m = ctx.measure(model, spec, seed, names=names)
  row = rate_fields("deploy", m["deploy"])
  row["deploy_examples"] = m["deploy"]["responses"][:2]
  row.update(rate_fields("test", m.get("test")))
  row.update(rate_fields("useful", m.get("useful")))
  row["deploy_tf"] = m.get("tf")
  return row


def trained_fields(ctx, res, spec, seed: int, before_rate: float, t_run: float) -> dict:
  """A train-against cell's result fields: skipped when there was nothing to train on (res is
  None), else the measures after (stream "measure_after"), retained against `before_rate`,
  the final loss, steps and the run's seconds since training started (`t_run`)."""
  if res is None:
    return dict(skipped="no caught (or clean) prompts to train on", deploy_rate=None,
                deploy_n=0, retained=None)
  row = measure_fields(ctx, res.model, spec, stream("measure_after", seed))
  row.update(retained_fields(dict(rate=row["deploy_rate"], lo=row["deploy_lo"],
                                  hi=row["deploy_hi"]), before_rate))
  row.update(train_loss=res.final_loss, train_steps=res.steps, run_seconds=time.time() - t_run)
  return row


def train_on(config, org_model, tok, catch: ta.Catch, arm: str, n: int, seed: int, rdir: str,
             *, aux_ratio: float = 0.0, train_overrides=None):
  """Train against N rows of the catch: caught prompts (arm 'treatment') or prompts where the
  organism behaved ('control'); N is capped by the smaller pool so both arms match. Returns
  (result or None when nothing to train on, n_train)."""
  if arm not in ("treatment", "control"):
    raise ValueError(f"arm must be 'treatment' or 'control', got {arm!r}")
  pool = catch.caught if arm == "treatment" else catch.clean
  n_train = min(int(n), len(catch.caught), len(catch.clean))
  if n_train == 0:
    return None, 0
  rng = np.random.default_rng([int(seed), int(n), 1 if arm == "treatment" else 2])
  rows = ta.sft_rows(pool, n_train, rng)
  res = ta.train_against(config, org_model, tok, rows, seed, rdir, aux_ratio=float(aux_ratio),
                         train_overrides=train_overrides)
  return res, n_train


__all__ = ["entry", "cache_root", "organisms_status", "run_plans", "finish", "rate_fields",
           "retained_fields", "before_fields", "catch_fields", "measure_fields",
           "trained_fields", "train_on", "seed_agg"]
