"""`ProgramSpec`: the static half of every sampler program, and the batch sharding constraint.

The programs (`prefill`, `decode`, `scoring`) are module-level `jax.jit` functions whose first
argument is a ProgramSpec, static (hashable, compared by value): JAX's own jit cache keys each
compiled executable on (spec, the other static arguments, argument shapes / dtypes /
shardings), so Samplers over the same architecture and mesh share the compiled programs and a
repeated shape never recompiles.
"""
from __future__ import annotations

import dataclasses
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
  (Auto axes) and the axes the batch is sharded over, or None for one device."""

  graphdef: Any
  cfg: ModelConfig
  mesh: Mesh | None = None
  batch_axes: str | tuple[str, ...] | None = None

  def __post_init__(self):
    # Hashed on every call of a jitted program (the jit cache key): hash the graph once.
    object.__setattr__(self, "_hash", hash((self.graphdef, self.cfg, self.mesh,
                                            self.batch_axes)))

  def __hash__(self):
    return self._hash

  def merge(self, state):
    return nnx.merge(self.graphdef, state)

  def shard(self, x, batch_axis: int = 0):
    """Constrain a batch-major array to the batch mesh axes (no-op without a mesh)."""
    if self.mesh is None:
      return x
    spec = [None] * x.ndim
    spec[batch_axis] = self.batch_axes
    return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, P(*spec)))

  def shard_cache(self, cache):
    """A stacked cache {k: [L, B, ...]}: batch axis 1."""
    return {k: self.shard(v, 1) for k, v in cache.items()}


def is_eos(tok_B, eos_E):
  return jnp.any(tok_B[:, None] == eos_E[None, :], axis=-1)
