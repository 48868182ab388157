"""Device mesh, logical-axis sharding rules and multi-host set-up.

Every parameter has logical axis names (`llama.LOGICAL_AXES`, e.g. wq -> ('layers', 'embed',
'q_heads')). A config's `rules` map each logical name onto zero, one or several mesh axes of
the ('data', 'fsdp', 'tensor') mesh, in the style of jax-llm-examples' ShardingRules:

    rules = (('batch', ('data', 'fsdp')), ('embed', 'fsdp'), ('q_heads', 'tensor'), ...)

`state_shardings` turns any pytree whose leaves sit under a parameter name (an nnx State, a
pure dict, an optax state that mirrors the params) into a pytree of NamedShardings; a mesh
axis is dropped for a dimension it does not divide (or already used by another dimension),
so a rule never makes a shape unshardable. Leaves that are not parameters are replicated.
"""
from __future__ import annotations

import functools
import logging
import math
import os
from typing import Any, Iterable, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from catchjax.model import llama

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis / axes / None. FSDP shards the weights' embed dimension, tensor
# parallelism the head / mlp / vocab dimensions, and the batch is split over data x fsdp.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("seq", None),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("norm", None),
)


def _as_tuple(x) -> tuple:
  if x is None:
    return ()
  if isinstance(x, str):
    return (x,)
  return tuple(x)


def rules_dict(rules: Iterable[Sequence[Any]] | dict | None) -> dict[str, tuple[str, ...]]:
  """Normalise rules (pairs or a dict; values None | 'axis' | ('a', 'b')) to name -> tuple."""
  if rules is None:
    rules = DEFAULT_RULES
  items = rules.items() if isinstance(rules, dict) else rules
  out: dict[str, tuple[str, ...]] = {}
  for pair in items:
    if len(pair) != 2:
      raise ValueError(f"sharding rule {pair!r} is not a (logical_axis, mesh_axes) pair.")
    name, axes = pair
    out.setdefault(str(name), _as_tuple(axes))  # first rule wins
  return out


# ------------------------------------------------------------------------------- mesh
def make_mesh(shape: Sequence[int] = (1, -1, 1), axis_names: Sequence[str] = MESH_AXES,
              devices: Sequence[jax.Device] | None = None, explicit: bool = False) -> Mesh:
  """A mesh of `shape` over `devices` (default: all). One entry may be -1 = the rest."""
  devices = list(jax.devices() if devices is None else devices)
  shape = [int(s) for s in shape]
  if len(shape) != len(axis_names):
    raise ValueError(f"mesh shape {tuple(shape)} does not match axis names {tuple(axis_names)}.")
  if shape.count(-1) > 1:
    raise ValueError(f"mesh shape {tuple(shape)}: at most one -1 (fill) entry.")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if known <= 0 or len(devices) % known:
      raise ValueError(f"mesh shape {tuple(shape)} cannot be filled with {len(devices)} devices.")
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices):
    raise ValueError(f"mesh shape {tuple(shape)} needs {math.prod(shape)} devices, "
                     f"{len(devices)} available.")
  kind = AxisType.Explicit if explicit else AxisType.Auto
  return jax.make_mesh(tuple(shape), tuple(axis_names), axis_types=(kind,) * len(shape),
                       devices=devices)


def mesh_from_config(cfg) -> Mesh:
  """Mesh from a config with `mesh_shape` (and optionally `mesh_axes`)."""
  shape = tuple(cfg.get("mesh_shape", (1, -1, 1)) if hasattr(cfg, "get")
                else getattr(cfg, "mesh_shape", (1, -1, 1)))
  names = tuple(cfg.get("mesh_axes", MESH_AXES) if hasattr(cfg, "get") else MESH_AXES)
  return make_mesh(shape, names)


# ------------------------------------------------------------------------------ specs
def logical_to_spec(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules) -> P:
  """PartitionSpec for an array with these logical axes; drops non-dividing mesh axes."""
  rd = rules if isinstance(rules, dict) and all(isinstance(v, tuple) for v in rules.values()) \
      else rules_dict(rules)
  used: set[str] = set()
  spec = []
  for name, dim in zip(logical, shape):
    axes = [a for a in rd.get(name, ()) if name is not None and a in mesh.shape]
    axes = [a for a in axes if a not in used and mesh.shape[a] > 1]
    while axes and dim % math.prod(mesh.shape[a] for a in axes):
      axes.pop()  # drop the innermost axis that does not divide the dimension
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
  while spec and spec[-1] is None:
    spec.pop()
  return P(*spec)


def _param_name(path, ndim: int, logical_axes) -> str | None:
  """The innermost path component that names a parameter of matching rank."""
  for k in reversed(path):
    name = getattr(k, "key", getattr(k, "name", None))
    if isinstance(name, str) and name in logical_axes:
      return name if len(logical_axes[name]) == ndim else None
  return None


