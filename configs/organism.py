"""Build, cache and report the model organisms (all trigger families, one organism per
behaviour). `--config=configs/organism.py` (CPU default) or `:full` (accelerator budget)."""
from configs.common import base_config


def get_config(arg: str | None = None):
  c = base_config(arg)
  c.experiment = "organism"
  return c
