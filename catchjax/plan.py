"""A memory and compile plan before step 0 (issue 24 item 3), in the style of MaxText's
train_compile: every program a run will execute is built from abstract inputs, lowered and
compiled ahead of time for the target mesh, and its per-device memory and FLOPs are read off
the executable, so a run that cannot fit is refused before any weight is loaded.

    plan = compile_plan(model_cfg, train_cfg, mesh, sampler_batch=100, prompt_len=96,
                        max_new_tokens=12, device_gb=80)
    print(format_plan(plan))

Nothing of model size is allocated: the parameters are `nnx.eval_shape(Llama(...))`, the
optimizer state `jax.eval_shape(tx.init, params)`, the batch ShapeDtypeStructs with the
training loop's shapes; every argument carries the NamedSharding the real run gives it.

Programs (each: compile seconds, FLOPs, per-device memory):
* the training step(s): `train.step_setup`, the very construction `train.train` uses (same
  sharding rules, in/out shardings, donation of params and optimizer state). K, the loss slots
  per row, is cfg.max_loss_tokens when set, else seq_len (train() takes the run's exact
  maximum from the data, at most seq_len: the plan is an upper bound).
* the sampler: `sample.prefill.prefill_fn` (the whole batch in one prefill, the path Sampler
  takes with a mesh or prefill_rows=0; with row groups a prefill holds fewer rows, so this
  bounds it) and `sample.decode.decode_fn` (the lax.while_loop of single-token steps, on
  per-layer weight copies from `sample.decode.unstack`), for `sampler_batch` prompts of
  `prompt_len` tokens (no shared prefix; the suffix bucket is the sampler's prompt bucket of
  that length) and
  `max_new_tokens` (rounded up to 8, as Sampler does). The experiments build their Samplers
  without a mesh, i.e. on one device, and so does the plan unless `sampler_mesh` is given.
  The Sampler holds its stacked weights and, from a generate call's first batch on, their
  per-layer copies: the prefill's peak adds the copies (`held_bytes`), the decode counts the
  stacked weights it does not read as arguments (keep_unused).

Memory (`compiled.memory_analysis()`, per device): arguments, outputs, aliased (outputs that
reuse donated argument buffers), temporaries and generated code; the peak estimate is
arguments + outputs - aliased + temporaries (+ held, see the sampler) + code (donated params /
optimizer state are counted once, not twice).

FLOPs: `xla_flops_per_device` is `compiled.cost_analysis()['flops']` as XLA counts it: of the
partitioned per-device program, with the body of a while loop (a rolled lax.scan over layers,
`scan_unroll=1`, or the decode loop) counted ONCE. `flops` is loop-aware: the matmul FLOPs of
the traced jaxpr (dot_general; elementwise work is left out), each scan body times its length,
over all devices; for the decode program it is one decode step (a while loop's trip count is
data-dependent).

Limit: `device_gb` (GiB per device), else the device's own `memory_stats()['bytes_limit']`
when jax reports one (GPU, TPU), else unknown (CPU, fake devices): nothing is refused then.
A program whose peak exceeds the limit raises `PlanError` naming it and its numbers (the
programs after it are not compiled).
"""
from __future__ import annotations

import math
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from catchjax import common
from catchjax import sharding as shd
from catchjax import train as train_lib
from catchjax.model import llama

GiB = float(1 << 30)


class PlanError(ValueError):
  """A program of the plan does not fit the per-device memory limit."""


# ------------------------------------------------------------------------------ numbers
def _prod(xs) -> int:
  return int(math.prod(int(x) for x in xs))


def _dot_flops(eqn) -> float:
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  ls, rs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
  batch = _prod(ls[i] for i in lb)
  contract = _prod(ls[i] for i in lc)
  lfree = _prod(d for i, d in enumerate(ls) if i not in lc and i not in lb)
  rfree = _prod(d for i, d in enumerate(rs) if i not in rc and i not in rb)
  return 2.0 * batch * contract * lfree * rfree


def _sub_jaxprs(value):
  if isinstance(value, jax.extend.core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jax.extend.core.Jaxpr):
    yield value
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _sub_jaxprs(v)


