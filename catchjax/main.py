"""Entry point: `python -m catchjax.main --config=configs/headline.py[:variant] [--workdir=DIR]
[--config.seed=1 ...]`. Looks up `config.experiment` and runs it (kept tiny, as in nanodo)."""
from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (default workdirs/<experiment>).")
flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  import logging as pylogging
  from absl import logging
  logging.set_verbosity(logging.WARNING)   # orbax logs every save at INFO
  pylogging.getLogger("catchjax").setLevel(pylogging.INFO)
  from catchjax import sharding
  sharding.maybe_initialize_distributed()   # TPU VM / Slurm / JAX_COORDINATOR_ADDRESS
  from catchjax import experiments
  experiments.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
