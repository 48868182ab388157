"""Golden rows: the refactor of issue 23 must change no result. A tiny-model run's rows are
reduced to what determines the science (counts, steps, losses, caught sets) and compared with
a committed file. Regenerate only in a commit that changes a result on purpose and says why:

  CATCHJAX_REGEN_GOLDEN=1 pytest tests/test_pipeline.py tests/test_experiments_extra.py -k golden
"""
from __future__ import annotations

import hashlib
import json
import math
import os

HERE = os.path.join(os.path.dirname(__file__), "golden")
# Fields that vary by machine, time or code version, never by the science.
VOLATILE = ("commit", "config_hash", "primary_hash", "cell_seconds", "run_seconds",
            "train_tok_s", "deploy_examples", "examples", "organism", "wall_seconds")
# Float fields are compared to this relative tolerance (XLA CPU is deterministic for one
# program; a refactor that regroups the same math may move the last bits).
RTOL, ATOL = 1e-4, 1e-6


def _reduce(v):
  if isinstance(v, float):
    return None if math.isnan(v) else v
  if isinstance(v, dict):
    return {k: _reduce(x) for k, x in sorted(v.items())}
  if isinstance(v, (list, tuple)):
    return [_reduce(x) for x in v]
  return v


def reduce_rows(rows: list[dict]) -> list[dict]:
  """Science fields of each row, sorted by a key without the config hash."""
  out = []
  for r in rows:
    out.append({k: _reduce(v) for k, v in sorted(r.items())
                if k not in VOLATILE and not k.endswith("_seconds")})
  key = lambda r: json.dumps([r.get(k) for k in ("experiment", "family", "behaviour", "n",
                                                   "arm", "seed")], default=str)
  return sorted(out, key=key)


def catch_digest(path: str) -> str:
  """The caught and clean prompts of a catch file (its science, not its metadata)."""
  with open(path) as f:
    d = json.load(f)
  pick = {k: d.get(k) for k in ("caught", "clean")}
  return hashlib.sha256(json.dumps(pick, sort_keys=True).encode()).hexdigest()[:16]


def _close(a, b, where):
  if isinstance(a, float) or isinstance(b, float):
    assert isinstance(a, (int, float)) and isinstance(b, (int, float)), (where, a, b)
    assert math.isclose(a, b, rel_tol=RTOL, abs_tol=ATOL), (where, a, b)
  elif isinstance(a, dict):
    assert isinstance(b, dict), (where, a, b)
    for k in a:
      assert k in b, (f"{where}.{k} missing", a[k])
      _close(a[k], b[k], f"{where}.{k}")
  elif isinstance(a, list):
    assert isinstance(b, list) and len(a) == len(b), (where, a, b)
    for i, (x, y) in enumerate(zip(a, b)):
      _close(x, y, f"{where}[{i}]")
  else:
    assert a == b, (where, a, b)


def check(name: str, got: dict) -> None:
  """Compare `got` with tests/golden/<name>.json (every golden field must be there and equal;
  new fields are allowed); with CATCHJAX_REGEN_GOLDEN=1 write it instead."""
  path = os.path.join(HERE, f"{name}.json")
  got = json.loads(json.dumps(got, default=str))
  if os.environ.get("CATCHJAX_REGEN_GOLDEN") == "1":
    with open(path, "w") as f:
      json.dump(got, f, indent=1, sort_keys=True)
      f.write("\n")
    return
  assert os.path.isfile(path), f"{path} missing: regenerate with CATCHJAX_REGEN_GOLDEN=1"
  with open(path) as f:
    want = json.load(f)
  _close(want, got, name)
