"""Small shared utilities: config hashing, atomic writes, git commit, timing, common token
prefixes."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile

import numpy as np
from absl import logging


def common_prefix_len(seqs, limit: int) -> int:
  """Length of the longest token prefix common to every sequence of `seqs` (arrays of token
  ids), at most `limit`. Used by the sampler's prefill and the trainer's packed rows."""
  first = np.asarray(seqs[0])
  p = min(max(limit, 0), len(first))
  for s in seqs[1:]:
    n = min(p, len(s))
    neq = np.flatnonzero(np.asarray(s[:n]) != first[:n])
    p = int(neq[0]) if neq.size else n
  return p


# Named seed streams. These reproduce the offsets the experiments used before the streams
# existed (stream("catch", s) == 10_000 + s), so their rows keep their seeds; a new name gets
# a hashed base far from them.
SEED_STREAMS = {"catch": 10_000, "catch_draws": 20_000, "aux": 30_000, "measure_before": 40_000,
                "measure_after": 50_000, "distinguish": 60_000, "probe_train": 70_000,
                # experiments/propensity.py: capability before / after, deployment after the
                # capability steps, the capability data of training size n (+ 1000 * seed + n)
                "capability_before": 41_000, "capability_after": 51_000,
                "measure_after_capability": 52_000, "capability_data": 90_000}


def stream(name: str, seed: int) -> int:
  """The seed of stream `name` for experiment seed `seed` (an int, deterministic)."""
  if name in SEED_STREAMS:
    return SEED_STREAMS[name] + int(seed)
  h = int.from_bytes(hashlib.sha256(f"stream|{name}".encode()).digest()[:4], "big")
  return (1 << 20) + (h % (1 << 26)) * 16 + int(seed)


def register(registry: dict, kind: str, name: str, value, *also: dict):
  """registry[name] = value, refusing a name already in `registry` or in any of `also`; the
  one rule of every registry (arms, measures, behaviours, trigger and task families)."""
  if any(name in r for r in (registry, *also)):
    raise ValueError(f"{kind} {name!r} is already registered")
  registry[name] = value
  return value


def config_hash(cfg, n: int = 12) -> str:
  """Stable hash of a ConfigDict / dict (order-independent JSON)."""
  d = cfg.to_dict() if hasattr(cfg, "to_dict") else cfg
  s = json.dumps(d, sort_keys=True, default=str)
  return hashlib.sha256(s.encode()).hexdigest()[:n]


def atomic_write_text(path: str, text: str) -> None:
  """Write via a temp file in the same folder + rename, so readers never see half a file."""
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.basename(path))
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def git_commit() -> str:
  """Short HEAD sha (+ '-dirty'); a copy without .git (e.g. a tree copied to an accelerator
  machine) names its commit in the environment variable CATCHJAX_COMMIT."""
  if os.environ.get("CATCHJAX_COMMIT"):
    return os.environ["CATCHJAX_COMMIT"]
  try:
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                         text=True, timeout=5)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                           capture_output=True, text=True, timeout=5).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
  except Exception:
    return "unknown"


def is_main_process() -> bool:
  """True on JAX process 0 (and in any single-process run). Multi-host runs compute the same
  thing on every process; only process 0 writes results, reports, figures and caches."""
  import jax
  return jax.process_index() == 0


class WorkdirLocked(RuntimeError):
  """Another run holds this workdir."""


class workdir_lock:
  """Exclusive, non-blocking lock on WORKDIR/.lock: a second run on the same workdir is refused
  with a clear message instead of corrupting shared results and checkpoints. In a multi-process
  job only process 0 (the one that writes) takes it; the others share its run."""

  def __init__(self, workdir: str, main: bool | None = None):
    self.path = os.path.join(workdir, ".lock")
    self.fh = None
    self.main = main

  def __enter__(self):
    import fcntl
    if self.main is None:
      self.main = is_main_process()
    if not self.main:
      return self
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    self.fh = open(self.path, "a+")
    try:
      fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      self.fh.seek(0)
      holder = self.fh.read().strip()
      self.fh.close()
      raise WorkdirLocked(f"workdir {os.path.dirname(self.path)!r} is in use by another run "
                          f"({holder or 'unknown pid'}); wait for it or use another --workdir.")
    except OSError as e:   # e.g. a FUSE bucket mount without flock support
      import warnings
      warnings.warn(f"workdir lock unavailable on this filesystem ({e}); not locking "
                    f"{self.path}. Do not start two runs on this workdir.", stacklevel=2)
      self.fh.close()
      self.fh = None
      return self
    self.fh.seek(0)
    self.fh.truncate()
    self.fh.write(f"pid {os.getpid()}")
    self.fh.flush()
    return self

  def __exit__(self, *exc):
    import fcntl
    if self.fh is None:
      return
    fcntl.flock(self.fh, fcntl.LOCK_UN)
    self.fh.close()


def xla_cache_dir() -> str | None:
  """The one persistent XLA compilation cache every workdir, the bench and the tests share
  (issue 24 item 5): $CATCHJAX_XLA_CACHE (a folder, or "off": None), else
  $XDG_CACHE_HOME/catchjax/xla (~/.cache/catchjax/xla). Entries are keyed by the program, the
  jax/XLA version and the devices, so one folder serves every experiment safely."""
  env = os.environ.get("CATCHJAX_XLA_CACHE")
  if env is not None:
    return None if env in ("", "off") else env
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "catchjax", "xla")


def resolve_scan_unroll(value: int | None, platform: str | None = None) -> int:
  """config.model.scan_unroll -> ModelConfig.scan_unroll. -1 (auto, the default): 0 (the
  layer loop fully unrolled: fastest on XLA:CPU, WORKSPACE.md) on CPU, 1 (a rolled scan:
  compile time independent of depth) on GPU / TPU. Any value >= 0 is kept."""
  v = -1 if value is None else int(value)
  if v >= 0:
    return v
  if platform is None:
    import jax
    platform = jax.default_backend()
  return 0 if platform == "cpu" else 1


# Compile seconds of every program this process compiled (issue 24 item 5): the sampler's
# AOT programs and the train step record here; reports print the sum.
COMPILE_SECONDS: dict[str, list] = {}


MAP_PRESSURE = 0.6   # share of vm.max_map_count at which compiled programs are dropped


def map_pressure() -> float | None:
  """This process's memory mappings as a share of the kernel's vm.max_map_count (Linux), None
  where either cannot be read. XLA's CPU JIT maps code and data per compiled program: a long
  run that fills the limit fails inside LLVM ("Cannot allocate memory", then a segfault),
  whatever RAM is free (WORKSPACE.md, session 15's crash after 1 h 45 of cells)."""
  try:
    with open("/proc/sys/vm/max_map_count") as f:
      limit = int(f.read())
    with open("/proc/self/maps", "rb") as f:
      n = sum(1 for _ in f)
  except (OSError, ValueError):
    return None
  return n / limit if limit > 0 else None


def relieve_map_pressure(threshold: float = MAP_PRESSURE) -> bool:
  """Between cells: above `threshold` of vm.max_map_count, drop JAX's compiled programs
  (jax.clear_caches; the persistent XLA cache on disk makes the recompiles cheap). Returns
  whether it did."""
  p = map_pressure()
  if p is None or p < threshold:
    return False
  import gc

  import jax
  jax.clear_caches()
  gc.collect()
  after = map_pressure()
  logging.info("memory maps at %.0f%% of vm.max_map_count: dropped the compiled programs "
               "(now %s)", 100 * p, "n/a" if after is None else f"{100 * after:.0f}%")
  return True


def record_compile(program: str, seconds: float) -> None:
  n_s = COMPILE_SECONDS.setdefault(program, [0, 0.0])
  n_s[0] += 1
  n_s[1] += float(seconds)


def compile_summary() -> dict:
  """{total_seconds, programs: {name: {compiles, seconds}}} of this process so far."""
  progs = {k: dict(compiles=n, seconds=round(s, 1)) for k, (n, s) in
           sorted(COMPILE_SECONDS.items())}
  return dict(total_seconds=round(sum(s for _, s in COMPILE_SECONDS.values()), 1),
              programs=progs)


def compile_line() -> str:
  """compile_summary as one report-header line."""
  cs = compile_summary()
  parts = ", ".join(f"{k} {v['compiles']} x / {v['seconds']:.1f} s"
                    for k, v in cs["programs"].items())
  return f"{cs['total_seconds']:.1f} s" + (f" ({parts})" if parts else "")


def enable_compile_cache(cache_dir: str | None) -> str | None:
  """Persist XLA compilations under cache_dir (a rerun of an experiment then skips the ~20 s
  sampler and train-step compiles). None or "off" leaves JAX's default (no cache)."""
  if not cache_dir or cache_dir == "off":
    return None
  import jax
  os.makedirs(cache_dir, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return cache_dir


# Published dense matmul peaks, FLOP/s per device, by (device_kind substring, compute dtype).
# fp32 on NVIDIA GPUs is the TF32 tensor-core peak (XLA's default precision for fp32 dots
# there). "cpu" is this project's 2-core dev/CI machine, measured (WORKSPACE.md).
_PEAKS = (("H100", {"bfloat16": 989e12, "float32": 494e12}),
          ("H200", {"bfloat16": 989e12, "float32": 494e12}),
          ("A100", {"bfloat16": 312e12, "float32": 156e12}),
          ("TPU v4", {"bfloat16": 275e12}),
          ("TPU v5 lite", {"bfloat16": 197e12}),
          ("TPU v5p", {"bfloat16": 459e12}),
          ("TPU v6 lite", {"bfloat16": 918e12}),
          ("cpu", {"float32": 180e9, "bfloat16": 180e9}))


def device_peak_flops(dtype: str = "float32", device_kind: str | None = None) -> float:
  """Peak matmul FLOP/s of one device for MFU: the published dense figure for known
  accelerators (table above), this project's measured 2-core CPU figure for CPUs, and 0.0
  (MFU not reported) for anything else. Set `peak_flops` in a train config to override."""
  import jax
  if device_kind is None:
    d = jax.devices()[0]
    device_kind = "cpu" if d.platform == "cpu" else str(d.device_kind)
  for sub, peaks in _PEAKS:
    if sub.lower() in device_kind.lower():
      return float(peaks.get(str(dtype), 0.0))
  return 0.0
