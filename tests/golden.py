"""Golden rows: the refactor of issue 23 must change no result. A tiny-model run's rows are
reduced to what determines the science (counts, steps, losses, caught sets) and compared with
a committed file. Regenerate only in a commit that changes a result on purpose and says why:

  CATCHJAX_REGEN_GOLDEN=1 pytest tests/test_pipeline.py tests/test_experiments_extra.py -k golden

XLA:CPU is deterministic for one program on one CPU, not across CPUs: the code generated for
the host's vector units groups sums differently, and a near-tied T = 1 draw of the tiny model
then goes the other way (a catch set, and every row after it, changes). So a golden file is
per host kind: `<name>.<host_key()>.json` when one was written on such a host, else the
unkeyed `<name>.json` (written at b66e0b0 on that day's CI host, which passed at 3db2f2b).
Regeneration writes the keyed file of this host; a commit that changes a result on purpose
regenerates its host's file and deletes the others (they no longer hold that result).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform

HERE = os.path.join(os.path.dirname(__file__), "golden")
# Fields that vary by machine, time or code version, never by the science.
VOLATILE = ("commit", "config_hash", "primary_hash", "cell_seconds", "run_seconds",
            "train_tok_s", "deploy_examples", "examples", "organism", "wall_seconds")
# Float fields are compared to this relative tolerance (XLA CPU is deterministic for one
# program; a refactor that regroups the same math may move the last bits).
RTOL, ATOL = 1e-4, 1e-6


def host_key() -> str:
  """The CPU kind a golden file holds: the machine and its widest vector unit (the one XLA
  generates code for), e.g. 'x86_64-avx2' or 'x86_64-avx512'."""
  flags = set()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith(("flags", "Features")):
          flags = set(line.split(":", 1)[1].split())
          break
  except OSError:
    pass
  simd = ("avx512" if "avx512f" in flags else "avx2" if "avx2" in flags
          else "sve" if "sve" in flags else "base")
  return f"{platform.machine()}-{simd}"


def golden_path(name: str) -> str:
  """This host kind's golden file, else the unkeyed one (module docstring)."""
  keyed = os.path.join(HERE, f"{name}.{host_key()}.json")
  return keyed if os.path.isfile(keyed) else os.path.join(HERE, f"{name}.json")


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
  """Compare `got` with this host's golden file (golden_path: every golden field must be there
  and equal; new fields are allowed); with CATCHJAX_REGEN_GOLDEN=1 write this host kind's
  keyed file instead."""
  got = json.loads(json.dumps(got, default=str))
  if os.environ.get("CATCHJAX_REGEN_GOLDEN") == "1":
    with open(os.path.join(HERE, f"{name}.{host_key()}.json"), "w") as f:
      json.dump(got, f, indent=1, sort_keys=True)
      f.write("\n")
    return
  path = golden_path(name)
  assert os.path.isfile(path), f"{path} missing: regenerate with CATCHJAX_REGEN_GOLDEN=1"
  with open(path) as f:
    want = json.load(f)
  _close(want, got, f"{os.path.basename(path)} (host {host_key()})")