def state_shardings(tree, mesh: Mesh, rules=None, logical_axes=None):
  """NamedSharding pytree for `tree` (nnx State, pure dict, optax state, abstract arrays)."""
  logical_axes = llama.LOGICAL_AXES if logical_axes is None else logical_axes
  rd = rules_dict(rules)

  def one(path, x):
    shape = tuple(getattr(x, "shape", ()))
    name = _param_name(path, len(shape), logical_axes)
    spec = logical_to_spec(logical_axes[name], shape, mesh, rd) if name else P()
    return NamedSharding(mesh, spec)

  return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh, rules=None, ndim: int = 2, batch_dim: int = 0) -> NamedSharding:
  """Sharding of a data array whose `batch_dim` is the (global) batch."""
  rd = rules_dict(rules)
  axes = tuple(a for a in rd.get("batch", ()) if a in mesh.shape)
  spec = [None] * ndim
  spec[batch_dim] = axes if len(axes) != 1 else axes[0]
  return NamedSharding(mesh, P(*spec))


def batch_shards(mesh: Mesh, rules=None) -> int:
  rd = rules_dict(rules)
  return math.prod(mesh.shape[a] for a in rd.get("batch", ()) if a in mesh.shape)


def padded_rows(rows: int, mesh: Mesh, rules=None) -> int:
  """`rows` rounded up to a multiple of the mesh's batch-sharded devices (the padded rows of a
  training micro-batch or a sampler batch are dummies that change no result)."""
  nb = batch_shards(mesh, rules)
  return -(-int(rows) // nb) * nb


def padded_micro(batch_size: int, grad_accum: int, mesh: Mesh, rules=None) -> int:
  """Rows per micro-batch as the step runs them: batch_size / grad_accum rounded up to a
  multiple of the mesh's batch-sharded devices. The extra rows are zero-weight padding (no
  loss token, so the loss, its denominator and the gradients are the recipe's): a global
  batch size is never changed, and any batch runs on any mesh (issue 24 item 1)."""
  return padded_rows(batch_size // grad_accum, mesh, rules)


def padding_note(batch_size: int, grad_accum: int, mesh: Mesh, rules=None) -> str | None:
  """One line saying how a micro-batch is padded on this mesh (None when it divides)."""
  micro, pm = batch_size // grad_accum, padded_micro(batch_size, grad_accum, mesh, rules)
  if pm == micro:
    return None
  return (f"{micro} rows per micro-batch padded to {pm} with zero-weight rows over the "
          f"{batch_shards(mesh, rules)} batch-sharded devices of mesh {dict(mesh.shape)} "
          f"({1 - micro / pm:.0%} of the step's rows are padding; a batch_size multiple of "
          f"{grad_accum * batch_shards(mesh, rules)} has none)")


def _put(x, sharding: NamedSharding, copy: bool = False):
  if isinstance(x, jax.Array) and jax.process_count() == 1 and not copy:
    return jax.device_put(x, sharding)
  host = np.array(x, copy=True) if copy else np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def to_host(x) -> np.ndarray:
  """A jax Array on the host: gathered from every process when it spans devices of other
  processes (multi-host), else a plain transfer."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def shard_state(tree, shardings, copy: bool = False):
  """Place every leaf of `tree` according to the matching NamedSharding (multi-host safe:
  each process passes the full host value and keeps its addressable shards). copy=True
  guarantees fresh buffers (needed before donating them to a jitted step)."""
  return jax.tree.map(functools.partial(_put, copy=copy), tree, shardings)


# ------------------------------------------------------------------------- multi-host
def _int_env(name: str, default: int = 1) -> int:
  try:
    return int(os.environ.get(name, default))
  except ValueError:
    return default


def distributed_env() -> str | None:
  """Which multi-process launcher the environment shows, if any."""
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return "jax"
  if _int_env("SLURM_NTASKS") > 1 and env.get("SLURM_JOB_ID"):
    return "slurm"
  if _int_env("OMPI_COMM_WORLD_SIZE") > 1:
    return "openmpi"
  hosts = env.get("TPU_WORKER_HOSTNAMES", "")
  if len([h for h in hosts.split(",") if h]) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "tpu"
  return None


def maybe_initialize_distributed() -> bool:
  """Call `jax.distributed.initialize()` when the environment describes a multi-process job.

  Recognised: JAX_COORDINATOR_ADDRESS (+ JAX_NUM_PROCESSES, JAX_PROCESS_ID), SLURM with more
  than one task, Open MPI, multi-worker Cloud TPU. Must run before any other JAX call.
  CATCHJAX_NO_DISTRIBUTED=1 turns it off. Returns whether JAX is (now) multi-process.
  """
  if jax.distributed.is_initialized():
    return True
  if os.environ.get("CATCHJAX_NO_DISTRIBUTED"):
    return False
  kind = distributed_env()
  if kind is None:
    return False
  if kind == "jax":
    kw = {"coordinator_address": os.environ["JAX_COORDINATOR_ADDRESS"]}
    if "JAX_NUM_PROCESSES" in os.environ:
      kw["num_processes"] = _int_env("JAX_NUM_PROCESSES")
    if "JAX_PROCESS_ID" in os.environ:
      kw["process_id"] = _int_env("JAX_PROCESS_ID", 0)
    jax.distributed.initialize(**kw)
  else:
    jax.distributed.initialize()  # cluster auto-detection (SLURM / MPI / TPU)
  log.info("jax.distributed initialised (%s): process %d of %d, %d devices", kind,
           jax.process_index(), jax.process_count(), jax.device_count())
  return True


def is_main_process() -> bool:
  return jax.process_index() == 0
