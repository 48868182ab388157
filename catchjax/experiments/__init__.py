"""Experiments: each a plan of cells over the pipeline stages (catchjax/pipeline.py) plus its
report, one module each.

`run(config, workdir)` resolves the workdir, writes the resolved config and its hash, then
dispatches on `config.experiment`.
"""
from __future__ import annotations

import importlib
import json
import os

from catchjax import common

EXPERIMENTS = ("smoke", "organism", "headline")
EXPERIMENTS += ("transfer", "long_trained", "coherence")   # issue 6 (experiments/extra.py)
EXPERIMENTS += ("cot", "propensity")   # issue 6 items 2 and 4
# `config.dry_run=True` (validate, print the plan, exit): the compile plan (catchjax/plan.py)
# for organism / headline, the cells and cached organisms for the extra experiments.
DRY_RUNS = ("organism", "headline", "transfer", "long_trained", "coherence")


def run(config, workdir: str | None = None):
  """Raises `catchjax.validate.ConfigError` (naming the field) for bad input, before the
  workdir or any compute; `catchjax.main` prints it as one line. Nothing later raises it, but
  a dry run's compile plan over config.dry_run_device_gb (catchjax/plan.py)."""
  from catchjax.validate import ConfigError
  name = config.get("experiment")
  if name not in EXPERIMENTS:
    raise ConfigError(f"config.experiment={name!r} is unknown; known: {', '.join(EXPERIMENTS)}.")
  workdir = workdir or os.path.join("workdirs", name)
  dry = bool(config.get("dry_run", False))
  if dry and name not in DRY_RUNS:   # never run the whole experiment instead of a plan
    raise ConfigError(f"config.dry_run=True: the {name} experiment has no dry run (those of "
                      f"{', '.join(DRY_RUNS)} do).")
  mod = importlib.import_module(f"catchjax.experiments.{name}")
  if hasattr(mod, "validate"):   # bad input is refused before the workdir or any compute
    try:
      mod.validate(config)
    except ConfigError:
      raise
    # The experiments' own checks raise ValueError, and a missing input (model folder, cue
    # file) FileNotFoundError, each naming its field: all of them are config errors.
    except (ValueError, FileNotFoundError) as e:
      raise ConfigError(str(e)) from e
  os.makedirs(workdir, exist_ok=True)
  if common.is_main_process():   # multi-host: every process runs, process 0 writes
    common.atomic_write_text(os.path.join(workdir, "config.json"), json.dumps(
        {"config_hash": common.config_hash(config), "config": config.to_dict()}, indent=2,
        default=str))
  # The one persistent XLA compilation cache (common.xla_cache_dir: shared by every workdir,
  # the bench and the tests; CATCHJAX_XLA_CACHE=off disables it, or points it elsewhere).
  # Not for a dry run: its compile plan reports compile times, and keeps nothing.
  if not dry:
    common.enable_compile_cache(common.xla_cache_dir())
  return mod.run(config, workdir)
