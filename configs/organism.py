"""Build, cache and report the model organisms (all trigger families, one organism per
behaviour). `--config=configs/organism.py` (CPU default) or `:full` (accelerator budget).
`--config.organism.train.share_prefix=True` packs the same examples into ~23% fewer steps
(same loss per example; a different organism key), WORKSPACE.md "Organism"."""
from configs.common import base_config, check_variant


VARIANTS = ("full", "tiny")   # --config=configs/organism.py:<variant>; none: the default


def get_config(arg: str | None = None):
  check_variant(arg, VARIANTS, __file__)
  c = base_config(arg)
  c.experiment = "organism"
  return c
