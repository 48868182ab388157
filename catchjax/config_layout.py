"""Config layout changes: fields of config.headline that moved to a stage section (issue 23),
for one-line messages naming the new place (catchjax/main.py) and for comparing a resolved
config written before the change with one written after (report --pool --organisms).
Imports nothing heavy: flag parsing stays fast."""
from __future__ import annotations

import copy

_MEASURE = ("n_eval", "n_test", "teacher_forced", "eval_seed", "n_useful",
            "useful_max_new_tokens", "useful_gate_min_acc", "useful_gate_points", "n_kl",
            "n_sharpen")
_DISTINGUISH = ("n_pairs", "n_probe_train", "probe_layer", "n_curve_pairs", "n_curve_eval",
                "curve_ns", "resamples", "icl_ks", "n_icl")

# old dotted path -> the new path(s) (a value that fed two stages now has a field in each)
MOVED: dict[str, tuple[str, ...]] = {
    "headline.m": ("catch.m",), "headline.catch_split": ("catch.split",),
    "headline.honeypot_frac": ("catch.honeypot_frac",),
    "headline.max_new_tokens": ("catch.max_new_tokens", "measure.max_new_tokens"),
    "headline.train": ("train_against.train",),
    "headline.stopping": ("train_against.stopping",),
    "headline.aux_ratio": ("train_against.aux_ratio",),
    "headline.keep_runs": ("train_against.keep_runs",),
    "headline.dpo_beta": ("train_against.dpo_beta",),
    "headline.batch_size": ("sampler.batch_size",),
    "headline.distinguish_curve": ("distinguish.curve",),
    **{f"headline.{f}": (f"measure.{f}",) for f in _MEASURE},
    **{f"headline.{f}": (f"distinguish.{f}",) for f in _DISTINGUISH},
}


def moved_message(path: str) -> str | None:
  """The message for an override of a moved field (e.g. 'headline.m' or
  'headline.stopping.lr'), None for any other path."""
  parts = path.split(".")
  for i in range(len(parts), 0, -1):
    old = ".".join(parts[:i])
    if old in MOVED:
      rest = ".".join(parts[i:])
      new = [n + (f".{rest}" if rest else "") for n in MOVED[old]]
      return (f"config.{old} has moved: it is " + " and ".join(f"config.{n}" for n in new)
              + " now (one config section per stage); give " +
              " and ".join(f"--config.{n}=..." for n in new))
  return None


def upgrade(config: dict) -> dict:
  """A resolved config dict (config.json's "config") in today's layout: the moved fields of an
  older config.headline put in their sections (a copy; today's configs come back equal)."""
  out = copy.deepcopy(config)
  h = out.get("headline")
  if not isinstance(h, dict):
    return out
  for old, news in MOVED.items():
    key = old.split(".", 1)[1]
    if key not in h:
      continue
    value = h.pop(key)
    for new in news:
      section, field = new.split(".")
      out.setdefault(section, {})[field] = copy.deepcopy(value)
  return out


__all__ = ["MOVED", "moved_message", "upgrade"]