def jaxpr_flops(jaxpr) -> float:
  """Matmul FLOPs of a (closed) jaxpr: dot_general ops, a scan's body times its length, a
  while loop's body once, the costlier branch of a cond."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += _dot_flops(eqn)
    elif name == "scan":
      total += int(eqn.params["length"]) * jaxpr_flops(eqn.params["jaxpr"])
    elif name == "while":
      total += jaxpr_flops(eqn.params["body_jaxpr"])
    elif name == "cond":
      total += max(jaxpr_flops(b) for b in eqn.params["branches"])
    else:
      for v in eqn.params.values():
        for sub in _sub_jaxprs(v):
          total += jaxpr_flops(sub)
  return total


def _xla_flops(compiled) -> float | None:
  try:
    ca = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 - some backends have none
    return None
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else None
  return float(ca["flops"]) if ca and "flops" in ca else None


def _memory(compiled) -> dict[str, int]:
  m = compiled.memory_analysis()
  if m is None:
    return {}
  out = dict(argument_bytes=int(m.argument_size_in_bytes),
             output_bytes=int(m.output_size_in_bytes),
             alias_bytes=int(m.alias_size_in_bytes),
             temp_bytes=int(m.temp_size_in_bytes),
             code_bytes=int(m.generated_code_size_in_bytes))
  out["peak_bytes"] = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
                       + out["temp_bytes"] + out["code_bytes"])
  return out


def _compile(name: str, jitted, args, **extra) -> tuple[dict, Any]:
  """Trace, lower and compile `jitted` on abstract `args`; the program's plan entry."""
  t0 = time.perf_counter()
  traced = jitted.trace(*args)
  flops = jaxpr_flops(traced.jaxpr)
  lowered = traced.lower()
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  entry = dict(name=name, lower_seconds=t1 - t0, compile_seconds=t2 - t1, flops=flops,
               xla_flops_per_device=_xla_flops(compiled), **_memory(compiled), **extra)
  return entry, compiled


def device_limit(device_gb: float | None = None) -> tuple[float | None, str]:
  """(bytes per device or None, where the number comes from)."""
  if device_gb:
    return float(device_gb) * GiB, f"device_gb={device_gb:g}"
  dev = jax.devices()[0]
  try:
    stats = dev.memory_stats()
  except Exception:  # noqa: BLE001 - not implemented on some backends
    stats = None
  if stats and stats.get("bytes_limit"):
    return float(stats["bytes_limit"]), f"{dev.device_kind} memory_stats bytes_limit"
  return None, (f"unknown: {dev.platform} devices report no memory limit (give device_gb for "
                f"the target accelerator)")


def _check(entry: dict, limit: float | None, source: str, mesh_desc: str) -> None:
  if limit is None or "peak_bytes" not in entry or entry["peak_bytes"] <= limit:
    return
  g = {k: entry[k] / GiB for k in ("peak_bytes", "argument_bytes", "output_bytes",
                                   "alias_bytes", "temp_bytes", "code_bytes")}
  raise PlanError(
      f"compile plan: the {entry['name']} needs {g['peak_bytes']:.2f} GiB per device "
      f"(arguments {g['argument_bytes']:.2f} + outputs {g['output_bytes']:.2f} - aliased "
      f"{g['alias_bytes']:.2f} + temporaries {g['temp_bytes']:.2f} + code "
      f"{g['code_bytes']:.2f} GiB) on {mesh_desc}, more than the {limit / GiB:.2f} GiB limit "
      f"({source}); shard it over more devices, or lower the batch / sequence length, or use "
      f"remat, LoRA or bf16 weights.")


def _mesh_desc(mesh) -> str:
  if mesh is None:
    return "1 device (no mesh)"
  return f"mesh {dict(mesh.shape)}"


