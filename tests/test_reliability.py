"""Reliability under faults, each proven by doing it: kill -9 of a real `catchjax.main`
process at random points of organism training and of the headline sweep, then rerun; the
finished workdir must equal an uninterrupted run's (same result keys, no duplicates, same
values, same organism). Plus: a second run on a locked workdir is refused.

The victim runs `python -m catchjax.main` (through tests/helpers_reliability_worker.py, which
pauses at the chosen checkpoint / result row so that the SIGKILL lands exactly there) on
tests/reliability_config.py: a tiny random Llama, one user JSONL trigger family and a regex
behaviour. A persistent XLA compilation cache shared by the subprocesses keeps the CPU cost
down.
"""
import glob
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
WORKER = os.path.join(HERE, "helpers_reliability_worker.py")
CONFIG = os.path.join(HERE, "reliability_config.py")
# Fields that measure time or the code version, not the result.
ROW_VOLATILE = {"cell_seconds", "train_tok_s", "commit"}
ORG_VOLATILE = {"train_seconds", "tokens_per_sec", "mfu", "compile_time", "probe_seconds"}


def _env(cache_dir, **pause):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1",
             CATCHJAX_NO_DISTRIBUTED="1", JAX_COMPILATION_CACHE_DIR=str(cache_dir),
             CATCHJAX_XLA_CACHE=str(cache_dir),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  env.pop("XLA_FLAGS", None)
  for k in ("CATCHJAX_TEST_PAUSE_AT_SAVE", "CATCHJAX_TEST_PAUSE_AT_ROW", "CATCHJAX_TEST_MARKER"):
    env.pop(k, None)
  env.update({k: str(v) for k, v in pause.items()})
  return env


def _start(params, wd, log, cache_dir, **pause):
  f = open(log, "ab")
  p = subprocess.Popen([sys.executable, WORKER, f"--config={CONFIG}:{params}",
                        f"--workdir={wd}"], env=_env(cache_dir, **pause), cwd=REPO,
                       stdout=f, stderr=subprocess.STDOUT)
  p._log = log  # noqa: SLF001
  return p


def _tail(log, n=4000):
  with open(log, errors="replace") as f:
    return f.read()[-n:]


def _run(params, wd, log, cache_dir, timeout=900):
  p = _start(params, wd, log, cache_dir)
  assert p.wait(timeout=timeout) == 0, _tail(log)


def _kill_at(params, wd, log, cache_dir, timeout=900, **pause):
  """Run the victim until it reaches its pause point, then SIGKILL it there."""
  marker = os.path.join(os.path.dirname(log), f"marker-{time.time_ns()}")
  p = _start(params, wd, log, cache_dir, CATCHJAX_TEST_MARKER=marker, **pause)
  t0 = time.time()
  while not os.path.exists(marker):
    if p.poll() is not None:
      pytest.fail(f"the victim exited (rc {p.returncode}) before its kill point:\n"
                  f"{_tail(log)}")
    if time.time() - t0 > timeout:
      p.kill()
      pytest.fail("kill point never reached")
    time.sleep(0.2)
  os.kill(p.pid, signal.SIGKILL)
  assert p.wait(timeout=60) == -signal.SIGKILL
  with open(marker) as f:
    return f.read()


def _ckpt_steps(wd):
  return sorted(int(os.path.basename(d)) for d in
                glob.glob(os.path.join(wd, "organisms", "*", "train", "ckpt", "*"))
                if os.path.basename(d).isdigit())


def _rows(wd):
  path = os.path.join(wd, "results.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _key(r):
  from catchjax.results import row_key
  return row_key(r)


def _strip(d, volatile):
  return {k: v for k, v in d.items() if k not in volatile}


def _organism(wd):
  (odir,) = glob.glob(os.path.join(wd, "organisms", "*"))
  with open(os.path.join(odir, "done.json")) as f:
    return odir, json.load(f)


def _params(odir, model_dir):
  from flax import nnx
  import jax
  from catchjax import train as train_lib
  from catchjax.model import hf
  m = train_lib.restore_params(os.path.join(odir, "train"), hf.load_hf(model_dir))
  pure = nnx.to_pure_dict(nnx.state(m, nnx.Param))
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_flatten_with_path(pure)[0]}


