"""The training step: loss, optimizer and the trained / frozen split of the weights.

* Loss = weighted mean cross-entropy over all loss tokens of the step, the LM head run only
  at the gathered loss positions (`DataPlan.build_rows`); micro-batches of a
  gradient-accumulation scan share the same denominator, so accumulation is exact.
* Optimizer: AdamW (decoupled weight decay, not on norms / biases), warmup then cosine /
  linear / constant decay, global-norm clipping. LoRA (cfg.lora_rank > 0): only LoRAParam
  adapters are trained and have optimizer state; otherwise every nnx.Param is trained.
* What trains and how: the step's `forward.TrainGraph` (`train_graph`: the remat policy and
  the frozen bottom blocks, run forward only) is part of its static spec, applied here in the
  loss, not through the model's config; LoRA adapters (`training_model_config`) are weights,
  so they are part of the model.
* One `jax.jit` with explicit in/out shardings and donated params / optimizer state. Its
  static argument is a frozen, hashable `StepSpec`, so jax.jit's own cache reuses a compiled
  step across train() calls with the same graph, optimizer, schedule length and shapes.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from catchjax import sharding as shd
from catchjax.model import llama
from catchjax.model.forward import INFERENCE, TrainGraph
from catchjax.train.data import (BATCH_DTYPES, DataPlan, batch_tails, loss_slots,
                                 prepare_examples)

log = logging.getLogger("catchjax.train")


# ------------------------------------------------------------------------ optimization
def lr_schedule(cfg, total_steps: int) -> Callable:
  lr, warm, end = float(cfg.lr), int(cfg.warmup_steps), float(cfg.end_lr_ratio)
  decay_steps = max(total_steps - warm, 1)

  def sched(count):
    s = jnp.asarray(count, jnp.float32)
    w = jnp.minimum(1.0, (s + 1.0) / warm) if warm > 0 else 1.0
    t = jnp.clip((s - warm) / decay_steps, 0.0, 1.0)
    if cfg.decay == "cosine":
      d = end + (1.0 - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * t))
    elif cfg.decay == "linear":
      d = 1.0 - (1.0 - end) * t
    else:
      d = 1.0
    return lr * w * d

  return sched


def _decay_mask(params):
  def leaf(path, x):
    name = getattr(path[-1], "key", "")
    return not (str(name).endswith("norm") or name in ("bq", "bk", "bv"))
  return jax.tree_util.tree_map_with_path(leaf, params)


COMPILE_COUNT = {"train_step": 0}   # traces (each one a compile) of the step, this process


def _opt_key(c) -> tuple:
  """Every config field the compiled step (optimizer + schedule) depends on."""
  return tuple((k, c[k]) for k in ("lr", "warmup_steps", "decay", "end_lr_ratio", "b1", "b2",
                                   "eps", "weight_decay", "clip", "lora_rank", "lora_alpha"))


def make_optimizer(cfg, total_steps: int):
  sched = lr_schedule(cfg, total_steps)
  parts = []
  if cfg.clip and cfg.clip > 0:
    parts.append(optax.clip_by_global_norm(float(cfg.clip)))
  parts.append(optax.adamw(sched, b1=float(cfg.b1), b2=float(cfg.b2), eps=float(cfg.eps),
                           weight_decay=float(cfg.weight_decay), mask=_decay_mask))
  return optax.chain(*parts), sched


def _token_ce(m, h_sel, tgt, chunk: int):
  """Per-position cross-entropy of the LM head (`Llama.logits`: float32 accumulation and
  output, also for bf16 compute) on gathered hidden states [b, K, D]."""
  def ce(h, t):
    logits = m.logits(h)
    lse = jax.nn.logsumexp(logits, axis=-1)
    return lse - jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]

  b, K, D = h_sel.shape
  if not chunk or K <= chunk:
    return ce(h_sel, tgt)
  n = -(-K // chunk)
  pad = n * chunk - K
  hp = jnp.pad(h_sel, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, D).swapaxes(0, 1)
  tp = jnp.pad(tgt, ((0, 0), (0, pad))).reshape(b, n, chunk).swapaxes(0, 1)
  f = jax.checkpoint(ce)
  _, out = jax.lax.scan(lambda c, xs: (c, f(*xs)), None, (hp, tp))
  return out.swapaxes(0, 1).reshape(b, n * chunk)[:, :K]


def loss_sum(m: llama.Llama, mb: dict[str, jax.Array], ce_chunk: int = 0,
             graph: TrainGraph = INFERENCE) -> jax.Array:
  """Sum over loss slots of weight x cross-entropy for one (micro-)batch of packed rows, the
  layers run as `graph` says (remat, frozen bottom blocks)."""
  pos, mask = llama.packed_inputs(mb["segs"], window=m.cfg.sliding_window)
  h, _ = m.hidden(mb["tokens"], pos, mask, graph=graph)
  h_sel = jnp.take_along_axis(h, mb["loss_idx"][..., None], axis=1)
  ce = _token_ce(m, h_sel, mb["loss_tgt"], ce_chunk)
  return jnp.sum(ce * mb["loss_w"])


def make_train_step(graphdef, tx, accum: int, ce_chunk: int = 0,
                    graph: TrainGraph = INFERENCE):
  """The pure step (trainable, frozen, opt_state, batch) -> (trainable, opt_state, metrics).

  batch arrays are [accum, rows_per_micro, ...]; see DataPlan.build_rows for the fields.
  """

  def micro_loss(trainable, frozen, mb, denom):
    s = loss_sum(nnx.merge(graphdef, trainable, frozen), mb, ce_chunk, graph)
    return s / denom, s

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

  def step(trainable, frozen, opt_state, batch):
    denom = jnp.maximum(jnp.sum(batch["loss_w"]), 1e-9)
    if accum == 1:
      mb = jax.tree.map(lambda x: x[0], batch)
      (loss, _), grads = grad_fn(trainable, frozen, mb, denom)
    else:
      def body(carry, mb):
        g_acc, l_acc = carry
        (l, _), g = grad_fn(trainable, frozen, mb, denom)
        return (jax.tree.map(jnp.add, g_acc, g), l_acc + l), None
      zeros = jax.tree.map(jnp.zeros_like, trainable)
      (grads, loss), _ = jax.lax.scan(body, (zeros, jnp.zeros((), jnp.float32)), batch)
    gnorm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    return trainable, opt_state, {"loss": loss, "grad_norm": gnorm}

  return step


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """All the compiled step depends on besides its arguments' shapes and dtypes: the static
  (hashable) argument of `_train_step`, so jax.jit's own cache reuses a compiled step across
  train() calls with the same graph, optimizer, schedule length and shapes."""
  graphdef: Any
  opt: tuple                     # _opt_key(c)
  total_steps: int               # the LR schedule's length
  accum: int
  ce_chunk: int
  graph: TrainGraph              # remat policy and frozen blocks (train_graph)
  shardings: tuple               # (treedef, leaves) of (in shardings, out shardings)

  def trace(self, *args):
    """`_train_step` traced on (trainable, frozen, opt_state, batch): arrays, or
    ShapeDtypeStructs, which get the step's input shardings (catchjax.plan)."""
    in_sh = jax.tree.unflatten(*self.shardings)[0]
    args = jax.tree.map(lambda x, s: x if isinstance(x, jax.Array) else
                        jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), args, in_sh)
    return _train_step.trace(self, *args)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=(1, 3))
