"""Compile bookkeeping of the sampler programs, with JAX's own jit cache doing the caching.

`call(name, fn, *args, **static)` calls a jitted program and returns the seconds it spent
compiling (0.0 when JAX's cache served it). The seconds come from `jax.monitoring`: JAX reports
the duration of every trace, jaxpr-to-MLIR lowering and backend compile (a persistent-cache
load included) it does; while a `call` runs, those of its thread are summed, and every backend
compile closes one compile entry -- `common.record_compile(f"sampler {name}", seconds)`, the
numbers the report header prints -- so a cache hit records nothing and a recompile is counted.

`compile_count()` is the number of sampler compiles this process recorded; `compiled_text`
the optimized HLO of a program for given (abstract or concrete) arguments.
"""
from __future__ import annotations

import threading

import jax

from catchjax import common

# Event names of jax._src.dispatch (JAXPR_TRACE_EVENT, JAXPR_TO_MLIR_MODULE_EVENT,
# BACKEND_COMPILE_EVENT): one backend compile per compiled executable.
TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
LOWER_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"

_local = threading.local()
_count = [0]


class _Tally:
  """The compiles of one `call`: seconds of each; trace / lowering time goes to the next."""

  def __init__(self):
    self.pending = 0.0
    self.seconds: list[float] = []

  def add(self, event: str, secs: float) -> None:
    if event in (TRACE_EVENT, LOWER_EVENT):
      self.pending += secs
    elif event == COMPILE_EVENT:
      self.seconds.append(self.pending + secs)
      self.pending = 0.0


def _listener(event: str, duration: float, **_) -> None:
  tally = getattr(_local, "tally", None)
  if tally is not None:
    tally.add(event, duration)


jax.monitoring.register_event_duration_secs_listener(_listener)


def call(name: str, fn, *args, **static):
  """(fn(*args, **static), seconds spent compiling it); records each compile."""
  outer = getattr(_local, "tally", None)
  _local.tally = tally = _Tally()
  try:
    out = fn(*args, **static)
  finally:
    _local.tally = outer
  for secs in tally.seconds:
    _count[0] += 1
    common.record_compile(f"sampler {name}", secs)
  if tally.seconds:
    # Each new sampler shape maps more JIT code: an organism build plus its report card in
    # one process filled vm.max_map_count before the first cell (2026-12-02, LLVM "Cannot
    # allocate memory", then a segfault), so the check runs after every compile too, not only
    # between cells.
    common.relieve_map_pressure()
  return out, float(sum(tally.seconds))


def compile_count() -> int:
  """Sampler programs compiled in this process so far (cache hits not counted)."""
  return _count[0]


def compiled_text(fn, *args, **static) -> str:
  """Optimized HLO text of jitted `fn` for these arguments (arrays or ShapeDtypeStructs)."""
  return fn.lower(*args, **static).compile().as_text()
