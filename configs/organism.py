"""Build, cache and report the model organisms (all trigger families, one organism per
behaviour). `--config=configs/organism.py` (CPU default) or `:full` (accelerator budget)."""
from configs.common import base_config


def get_config(arg: str | None = None):
  c = base_config()
  c.experiment = "organism"
  if arg == "full":
    c.behaviours = ("hate", "exfiltrate")
    c.organism.n_per_family = 2000
    c.organism.train.batch_size = 16
    c.report.n_eval = 400
    c.report.n_useful = 400
  elif arg == "tiny":      # seconds-long pipeline check (used by tests with a tiny model)
    c.organism.n_per_family = 16
    c.organism.probe_n = 4
    c.organism.train.eval_every = 2
    c.report.n_eval = 8
    c.report.n_useful = 8
    c.report.max_new_tokens = 8
  return c
