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
  and write the closing report.
The rows' flat fields (measures, retained, catch, `train_on`) are in catchjax/stages/rows.py.
The extra configs' sections are validated in catchjax/validate_extra.py.
"""
from __future__ import annotations

import os

from catchjax import common, pipeline, report
from catchjax.data.behaviors import behavior_name
from catchjax.report_extra import seed_agg  # noqa: F401 (re-exported: the tests use it)
from catchjax.stages import organism as org_stage
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


__all__ = ["entry", "cache_root", "organisms_status", "run_plans", "finish", "seed_agg"]
