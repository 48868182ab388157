"""Validators of the extra experiments' config sections (config.transfer, config.coherence,
config.long_trained) and the stage sections they share (`check_stages`). Each raises a
ValueError (catchjax.validate.ConfigError) that names the field, before any compute."""
from __future__ import annotations

from catchjax import validate as V
from catchjax.stages import organism as org_stage

TRAIN_ARMS = ("treatment", "control")   # the arms of transfer and coherence
SCALES = ("examples", "epochs")         # long_trained's budget scales


def check_stages(config) -> None:
  """What every extra experiment shares: catchjax.validate.check_stages (model folder,
  behaviours, families, organism recipe, sampler, report, the stage sections), unique family
  names and the organism cache folder."""
  V.check_stages(config)
  names = [org_stage.family_name(f) for f in config.organism.families]
  if len(set(names)) != len(names):
    raise V.ConfigError(f"config.organism.families: duplicate family names {names}.")
  if not isinstance(config.get("cache_dir", ""), str):
    raise V.ConfigError(f"config.cache_dir must be a folder path or '', got "
                        f"{config.get('cache_dir')!r}.")


def check_subset(field: str, chosen, families) -> list[str]:
  """`chosen` family names (empty: all); each must be one of the organism's families."""
  names = [org_stage.family_name(f) for f in families]
  chosen = list(chosen) or names
  bad = [c for c in chosen if c not in names]
  if bad:
    raise ValueError(f"{field}: {bad} are not organism families {names} "
                     f"(config.organism.families).")
  return chosen


def chosen_families(field: str, chosen, families) -> list[str]:
  """`check_subset`'s names in the organism's family order."""
  keep = set(check_subset(field, chosen, families))
  return [n for n in (org_stage.family_name(f) for f in families) if n in keep]


def check_seeds(field: str, seeds) -> tuple:
  seeds = tuple(seeds)
  if not seeds or len(set(seeds)) != len(seeds) or \
      any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
    raise ValueError(f"{field} must be distinct non-negative integers, got {seeds}.")
  return seeds


def check_increasing(field: str, xs) -> tuple:
  xs = tuple(xs)
  if not xs or any(isinstance(x, bool) or not isinstance(x, int) or x <= 0 for x in xs) or \
      list(xs) != sorted(set(xs)):
    raise ValueError(f"{field} must be increasing positive integers, got {xs}.")
  return xs


def _sizes(section: str, s, positive=(), non_negative=()) -> None:
  for f in positive:
    V.positive_int(f"config.{section}.{f}", s[f])
  for f in non_negative:
    V.non_negative_int(f"config.{section}.{f}", s[f])


def _m_covers(config, field: str, n: int) -> None:
  if config.catch.m < n:
    raise ValueError(f"config.catch.m={config.catch.m} (prompts sampled to catch) is "
                     f"smaller than {field}={n}.")


def check_transfer(config) -> None:
  check_stages(config)
  t, fams = config.transfer, config.organism.families
  check_subset("config.transfer.sources", t.sources, fams)
  check_subset("config.transfer.targets", t.targets, fams)
  V.distinct_choices("config.transfer.arms", t.arms, TRAIN_ARMS)
  _sizes("transfer", t, positive=("n", "n_eval"), non_negative=("n_test", "n_useful"))
  check_seeds("config.transfer.seeds", t.seeds)
  _m_covers(config, "config.transfer.n", t.n)


def check_coherence(config) -> None:
  check_stages(config)
  a = config.coherence
  check_subset("config.coherence.families", a.families, config.organism.families)
  rs = tuple(a.aux_ratios)
  if any(isinstance(r, bool) or not isinstance(r, (int, float)) or r < 0 for r in rs) or \
      len({float(r) for r in rs}) != len(rs) or len(rs) < 2:
    raise ValueError(f"config.coherence.aux_ratios must be >= 2 distinct numbers >= 0, got {rs}.")
  if 0 not in [float(r) for r in rs]:
    raise ValueError(f"config.coherence.aux_ratios must include 0 (the baseline), got {rs}.")
  V.distinct_choices("config.coherence.arms", a.arms, TRAIN_ARMS)
  _sizes("coherence", a, positive=("n", "n_eval", "n_useful"), non_negative=("n_test",))
  check_seeds("config.coherence.seeds", a.seeds)
  _m_covers(config, "config.coherence.n", a.n)
  if config.train_against.aux_ratio:
    raise ValueError("config.train_against.aux_ratio must stay 0 here: the ratios under test are "
                     "config.coherence.aux_ratios.")


def check_long_trained(config) -> None:
  check_stages(config)
  lt = config.long_trained
  check_increasing("config.long_trained.multipliers", lt.multipliers)
  if lt.scale not in SCALES:
    raise ValueError(f"config.long_trained.scale={lt.scale!r}; use one of {SCALES}.")
  data = V.data_families(config)
  if lt.scale == "examples" and data and not int(config.organism.train.steps):
    raise ValueError(f"config.long_trained.scale='examples': completions family "
                     f"{data[0][1].get('label', data[0][1]['name'])!r} trains each of its rows "
                     f"once per epoch whatever n_per_family is; use scale='epochs'.")
  if lt.scale == "epochs" and int(config.organism.train.steps) > 0:
    raise ValueError("config.long_trained.scale='epochs' needs config.organism.train.steps = 0 "
                     "(the organism's length is then set by epochs).")
  check_subset("config.long_trained.families", lt.families, config.organism.families)
  check_increasing("config.long_trained.ns", lt.ns)
  _sizes("long_trained", lt, positive=("max_steps", "eval_every", "n_eval"),
         non_negative=("n_test",))
  if lt.eval_every > lt.max_steps:
    raise ValueError(f"config.long_trained.eval_every={lt.eval_every} exceeds max_steps="
                     f"{lt.max_steps}.")
  for f in ("threshold_frac", "min_start_rate"):
    V.fraction(f"config.long_trained.{f}", lt[f])
  check_seeds("config.long_trained.seeds", lt.seeds)


__all__ = ["check_stages", "check_subset", "chosen_families", "check_seeds",
           "check_increasing", "check_transfer", "check_coherence", "check_long_trained"]
