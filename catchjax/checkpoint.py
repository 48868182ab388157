"""Training checkpoints with orbax: trainable params, optimizer state and a JSON `meta` item.

Layout: <workdir>/ckpt/<step>/{params, opt_state, meta}. Saves are asynchronous; orbax writes
to a temporary folder and renames it when complete, so a run killed mid-save leaves no
half-visible step. A step that still fails to restore (corrupt files, a checksum mismatch) is
moved to <workdir>/ckpt_corrupt/ with a warning and the previous step is used instead.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

log = logging.getLogger(__name__)

ITEMS = ("params", "opt_state", "meta")


class CheckpointCorruptWarning(UserWarning):
  """A checkpoint step could not be restored and was skipped."""


def ckpt_dir(workdir_or_ckpt_dir: str) -> str:
  """`<workdir>/ckpt` if it exists (or the path has no step folders), else the path itself."""
  p = os.path.abspath(workdir_or_ckpt_dir)
  sub = os.path.join(p, "ckpt")
  if os.path.isdir(sub):
    return sub
  if os.path.isdir(p) and any(n.isdigit() for n in os.listdir(p)):
    return p
  return sub


@jax.jit
def checksum(tree) -> jax.Array:
  """A float64-free fingerprint of a params tree (sum of |x| and of x * (1 + index % 7))."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros((2,), jnp.float32)
  tot = jnp.zeros((2,), jnp.float32)
  for x in leaves:
    xf = x.astype(jnp.float32).reshape(-1)
    w = 1.0 + (jnp.arange(xf.shape[0]) % 7).astype(jnp.float32)
    tot = tot + jnp.stack([jnp.sum(jnp.abs(xf)), jnp.sum(xf * w)])
  return tot


def _abstract(tree, shardings=None):
  if shardings is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                       sharding=getattr(x, "sharding", None)),
                        tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


class Checkpointer:
  """Thin wrapper around `ocp.CheckpointManager` for the train loop."""

  def __init__(self, directory: str, keep: int | None = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.keep = keep
    self.async_save = async_save
    self._open()

  def _open(self):
    opts = ocp.CheckpointManagerOptions(
        max_to_keep=self.keep if self.keep and self.keep > 0 else None,
        cleanup_tmp_directories=True, enable_async_checkpointing=self.async_save, create=True)
    self.mngr = ocp.CheckpointManager(self.directory, item_names=ITEMS, options=opts)

  def steps(self) -> list[int]:
    return sorted(self.mngr.all_steps())

  def latest_step(self) -> int | None:
    s = self.steps()
    return s[-1] if s else None

  def save(self, step: int, params, opt_state, meta: dict[str, Any]):
    meta = dict(meta, checksum=[float(v) for v in np.asarray(checksum(params))])
    floats = {str(x.dtype) for x in jax.tree.leaves(params)
              if jnp.issubdtype(x.dtype, jnp.floating)}
    if len(floats) == 1:   # the saved weights' dtype (master weights may differ from the model's)
      meta["params_dtype"] = floats.pop()
    self.mngr.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
        meta=ocp.args.JsonSave(meta)), force=True)

  def wait(self):
    self.mngr.wait_until_finished()

  def close(self):
    self.mngr.wait_until_finished()
    self.mngr.close()

  def _quarantine(self, step: int):
    """Move a bad step aside so that the run can save that step number again."""
    if jax.process_index() == 0:
      src = os.path.join(self.directory, str(step))
      dst_root = os.path.join(os.path.dirname(self.directory),
                              os.path.basename(self.directory) + "_corrupt")
      os.makedirs(dst_root, exist_ok=True)
      dst = os.path.join(dst_root, f"{step}-{int(time.time())}")
      if os.path.isdir(src):
        shutil.move(src, dst)
    self.mngr.close()
    self._open()

  def restore_latest(self, params_like, opt_like=None, params_shardings=None,
                     opt_shardings=None, validate: Callable[[dict], None] | None = None):
    """Restore the newest step that loads and checks out.

    Returns (step, params, opt_state, meta) or None when there is no checkpoint. A step that
    raises on restore or fails its checksum is quarantined with a CheckpointCorruptWarning;
    `validate(meta)` may raise ValueError for a checkpoint from a different run (not caught).
    """
    abs_p = _abstract(params_like, params_shardings)
    abs_o = _abstract(opt_like, opt_shardings) if opt_like is not None else None
    for step in reversed(self.steps()):
      try:
        args = {"params": ocp.args.StandardRestore(abs_p), "meta": ocp.args.JsonRestore()}
        if abs_o is not None:
          args["opt_state"] = ocp.args.StandardRestore(abs_o)
        r = self.mngr.restore(step, args=ocp.args.Composite(**args))
        meta = dict(r["meta"])
        if "checksum" in meta:
          got = [float(v) for v in np.asarray(checksum(r["params"]))]
          if not np.allclose(got, meta["checksum"], rtol=1e-5, atol=1e-6, equal_nan=True):
            raise ValueError(f"params checksum {got} != saved {meta['checksum']}")
      except Exception as e:  # orbax/tensorstore raise many types for damaged files
        msg = (f"checkpoint step {step} in {self.directory} is corrupt or incomplete "
               f"({type(e).__name__}: {str(e)[:300]}); falling back to the previous one.")
        warnings.warn(msg, CheckpointCorruptWarning, stacklevel=2)
        log.warning(msg)
        self._quarantine(step)
        continue
      if validate is not None:
        validate(meta)
      return step, r["params"], r.get("opt_state"), meta
    return None


