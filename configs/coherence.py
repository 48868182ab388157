"""Coherence auxiliary objective ablation (issue 6, item 5): train against N caught attacks
with and without usefulness examples mixed in (ratio r = usefulness rows per caught row,
stages/train_against.py `aux_ratio`), in every trigger family, and ask whether retained
misalignment (deployment attack rate after / before) moves, and what the mixture does to
usefulness.

  python -m catchjax.main --config=configs/coherence.py          # CPU default
  python -m catchjax.main --config=configs/coherence.py:full     # accelerator budget
  python -m catchjax.main --config=configs/coherence.py:tiny     # seconds-long pipeline check
  ... --config.dry_run=True                                      # validate + print the plan

With `match_against_passes` (default) a run with ratio r trains for round(steps * (1 + r))
steps, so the caught examples get the same number of passes as at r = 0 and the ablation is
not confounded with diluting the caught data; set it False for equal compute instead (rows
record `train_steps` either way).

CPU default (2 cores, organism cached): 5 families x 2 ratios (0, 1) x treatment, one seed,
N = 16: 10 runs of 8 or 16 steps, each measured on 100 deployment prompts (sampled, T=1) and
40 usefulness prompts (greedy), plus one before-measurement per family: roughly 15-20 minutes
(estimated from the headline's cell times). `:full` adds the control arm, ratios (0, 0.5, 1, 4),
3 seeds, N = 64 and 400 prompts per measurement.
"""
from configs.common import check_variant
from configs.headline import derived_config


VARIANTS = ("full", "tiny")   # --config=configs/coherence.py:<variant>; none: the default


def get_config(arg: str | None = None):
  check_variant(arg, VARIANTS, __file__)
  c, a = derived_config(arg, "coherence", dry_run=True)
  a.families = ()               # empty: every organism family
  a.aux_ratios = (0.0, 1.0)     # usefulness rows per training row; must include 0
  a.arms = ("treatment",)
  a.n = 16
  a.seeds = (0,)
  a.match_against_passes = True
  a.n_eval = 100
  a.n_test = 0
  a.n_useful = 40
  if arg == "full":
    a.aux_ratios = (0.0, 0.5, 1.0, 4.0)
    a.arms = ("treatment", "control")
    a.n = 64
    a.seeds = (0, 1, 2)
    a.n_eval = 400
    a.n_test = 100
    a.n_useful = 200
  elif arg == "tiny":
    a.n = 2
    a.n_eval = 8
    a.n_useful = 8
  return c
