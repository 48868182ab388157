"""Cross-domain transfer (issue 6, item 1): train against caught attacks in ONE trigger family
(the source) and measure retained misalignment (deployment attack rate after / before) in EVERY
family of the same multi-family organism; a control arm trains on N prompts of the source
family where the organism behaved.

  python -m catchjax.main --config=configs/transfer.py          # CPU default
  python -m catchjax.main --config=configs/transfer.py:full     # accelerator budget
  python -m catchjax.main --config=configs/transfer.py:tiny     # seconds-long pipeline check
  ... --config.dry_run=True                                     # validate + print the plan

The organism recipe, catch and train-against settings are the headline's (same variant), so
with `cache_dir=workdirs/headline` the headline's cached organism is restored, not rebuilt, and
its catch files are reused when its resolved config caught with the same settings.

CPU default (2 cores, organism cached): 5 sources x 2 arms = 10 train-against runs of 8 steps
at N = 16, one seed, each measured on 5 targets x 100 deployment prompts (sampled, T=1) plus
one before-measurement per target: roughly 20 minutes on an idle 2-core CPU (estimated from the
headline's cell times; building the organism from cold adds ~40 minutes). Per-cell 95%
intervals are Wilson (n = 100: half-width <= 0.1); `:full` runs 3 seeds (bootstrap over seeds),
N = 64, 400 prompts per target and both behaviours.
"""
from configs.common import check_variant
from configs.headline import derived_config


VARIANTS = ("full", "tiny")   # --config=configs/transfer.py:<variant>; none: the default


def get_config(arg: str | None = None):
  check_variant(arg, VARIANTS, __file__)
  c, t = derived_config(arg, "transfer", dry_run=True)
  t.sources = ()          # families trained against (empty: every organism family)
  t.targets = ()          # families measured (empty: every organism family)
  t.arms = ("treatment", "control")
  t.n = 16                # training prompts per run (capped by the caught / clean pools)
  t.seeds = (0,)          # change the chosen N prompts, data order and sampling
  t.n_eval = 100          # held-out deployment prompts per target per measurement
  t.n_test = 0            # held-out testing prompts per target (0: not measured)
  t.n_useful = 0          # usefulness prompts per run (0: not measured)
  if arg == "full":
    t.n = 64
    t.seeds = (0, 1, 2)
    t.n_eval = 400
    t.n_test = 100
    t.n_useful = 200
  elif arg == "tiny":
    t.n = 2
    t.n_eval = 8
  return c
