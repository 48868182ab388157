"""The one way experiments and stages build a `Sampler`: on the mesh of `config.sampler`.

`make_sampler(config, model, batch_size, **kw)` builds the mesh from `config.sampler`
(`mesh_shape`, default (1, -1, 1): every device on 'fsdp', like training; `rules`, default
`sharding.DEFAULT_RULES`), shards the weights by the same logical rules as training
(`sharding.state_shardings`, in `sample.engine.Engine.place`) and the batch over the rules'
'batch' axes. On one device it builds the plain single-device Sampler (no mesh), so 1-device
runs are unchanged.

The batch: every compiled batch must split evenly over the batch-sharded devices, so
`batch_size` is rounded up to a multiple of them; the Sampler already fills a batch that is
short of prompts with inactive dummy rows, and a row's outputs do not depend on the batch it
is in, so any configured batch size works on any mesh (with up to nb - 1 dummy rows per batch).
"""
from __future__ import annotations

from catchjax import sharding
from catchjax.sample import Sampler

DEFAULT_MESH_SHAPE = (1, -1, 1)      # ('data', 'fsdp', 'tensor'); -1 = all remaining devices


def sampler_section(config) -> dict:
  """{mesh_shape, rules} of `config.sampler`, defaults for fields (or a section) it lacks;
  config may be None (the defaults)."""
  s = None if config is None else config.get("sampler")
  s = {} if s is None else s
  get = s.get if hasattr(s, "get") else lambda k, d=None: getattr(s, k, d)
  shape = get("mesh_shape", None)
  rules = get("rules", None)
  return dict(mesh_shape=tuple(DEFAULT_MESH_SHAPE if shape is None else shape),
              rules=sharding.DEFAULT_RULES if rules is None else rules)


def sampler_mesh(config):
  """(mesh over all devices, rules dict, batch axes) of `config.sampler`; raises ValueError
  when the mesh cannot be built on these devices or the rules put the batch on no mesh axis."""
  s = sampler_section(config)
  mesh = sharding.make_mesh(s["mesh_shape"])
  rules = sharding.rules_dict(s["rules"])
  axes = tuple(a for a in rules.get("batch", ()) if a in mesh.axis_names)
  if not axes:
    raise ValueError(f"rules map 'batch' to {rules.get('batch', ())!r}, none of the mesh axes "
                     f"{tuple(mesh.axis_names)}; map it to e.g. ('data', 'fsdp')")
  return mesh, rules, axes


def make_sampler(config, model, batch_size: int = 64, **kw) -> Sampler:
  """A Sampler for `model` on `config.sampler`'s mesh (see the module docstring); kw go to
  Sampler (prompt_buckets, progress, eos_ids, ...). batch_size is rounded up to a multiple of
  the batch-sharded devices."""
  mesh, rules, axes = sampler_mesh(config)
  if mesh.size == 1:
    return Sampler(model, batch_size=batch_size, **kw)
  padded = sharding.padded_rows(batch_size, mesh, rules)
  return Sampler(model, batch_size=padded, mesh=mesh, batch_axes=axes, rules=rules, **kw)
