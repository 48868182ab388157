"""`ProgramSpec`: the static half of every sampler program, and the batch sharding constraint.

The programs (`prefill`, `decode`, `scoring`) are module-level `jax.jit` functions whose first
argument is a ProgramSpec, static (hashable, compared by value): JAX's own jit cache keys each
compiled executable on (spec, the other static arguments, argument shapes / dtypes /
shardings), so Samplers over the same architecture and mesh share the compiled programs and a
repeated shape never recompiles.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from catchjax.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class ProgramSpec:
  """graphdef: the model's `nnx.split` graph; cfg: its config; mesh / batch_axes: the mesh
  (Auto axes) and the axes the batch is sharded over, or None for one device; head_axes: the
  mesh axes the KV cache's head axis is sharded over (those of the 'kv_heads' rule, as the k / v
  projections come out), or None."""

  graphdef: Any
  cfg: ModelConfig
  mesh: Mesh | None = None
  batch_axes: str | tuple[str, ...] | None = None
  head_axes: str | tuple[str, ...] | None = None

  def __post_init__(self):
    # Hashed on every call of a jitted program (the jit cache key): hash the graph once.
    object.__setattr__(self, "_hash", hash((self.graphdef, self.cfg, self.mesh,
                                            self.batch_axes, self.head_axes)))

  def __hash__(self):
    return self._hash

  def merge(self, state):
    return nnx.merge(self.graphdef, state)

  def shard(self, x, batch_axis: int = 0, head_axis: int | None = None):
    """Constrain a batch-major array to the batch mesh axes, and its `head_axis` (if any) to
    head_axes (no-op without a mesh)."""
    if self.mesh is None:
      return x
    spec = [None] * x.ndim
    spec[batch_axis] = self.batch_axes
    if head_axis is not None and self.head_axes:
      spec[head_axis] = self.head_axes
    return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, P(*spec)))

  def shard_cache(self, cache):
    """A stacked cache {k: [L, B, KV, ...]}: batch axis 1, heads axis 2."""
    return {k: self.shard(v, 1, 2) for k, v in cache.items()}

  def shard_layer_cache(self, x):
    """One layer's cache buffer [B, KV, ...]: batch axis 0, heads axis 1. Head-sharded like
    the k / v projections, so a tensor mesh never gathers the cache over heads per step."""
    return self.shard(x, 0, 1)


def cache_head_axes(mesh: Mesh | None, rules: dict | None, batch_axes, num_kv_heads: int):
  """The mesh axes of the 'kv_heads' rule (size > 1, not a batch axis) when they divide
  num_kv_heads; else None (the cache's heads stay replicated)."""
  if mesh is None or not rules:
    return None
  batch = {batch_axes} if isinstance(batch_axes, str) else set(batch_axes or ())
  axes = tuple(a for a in rules.get("kv_heads", ()) if a in mesh.axis_names
               and mesh.shape[a] > 1 and a not in batch)
  if not axes or num_kv_heads % math.prod(mesh.shape[a] for a in axes):
    return None
  return axes if len(axes) > 1 else axes[0]


def is_eos(tok_B, eos_E):
  return jnp.any(tok_B[:, None] == eos_E[None, :], axis=-1)