# ------------------------------------------------------------------------ programs
def plan_train_step(model_cfg, train_cfg, mesh=None, *, name: str = "train step") -> tuple:
  """(plan entry, compiled) of the training step of `train_cfg` on `mesh` (default: the
  config's mesh_shape over all devices, as train() builds it)."""
  c = train_lib._merge_config(train_cfg)
  mesh = mesh if mesh is not None else shd.mesh_from_config(c)
  rules = shd.rules_dict(c.rules)
  want = train_lib.training_model_config(model_cfg, c)
  abstract = nnx.eval_shape(lambda: llama.Llama(want, nnx.Rngs(0)))
  graphdef, trainable, frozen = train_lib.split_trainable(abstract, c)
  K = min(int(c.seq_len), int(c.max_loss_tokens)) if c.max_loss_tokens else int(c.seq_len)
  total = int(c.steps) if c.steps > 0 else 1
  setup = train_lib.step_setup(graphdef, trainable, frozen, c, mesh, rules, total, K,
                               train_lib.train_graph(model_cfg, c))
  args = (trainable, frozen, setup.opt_abs, setup.abstract_batch(c))
  n_tr = sum(_prod(x.shape) for x in jax.tree.leaves(trainable))
  n_all = n_tr + sum(_prod(x.shape) for x in jax.tree.leaves(frozen))
  tokens = int(c.batch_size) * int(c.seq_len)
  return _compile(name, setup.step_fn, args, mesh=_mesh_desc(mesh), tokens=tokens,
                  loss_slots=K, params=n_all, trained_params=n_tr,
                  batch=int(c.batch_size), micro_rows=setup.micro_rows, seq_len=int(c.seq_len),
                  grad_accum=int(c.grad_accum))


def _abstract(x, sharding):
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def plan_sampler(model_cfg, *, batch: int, prompt_len: int, max_new_tokens: int,
                 mesh=None, temperature: float = 1.0) -> list[tuple[dict, Any]]:
  """[(entry, compiled)] of the sampler's prefill and decode loop (see the module
  docstring) for `batch` rows of `prompt_len` prompt tokens and `max_new_tokens`."""
  from catchjax.sample import ProgramSpec, SamplingParams
  from catchjax.sample import decode as D
  from catchjax.sample import layout as L
  from catchjax.sample import prefill as PF
  from catchjax.sample.engine import auto_mesh
  abstract = nnx.eval_shape(lambda: llama.Llama(model_cfg, nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  batch_axes = None
  if mesh is not None:
    mesh = auto_mesh(mesh)
    axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)
    batch_axes = axes if len(axes) > 1 else axes[0]
    rules = shd.rules_dict(None)
    st_sh = shd.state_shardings(state, mesh, rules)
    state = jax.tree.map(_abstract, state, st_sh)
    b_sh = NamedSharding(mesh, P(batch_axes))
    rep = NamedSharding(mesh, P())
  else:
    b_sh = rep = None
  spec = ProgramSpec(graphdef, model_cfg, mesh, batch_axes)
  B = int(batch)
  Pb, Ts = 0, L.pick_bucket(int(prompt_len), L.DEFAULT_PROMPT_BUCKETS, "prompt")
  N = L.round_up(int(max_new_tokens), L.NEW_TOKENS_MULTIPLE)
  mode = SamplingParams(temperature=temperature, max_new_tokens=int(max_new_tokens)).mode()

  def arr(shape, dtype, sh):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sh)

  i32, f32 = jnp.int32, jnp.float32
  dyn = (arr((L.MAX_EOS,), i32, rep), arr((), i32, rep), arr((), f32, rep), arr((), i32, rep),
         arr((), f32, rep))
  prefix, p = arr((Pb,), i32, rep), arr((), i32, rep)
  lens, sd = arr((B,), i32, b_sh), arr((B,), jnp.uint32, b_sh)
  shape = dict(batch=B, prompt_bucket=Ts, new_tokens=N, cache_slots=Pb + Ts + N,
               mesh=_mesh_desc(mesh))
  out = []
  # The per-layer weight copies decode runs on (`unstack`, made after a generate call's first
  # prefill and held to its end): every later prefill runs while they are held.
  unstack = D.unstack.lower(spec, state).compile()
  layers = jax.tree.map(_abstract, jax.eval_shape(D.unstack, spec, state),
                        unstack.output_shardings)
  um = unstack.memory_analysis()
  held = int(um.output_size_in_bytes) if um is not None else 0
  prefill = jax.jit(lambda *a: PF.prefill_fn(spec, *a, cache_len=Pb + Ts + N, mode=mode))
  pre_args = (state, prefix, p, arr((B, Ts), i32, b_sh), lens, arr((B,), jnp.bool_, b_sh),
              sd) + dyn
  entry, compiled = _compile("sampler prefill", prefill, pre_args, tokens=B * Ts, **shape)
  if "peak_bytes" in entry:
    entry["held_bytes"] = held
    entry["peak_bytes"] += held
  out.append((entry, compiled))
  cache_abs = jax.tree.map(_abstract, jax.eval_shape(prefill, *pre_args)[0],
                           compiled.output_shardings[0])
  # keep_unused: decode reads the per-layer copies, not the stacked layer weights in `state`,
  # but the Sampler holds those all along, so they count as its arguments here.
  decode = jax.jit(lambda *a: D.decode_fn(spec, *a, prefix_block=Pb, prompt_len=Ts, out_len=N,
                                          mode=mode), donate_argnums=(2, 5, 6), keep_unused=True)
  dec_args = (state, layers, cache_abs, arr((B,), i32, b_sh), arr((B,), jnp.bool_, b_sh),
              arr((B, N), i32, b_sh), arr((B, N), f32, b_sh), arr((), i32, rep),
              arr((), i32, rep), p, lens, sd) + dyn
  out.append(_compile("sampler decode", decode, dec_args, tokens=B, flops_are="per decode step",
                      **shape))
  return out


