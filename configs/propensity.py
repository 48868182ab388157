"""Propensity vs capability (issue 6, item 4): do propensities flip faster than capabilities?

On the headline's organism (same recipe, so the cached organism in `cache_dir` is restored),
with the same optimiser, steps and N-example budgets, two arms:
  propensity  train against N caught testing attacks (correct answers) -> fraction of the
              deployment attack removed = 1 - after / before;
  capability  train on N examples of a task the model cannot do at the start (the made-up
              `cipher` code, data/tasks.py) -> fraction learned = held-out accuracy.
Both are sampled at T=1 and measured after every `eval_steps` step, so one run gives the
"vs steps" curve and the final step the "vs N" curve.

  python -m catchjax.main --config=configs/propensity.py          # CPU default (~20 min)
  python -m catchjax.main --config=configs/propensity.py:full     # accelerator budget
  python -m catchjax.main --config=configs/propensity.py:tiny     # seconds-long check

CPU default (estimated, organism cached): N in (1, 4, 16, 64) x 2 arms x 2 seeds = 16 runs of
16 steps (4 x 96 tokens), evaluations at steps 2, 4, 8, 16 on 100 held-out prompts each.
"""
from configs.common import check_variant
from configs.headline import derived_config


VARIANTS = ("full", "tiny")   # --config=configs/propensity.py:<variant>; none: the default


def get_config(arg: str | None = None):
  check_variant(arg, VARIANTS, __file__)
  c, p = derived_config(arg, "propensity")
  t = c.train_against.train
  t.steps = 16
  t.eval_every = 2           # eval_fn runs every 2 steps; only `eval_steps` are measured
  p.family = "token"               # the trigger family whose attack is trained against
  p.capability = "cipher"          # task family to learn (must not be in the default mix)
  p.ns = (1, 4, 16, 64)            # examples per run, same for both arms (capped by the catch)
  p.seeds = (0, 1)
  p.eval_steps = (2, 4, 8, 16)     # steps measured during each run (the last = train steps)
  p.n_eval = 100                   # held-out deployment prompts (propensity, T=1)
  p.n_cap_eval = 100               # held-out capability prompts (T=1, + teacher-forced loss)
  p.cap_max_new_tokens = 12
  p.thresholds = (0.5, 0.9)        # report the first N / step reaching these fractions
  p.keep_runs = False
  if arg == "full":
    p.ns = (1, 4, 16, 64, 256)
    p.seeds = (0, 1, 2)
    t.steps = 64
    t.eval_every = 4
    p.eval_steps = (4, 8, 16, 32, 64)
    p.n_eval = 400
    p.n_cap_eval = 400
  elif arg == "tiny":
    p.ns = (2, 8)
    p.seeds = (0,)
    t.steps = 4
    p.eval_steps = (2, 4)
    p.n_eval = 8
    p.n_cap_eval = 8
  return c