def _train_step(spec: StepSpec, trainable, frozen, opt_state, batch):
  """`make_train_step` for `spec`, its inputs and outputs held to the spec's shardings."""
  COMPILE_COUNT["train_step"] += 1     # the body runs once per trace
  in_sh, out_sh = jax.tree.unflatten(*spec.shardings)
  args = jax.lax.with_sharding_constraint((trainable, frozen, opt_state, batch), in_sh)
  tx, _ = make_optimizer(ml_collections.ConfigDict(dict(spec.opt)), spec.total_steps)
  out = make_train_step(spec.graphdef, tx, spec.accum, spec.ce_chunk, spec.graph)(*args)
  return jax.lax.with_sharding_constraint(out, out_sh)


# ------------------------------------------------------------------------------ model
def train_graph(mc, cfg) -> TrainGraph:
  """The step's remat policy and frozen bottom blocks under train config `cfg`, for a model of
  config `mc`."""
  if cfg.freeze_layers > mc.num_layers:
    raise ValueError(f"freeze_layers={cfg.freeze_layers} > the model's {mc.num_layers} layers.")
  return TrainGraph(remat=str(cfg.remat), frozen_layers=int(cfg.freeze_layers))


def training_model_config(mc, cfg):
  """The ModelConfig of the trained model for a model of config `mc` under train config
  `cfg`: `mc`, with adapters of cfg.lora_rank for LoRA runs. Shared by `prepare_model` (real
  weights) and `catchjax.plan` (abstract ones)."""
  if cfg.lora_rank > 0:
    if mc.lora_rank == 0:
      return mc.replace(lora_rank=int(cfg.lora_rank), lora_alpha=float(cfg.lora_alpha))
    if mc.lora_rank != cfg.lora_rank:
      raise ValueError(f"model has LoRA rank {mc.lora_rank}, config asks for {cfg.lora_rank}.")
  return mc