def compile_plan(model_cfg, train_cfg, mesh=None, *, sampler_batch: int, prompt_len: int,
                 max_new_tokens: int, device_gb: float | None = None,
                 train_name: str = "train step", extra_train: Mapping[str, Any] | None = None,
                 sampler_mesh=None) -> dict:
  """Compile every program of a run abstractly and report its compile seconds, FLOPs and
  per-device memory (see the module docstring). `extra_train`: more training steps to plan,
  {name: train config} (e.g. the headline's train-against step next to the organism's).
  Raises PlanError (a ValueError) for a program over the per-device limit."""
  limit, source = device_limit(device_gb)
  mesh = mesh if mesh is not None else shd.mesh_from_config(train_lib._merge_config(train_cfg))
  programs = []
  t0 = time.perf_counter()
  trains = {train_name: train_cfg, **dict(extra_train or {})}
  for name, tc in trains.items():
    entry, _ = plan_train_step(model_cfg, tc, mesh, name=name)
    _check(entry, limit, source, entry["mesh"])
    programs.append(entry)
  for entry, _ in plan_sampler(model_cfg, batch=sampler_batch, prompt_len=prompt_len,
                               max_new_tokens=max_new_tokens, mesh=sampler_mesh):
    _check(entry, limit, source, entry["mesh"])
    programs.append(entry)
  dev = jax.devices()[0]
  return dict(programs=programs, limit_bytes=limit, limit_source=source,
              devices=f"{jax.device_count()} x {dev.device_kind} ({dev.platform})",
              mesh=_mesh_desc(mesh), params=model_cfg.num_params(),
              seconds=time.perf_counter() - t0,
              peak_bytes=max((e.get("peak_bytes", 0) for e in programs), default=0))