def restore_params(workdir_or_ckpt_dir: str, model, step: int | None = None):
  """Load the trained params of a `train()` run into `model` (in place) and return it.

  `model` must have the same architecture; for a LoRA run it must carry adapters of the same
  rank (e.g. `hf.load_hf(..., lora_rank=r)`). Uses the newest restorable step unless `step`.
  """
  from catchjax.model import llama  # local: keep this module importable on its own
  d = ckpt_dir(workdir_or_ckpt_dir)
  if not os.path.isdir(d):
    raise FileNotFoundError(f"no checkpoint folder at {d!r}.")
  mngr = ocp.CheckpointManager(d, item_names=ITEMS,
                               options=ocp.CheckpointManagerOptions(read_only=True))
  try:
    steps = sorted(mngr.all_steps(), reverse=True) if step is None else [step]
    if not steps:
      raise FileNotFoundError(f"{d}: no checkpoint steps.")
    last_err = None
    for s in steps:
      try:
        meta = mngr.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
      except Exception as e:
        if step is not None:
          raise
        last_err = e
        continue
      filt = llama.LoRAParam if meta.get("trainable") == "lora" else nnx.Param
      _, trainable, _ = nnx.split(model, filt, ...)
      pure = nnx.to_pure_dict(trainable)
      if not jax.tree.leaves(pure):
        raise ValueError(f"{d}: the checkpoint holds {meta.get('trainable')} params but the "
                         f"model has none of that kind (a LoRA run: load the model with "
                         f"lora_rank={meta.get('lora_rank')}).")
      try:
        # Restored in the dtype they were saved in (fp32 master weights of a bf16 model), so
        # the checksum compares like with like, then cast to the model's own dtypes.
        saved = meta.get("params_dtype")
        like = pure if saved is None else jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(saved) if jnp.issubdtype(
                x.dtype, jnp.floating) else x.dtype, sharding=getattr(x, "sharding", None)),
            pure)
        r = mngr.restore(s, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract(like))))["params"]
        if "checksum" in meta:
          got = [float(v) for v in np.asarray(checksum(r))]
          if not np.allclose(got, meta["checksum"], rtol=1e-5, atol=1e-6, equal_nan=True):
            raise ValueError(f"params checksum {got} != saved {meta['checksum']}")
        r = jax.tree.map(lambda x, want: x.astype(want.dtype) if x.dtype != want.dtype else x,
                         r, pure)
      except Exception as e:
        if step is not None:
          raise
        last_err = e
        warnings.warn(f"checkpoint step {s} in {d} could not be restored "
                      f"({type(e).__name__}: {str(e)[:300]}); trying the previous one.",
                      CheckpointCorruptWarning, stacklevel=2)
        continue
      nnx.replace_by_pure_dict(trainable, r)
      nnx.update(model, trainable)
      return model
    raise ValueError(f"{d}: no checkpoint step could be restored (last error: {last_err}).")
  finally:
    mngr.close()
