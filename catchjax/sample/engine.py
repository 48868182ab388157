"""The device side of a Sampler: where the weights and batches live, and program calls.

With a mesh, every batch-major array (tokens, cache, outputs) is sharded over the mesh's batch
axes ('data', and 'fsdp' when the mesh has it) with `NamedSharding`, and the weights by the
logical-axis `rules` (`sharding.state_shardings`, the rules training uses). With mesh=None
everything lives on the default device, in one canonical placement.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from catchjax import sharding
from catchjax.sample import compiles
from catchjax.sample.spec import ProgramSpec


def auto_mesh(mesh: Mesh) -> Mesh:
  """The same mesh with Auto axes (with_sharding_constraint needs Auto axes)."""
  types = getattr(mesh, "axis_types", None)
  if types and any(t != AxisType.Auto for t in types):
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(types))
  return mesh


def batch_mesh(mesh: Mesh, batch_axes: Sequence[str], batch_size: int):
  """(mesh with Auto axes, the batch axes present in it: one name or a tuple); ValueError
  when the mesh has no 'data' axis, none of batch_axes, or they do not divide batch_size."""
  if "data" not in mesh.axis_names:
    raise ValueError(f"mesh needs an axis named 'data', has {mesh.axis_names}")
  mesh = auto_mesh(mesh)
  axes = tuple(a for a in batch_axes if a in mesh.axis_names)
  if not axes:
    raise ValueError(f"none of batch_axes {tuple(batch_axes)} is in mesh {mesh.axis_names}")
  n = int(np.prod([mesh.shape[a] for a in axes]))
  if batch_size % n:
    raise ValueError(f"batch_size {batch_size} is not divisible by the batch mesh axes "
                     f"{axes} (size {n})")
  return mesh, (axes if len(axes) > 1 else axes[0])


class Engine:
  """A ProgramSpec, the weights placed for it (`state`), and `run`, which calls a program and
  keeps `compile_seconds` {shape key: seconds this Engine spent compiling it (0.0: JAX's jit
  cache already held it)}."""

  def __init__(self, spec: ProgramSpec, state, rules=None):
    self.spec = spec
    self.rules = rules
    self.state = self.place(state)
    self.compile_seconds: dict[tuple, float] = {}

  def place(self, state):
    mesh = self.spec.mesh
    if mesh is None:
      # One canonical placement: weights fresh from the training loop carry a NamedSharding
      # over a 1-device mesh, loaded ones a single-device sharding; without this the same
      # program compiled twice (a recompile per headline cell's first measurement).
      dev = jax.devices()[0]

      def canon(x):
        s = getattr(x, "sharding", None)
        return x if isinstance(s, SingleDeviceSharding) else jax.device_put(x, dev)
      return jax.tree.map(canon, state)

    # The weights by the same logical rules as training (FSDP over 'embed', tensor parallelism
    # over heads / mlp / vocab); weights already placed so are kept as they are.
    want = sharding.state_shardings(state, mesh, self.rules)
    return jax.tree.map(lambda x, s: x if getattr(x, "sharding", None) == s
                        else sharding.shard_state(x, s), state, want)

  def put(self, x: np.ndarray):
    """A batch-major host array on the device(s): sharded over the batch axes."""
    if self.spec.mesh is None:
      return jnp.asarray(x)
    return jax.device_put(x, NamedSharding(self.spec.mesh, P(self.spec.batch_axes)))

  def run(self, name: str, key: tuple, fn, *args, **static):
    """fn(spec, *args, **static), compiled by JAX once per static arguments and argument
    shapes; the compile (if any) is recorded (`compiles.call`) under `key`."""
    out, secs = compiles.call(name, fn, self.spec, *args, **static)
    self.compile_seconds[key] = self.compile_seconds.get(key, 0.0) + secs
    return out