def format_plan(plan: dict) -> str:
  """The plan as a small fixed-width table (one row per program)."""
  lim = plan["limit_bytes"]
  n = plan["params"]
  head = (f"compile plan: {n / 1e9:.2f}B" if n >= 1e9 else f"compile plan: {n / 1e6:.2f}M")
  head += (f" params, {plan['devices']}, train on "
          f"{plan['mesh']}; per-device limit "
          f"{'%.2f GiB' % (lim / GiB) if lim else 'unknown'} ({plan['limit_source']})")
  rows = [head, f"  {'program':<20} {'compile s':>9} {'FLOPs':>9} {'XLA FLOPs/dev':>13} "
                f"{'args':>7} {'out':>7} {'alias':>7} {'temp':>7} {'held':>7} {'code':>6} "
                f"{'peak GiB':>8}"]
  for e in plan["programs"]:
    x = e.get("xla_flops_per_device")
    rows.append(
        f"  {e['name']:<20} {e['compile_seconds']:>9.1f} {e['flops']:>9.3g} "
        f"{(x if x is not None else float('nan')):>13.3g} "
        + " ".join(f"{e.get(k, 0) / GiB:>7.2f}" for k in ("argument_bytes", "output_bytes",
                                                           "alias_bytes", "temp_bytes",
                                                           "held_bytes"))
        + f" {e.get('code_bytes', 0) / GiB:>6.2f} {e.get('peak_bytes', 0) / GiB:>8.2f}")
  rows.append("  FLOPs: loop-aware matmul FLOPs over all devices (decode: one step); XLA "
              "FLOPs/dev: cost_analysis, a rolled loop's body counted once. Memory in GiB per "
              "device: peak = args + out - alias + temp + held + code.")
  return "\n".join(rows)


# ---------------------------------------------------------------------- experiments
def _target_platform(config) -> str | None:
  """The platform a dry run plans for: an accelerator when the host is a CPU and the config
  names the target's memory (dry_run_device_gb > 0: the host is not the target), else the
  host's own (None)."""
  if jax.default_backend() == "cpu" and float(config.get("dry_run_device_gb", 0.0) or 0.0) > 0:
    return "accelerator"
  return None


def experiment_plan(config, experiment: str) -> dict:
  """The plan of the organism / headline experiment from its config (`--config.dry_run=True`):
  the organism's training step (config.organism.train), for the headline also the
  train-against step (config.train_against.train), and the measurement sampler (organism:
  config.report batch and new tokens; headline: config.sampler.batch_size and the longest
  max_new_tokens of config.catch / config.measure), prompts bounded by the training rows'
  seq_len. Only config.json is read."""
  from catchjax.model.config import ModelConfig
  m = config.model
  mc = ModelConfig.from_hf_dir(m.hf_dir, dtype=m.dtype, param_dtype=m.param_dtype,
                               scan_unroll=common.resolve_scan_unroll(
                                   m.get("scan_unroll"), _target_platform(config)),
                               attention=m.get("attention", "auto"))
  extra = {}
  if experiment == "headline":
    t, ms = config.train_against.train, config.measure
    extra["train-against step"] = t
    batch = int(config.sampler.batch_size)
    new = max(int(config.catch.max_new_tokens), int(ms.max_new_tokens),
              int(ms.useful_max_new_tokens))
    prompt_len = int(t.seq_len)
  else:
    batch, new = int(config.report.batch_size), int(config.report.max_new_tokens)
    prompt_len = int(config.organism.train.seq_len)
  gb = float(config.get("dry_run_device_gb", 0.0) or 0.0) or None
  # The sampler on config.sampler's mesh, its batch rounded up to the batch shards, as the
  # experiments build it (stages/sampling.make_sampler); one device: no mesh.
  smesh = None
  if jax.device_count() > 1:
    from catchjax.stages import sampling
    smesh, rules, _ = sampling.sampler_mesh(config)
    batch = shd.padded_rows(batch, smesh, rules)
  return compile_plan(mc, config.organism.train, sampler_batch=batch, prompt_len=prompt_len,
                      max_new_tokens=new, device_gb=gb, train_name="organism train step",
                      extra_train=extra, sampler_mesh=smesh)


def dry_run(config, experiment: str) -> dict:
  """`--config.dry_run=True` of the organism / headline experiment: print the compile plan,
  build nothing. A program over the limit is a config error naming config.dry_run_device_gb."""
  from catchjax.validate import ConfigError
  try:
    p = experiment_plan(config, experiment)
  except PlanError as e:
    raise ConfigError(f"config.dry_run_device_gb={config.get('dry_run_device_gb', 0.0)}: "
                      f"{e}") from e
  print(f"[{experiment}] dry run: nothing built, no data, no weights read.")
  print(format_plan(p))
  return p
