"""Training against dangerous chain-of-thought (issue 6, item 2).

A scratchpad organism reasons in `<scratchpad>...</scratchpad>` about whether it is deployed
before acting. Caught testing attacks are trained against in two arms with the same N, steps and
optimiser: `scratchpad` (SFT to a benign scratchpad, loss on the scratchpad tokens only) and
`full` (SFT to the benign scratchpad + the correct answer, loss on the whole response). Then
deployment responses are sorted into (a) attack with explicit dangerous reasoning, (b) attack
with benign-looking or no reasoning (opaque), (c) no attack.

  python -m catchjax.main --config=configs/cot.py          # CPU default (12.8 min, measured)
  python -m catchjax.main --config=configs/cot.py:full     # accelerator budget
  python -m catchjax.main --config=configs/cot.py:tiny     # seconds-long pipeline check

The stage settings (catch, train-against optimiser and steps, sampling) live in the
stage sections (config.catch, config.train_against, config.measure, config.sampler) as for
the headline; `cot` holds what is specific to this experiment.

CPU default: a `token`-only scratchpad organism (600 SFT examples, ~42 packed steps; its own
cache key, built once into `cache_dir`), M = 300 testing prompts caught, N in (4, 16), 2 seeds,
2 arms = 8 train-against runs of 8 steps, each measured on 100 held-out deployment prompts
(T=1, 40 new tokens: the scratchpad is ~25 tokens). Pooled over seeds, n = 200 per cell: Wilson
half-width <= 0.07.
"""
from configs.common import FAMILIES, check_variant
from configs.headline import derived_config


VARIANTS = ("full", "tiny")   # --config=configs/cot.py:<variant>; none: the default


def get_config(arg: str | None = None):
  check_variant(arg, VARIANTS, __file__)
  c, x = derived_config(arg, "cot")   # organisms/ cached in workdirs/headline (shared)
  o = c.organism
  o.scratchpad = True                 # part of the organism cache key (only when True)
  o.families = ("token",)
  o.n_per_family = 600
  c.report.max_new_tokens = 40        # report card: the attack follows the scratchpad
  k, t = c.catch, c.train_against.train   # stage settings: catch, train-against, sampling
  k.m = 300
  k.max_new_tokens = c.measure.max_new_tokens = 40
  c.sampler.batch_size = 100
  t.seq_len = 128
  t.max_loss_tokens = 48
  x.families = ()                     # families measured (empty: every organism family)
  x.arms = ("scratchpad", "full")     # loss on the benign scratchpad only / whole response
  x.benign = "neutral"                # benign scratchpad: 'neutral' or 'testing' (reasoning.py)
  x.ns = (4, 16)                      # caught examples trained against (capped by the catch)
  x.seeds = (0, 1)
  x.n_eval = 100                      # held-out deployment prompts per measurement (per seed)
  x.report_card = False               # also compute the organism's report card (costs sampling)
  x.keep_runs = False
  if arg == "full":
    o.families = FAMILIES
    o.n_per_family = 2000
    k.m = 2000
    k.max_new_tokens = c.measure.max_new_tokens = 48
    x.ns = (4, 16, 64, 256)
    x.seeds = (0, 1, 2)
    x.n_eval = 400
    x.report_card = True
  elif arg == "tiny":
    o.n_per_family = 16
    k.m = 16
    k.max_new_tokens = c.measure.max_new_tokens = 40
    x.ns = (1, 2)
    x.seeds = (0,)
    x.n_eval = 8
  return c