def prepare_model(model: llama.Llama, cfg) -> llama.Llama:
  """A new Llama (own param buffers) and, for LoRA runs, adapters of cfg.lora_rank (fresh,
  lora_b = 0) unless the model already has them."""
  from catchjax.model import hf
  mc = model.cfg
  want = training_model_config(mc, cfg)
  if want.lora_rank != mc.lora_rank:
    pure = nnx.to_pure_dict(nnx.state(model))
    return hf.model_from_pure_dict(want, pure, seed=int(cfg.seed))
  if cfg.lora_rank == 0 and mc.lora_rank > 0:
    log.warning("lora_rank=0 on a model with LoRA adapters: full fine-tune of all params, "
                "adapters included.")
  graphdef, state = nnx.split(model)
  return nnx.merge(graphdef, state)


def split_trainable(model: llama.Llama, cfg):
  """(graphdef, trainable pure dict, frozen pure dict) of a prepared model: LoRAParam adapters
  are trained for LoRA runs, every nnx.Param otherwise. Works on an abstract model
  (nnx.eval_shape) too, whose leaves are then ShapeDtypeStructs."""
  filt = llama.LoRAParam if cfg.lora_rank > 0 else nnx.Param
  graphdef, tr_state, fr_state = nnx.split(model, filt, ...)
  trainable = to_master(nnx.to_pure_dict(tr_state), cfg)
  return graphdef, trainable, nnx.to_pure_dict(fr_state)