@pytest.fixture(scope="module")
def setup(tiny_dir, tmp_path_factory):
  sys.path.insert(0, HERE)
  from reliability_config import write_cues
  d = tmp_path_factory.mktemp("rel")
  params = str(d / "params.json")
  with open(params, "w") as f:
    json.dump({"model_dir": tiny_dir, "jsonl": write_cues(str(d / "cues.jsonl"))}, f)
  cache = d / "xla_cache"
  ref = str(d / "reference")
  t0 = time.time()
  _run(params, ref, str(d / "reference.log"), cache)
  print(f"reference run: {time.time() - t0:.1f}s wall")
  return d, params, cache, ref


@pytest.mark.slow
def test_kill9_during_organism_and_sweep_resumes_to_the_same_results(setup, tiny_dir):
  d, params, cache, ref = setup
  ref_rows = _rows(ref)
  assert len(ref_rows) >= 3, ref_rows
  seed = random.SystemRandom().randrange(1 << 30)
  rng = random.Random(seed)
  kill_step = rng.choice([2, 4, 6])                 # of 8 organism steps, ckpt every 2
  kill_rows = rng.randrange(1, len(ref_rows))       # rows written before the sweep kill
  print(f"kill seed {seed}: organism at ckpt step {kill_step}, sweep after {kill_rows} rows")
  wd, log = str(d / "victim"), str(d / "victim.log")

  # 1) kill -9 during organism training, right after checkpoint `kill_step` is on disk.
  assert _kill_at(params, wd, log, cache, CATCHJAX_TEST_PAUSE_AT_SAVE=kill_step) == \
      f"checkpoint {kill_step}"
  assert not glob.glob(os.path.join(wd, "organisms", "*", "done.json"))
  assert not _rows(wd)

  # 2) rerun; kill -9 during the headline sweep once `kill_rows` rows are written.
  assert _kill_at(params, wd, log, cache, CATCHJAX_TEST_PAUSE_AT_ROW=kill_rows) == \
      f"row {kill_rows}"
  assert len(_rows(wd)) == kill_rows < len(ref_rows)
  assert "resumed from" in _tail(log, 10**7) and f"step {kill_step} " in _tail(log, 10**7), \
      "the organism did not resume from its checkpoint"

  # 3) rerun to the end.
  _run(params, wd, log, cache)

  rows = _rows(wd)
  keys = [_key(r) for r in rows]
  assert len(keys) == len(set(keys)), "duplicate result rows"
  assert set(keys) == {_key(r) for r in ref_rows}, "missing or extra result rows"
  by_key = {_key(r): r for r in ref_rows}
  for r in rows:
    assert _strip(r, ROW_VOLATILE) == _strip(by_key[_key(r)], ROW_VOLATILE), _key(r)
  odir_ref, info_ref = _organism(ref)
  odir, info = _organism(wd)
  assert _strip(info, ORG_VOLATILE) == _strip(info_ref, ORG_VOLATILE)
  p_ref, p_got = _params(odir_ref, tiny_dir), _params(odir, tiny_dir)
  assert p_ref.keys() == p_got.keys()
  for k in p_ref:
    np.testing.assert_array_equal(p_got[k], p_ref[k], err_msg=k)
  for f in ("report.md", "summary.csv"):
    assert os.path.getsize(os.path.join(wd, f)) > 0
  # Every JSON file the kills could have interrupted is complete (atomic writes).
  for path in glob.glob(os.path.join(wd, "**", "*.json"), recursive=True):
    if "/ckpt/" not in path:
      with open(path) as f:
        json.load(f)


def test_second_run_on_a_locked_workdir_is_refused(setup, tmp_path):
  """A real second process on a workdir whose lock is held exits with a clear message."""
  d, params, cache, ref = setup
  from catchjax import common
  wd = str(tmp_path / "locked")
  with common.workdir_lock(wd, main=True):
    p = subprocess.run([sys.executable, WORKER, f"--config={CONFIG}:{params}",
                        f"--workdir={wd}"], env=_env(cache), cwd=REPO, capture_output=True,
                       text=True, timeout=600)
  assert p.returncode != 0
  assert "is in use by another run" in p.stderr and f"pid {os.getpid()}" in p.stderr
  assert not os.path.exists(os.path.join(wd, "results.jsonl"))