def to_master(trainable, cfg):
  """The trained weights in cfg.master_dtype (floating leaves; 'param': unchanged). The
  optimizer state follows them (tx.init), so bf16 models train with fp32 master weights and
  AdamW moments; the forward casts every weight to the compute dtype at use."""
  md = cfg.get("master_dtype", "param") if hasattr(cfg, "get") else "param"
  if md == "param":
    return trainable
  want = jnp.dtype(md)

  def cast(x):
    if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == want:
      return x
    if isinstance(x, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(x.shape, want, sharding=x.sharding)
    return x.astype(want)
  return jax.tree.map(cast, trainable)


def from_master(trainable, mcfg):
  """The trained weights back in the model's own param_dtype (floating leaves)."""
  want = jnp.dtype(mcfg.param_dtype)
  return jax.tree.map(lambda x: x.astype(want) if jnp.issubdtype(x.dtype, jnp.floating)
                      and x.dtype != want else x, trainable)


# ------------------------------------------------------------------------------ setup
@dataclasses.dataclass
class StepSetup:
  """The compiled step's construction, shared by `train` and `catchjax.plan.compile_plan`:
  shardings from the config's rules, the optimizer and the jitted step with its in/out
  shardings and donation (params and optimizer state)."""
  tx: Any
  sched: Callable
  tr_sh: Any                     # NamedSharding pytrees of the trainable / frozen params
  fr_sh: Any
  opt_abs: Any                   # abstract optimizer state
  opt_sh: Any
  batch_tails: dict              # field -> per-row shape: tokens/segs (T,), loss_* (K,)
  b_sh: dict                     # field -> NamedSharding of the [A, micro, ...] batch array
  step_fn: StepSpec              # the jitted `_train_step`'s static spec (.trace for plans)
  micro_rows: int                # rows per micro-batch, padding included (sharding.padded_micro)

  def abstract_batch(self, c) -> dict:
    """The step's batch as ShapeDtypeStructs [grad_accum, rows per micro-batch, ...]."""
    A = int(c.grad_accum)
    micro = self.micro_rows
    return {k: jax.ShapeDtypeStruct((A, micro) + tail, BATCH_DTYPES[k], sharding=self.b_sh[k])
            for k, tail in self.batch_tails.items()}


def step_setup(graphdef, trainable, frozen, c, mesh, rules, total_steps: int,
               K: int, graph: TrainGraph = INFERENCE) -> StepSetup:
  """`trainable` / `frozen`: pure dicts of arrays or ShapeDtypeStructs (`split_trainable`);
  c: a merged train config; K: loss slots per row; graph: `train_graph(model cfg, c)`."""
  tr_sh = shd.state_shardings(trainable, mesh, rules)
  fr_sh = shd.state_shardings(frozen, mesh, rules)
  tx, sched = make_optimizer(c, total_steps)
  opt_abs = jax.eval_shape(tx.init, trainable)
  opt_sh = shd.state_shardings(opt_abs, mesh, rules)
  tails = batch_tails(c.seq_len, K)
  b_sh = {k: shd.batch_sharding(mesh, rules, ndim=3, batch_dim=1) for k in tails}
  repl = NamedSharding(mesh, P())
  leaves, treedef = jax.tree.flatten(((tr_sh, fr_sh, opt_sh, b_sh), (tr_sh, opt_sh, repl)))
  spec = StepSpec(graphdef, _opt_key(c), int(total_steps), int(c.grad_accum), int(c.ce_chunk),
                  graph, (treedef, tuple(leaves)))
  micro = shd.padded_micro(int(c.batch_size), int(c.grad_accum), mesh, rules)
  return StepSetup(tx, sched, tr_sh, fr_sh, opt_abs, opt_sh, tails, b_sh, spec, micro)


# ------------------------------------------------------------------------------- eval
@functools.partial(jax.jit, static_argnums=(0,))
def _eval_sums(graphdef, state, batch):
  m = nnx.merge(graphdef, state)
  return loss_sum(m, batch), jnp.sum(batch["loss_w"])


def eval_loss(model: llama.Llama, dataset, *, seq_len: int, batch_size: int = 8,
              pack: bool = True, too_long: str = "drop", share_prefix: bool = False) -> float:
  """Mean (weighted) cross-entropy over the loss tokens of `dataset`, computed exactly as the
  training loss (same packing, masking and gathered LM head), without shuffling effects."""
  ex = prepare_examples(dataset, seq_len, too_long, model.cfg.vocab_size)
  plan = DataPlan(ex, seq_len, batch_size, seed=0, pack=pack, steps=0, epochs=1,
                  share_prefix=share_prefix)
  K = loss_slots(plan, seq_len)
  graphdef, state = nnx.split(model)
  tot = cnt = 0.0
  for step in range(plan.total_steps):
    b = plan.build_rows(plan.batch_rows(step), K)
    s, n = _eval_sums(graphdef, state, {k: jnp.asarray(v) for k, v in b.items()})
    tot, cnt = tot + float(s), cnt + float(n)
  return tot / cnt
