"""Direct preference optimisation (DPO, Rafailov et al. 2023): the `dpo` arm's objective.

    result = train_dpo(model, tok, pairs, cfg, beta)

pairs: {prompt, system, target (chosen), rejected} rows. The loss of a pair is
    -log sigmoid(beta * ((logp(chosen) - logp_ref(chosen)) - (logp(rejected) - logp_ref(rejected))))
with logp the summed token log-probs of a response given its prompt (the chosen response ends
in EOS; the rejected one is the sample as drawn, cut at max_new_tokens, without one). The
reference is the input model, frozen: its log-probs are computed once, before training.
Optimizer and schedule (train.make_optimizer), batch size (pairs per step), trainable params
(full or LoRA) and length (`steps`, else `epochs` over the pairs, a seeded order per epoch)
are train.train's config fields, so a DPO arm runs the SFT arms' budget. No packing, no
checkpoints (the arms' runs are short), no mesh (params stay where they are). Returns a
train.TrainResult (evals [], stopped False).
"""
from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from catchjax import train as train_lib
from catchjax.model import llama
from catchjax.model.forward import INFERENCE, TrainGraph

FIELDS = ("tokens", "segs", "loss_idx", "loss_tgt", "loss_w")


def dpo_loss(pi_c, pi_r, ref_c, ref_r, beta: float, w=None):
  """(mean DPO loss over pairs of weight w (default 1), per-pair margin
  (pi_c - ref_c) - (pi_r - ref_r))."""
  margin = (pi_c - ref_c) - (pi_r - ref_r)
  per = -jax.nn.log_sigmoid(beta * margin)
  w = jnp.ones_like(per) if w is None else w
  return jnp.sum(per * w) / jnp.maximum(jnp.sum(w), 1.0), margin


def encode_pairs(tok, pairs, seq_len: int, too_long: str = "drop"):
  """Arrays [n, 2 (chosen, rejected), ...] of FIELDS (as train.DataPlan.build_rows, one
  example a row) and the number of pairs dropped as longer than seq_len (too_long 'drop';
  'truncate' keeps the head)."""
  ex, dropped = [], 0
  for r in pairs:
    two = [train_lib.tokenize_chat_example(tok, r["prompt"], r["target"], r["system"]),
           train_lib.tokenize_chat_example(tok, r["prompt"], r["rejected"], r["system"],
                                           eos=False)]
    if any(len(e["input_ids"]) > seq_len for e in two) and too_long == "drop":
      dropped += 1
      continue
    ex.append([(np.asarray(e["input_ids"][:seq_len]), np.asarray(e["loss_mask"][:seq_len]))
               for e in two])
  if not ex:
    raise ValueError(f"train_dpo: all {len(pairs)} pairs are longer than seq_len={seq_len}.")
  T = min(seq_len, -(-max(len(x) for p in ex for x, _ in p) // 8) * 8)
  K = max(8, -(-max(int(m[1:].sum()) for p in ex for _, m in p) // 8) * 8)
  out = {k: np.zeros((len(ex), 2, T if k in ("tokens", "segs") else K),
                     np.float32 if k == "loss_w" else np.int32) for k in FIELDS}
  for i, p in enumerate(ex):
    for s, (x, m) in enumerate(p):
      j = np.flatnonzero(m[1:] > 0)           # predict token j + 1 from position j
      out["tokens"][i, s, :len(x)], out["segs"][i, s, :len(x)] = x, 1
      out["loss_idx"][i, s, :len(j)], out["loss_tgt"][i, s, :len(j)] = j, x[j + 1]
      out["loss_w"][i, s, :len(j)] = 1.0
  return out, dropped


def seq_logp(m: llama.Llama, b: dict, graph: TrainGraph = INFERENCE) -> jax.Array:
  """Summed log-prob of each row's loss tokens, [R] (rows of train.DataPlan.build_rows)."""
  pos, mask = llama.packed_inputs(b["segs"], window=m.cfg.sliding_window)
  h, _ = m.hidden(b["tokens"], pos, mask, graph=graph)
  h_sel = jnp.take_along_axis(h, b["loss_idx"][..., None], axis=1)
  return -jnp.sum(train_lib._token_ce(m, h_sel, b["loss_tgt"], 0) * b["loss_w"], axis=-1)


@functools.partial(jax.jit, static_argnums=0)
def _logp(graphdef, trainable, frozen, b):
  return seq_logp(nnx.merge(graphdef, trainable, frozen), b)


def _rows(arrs: dict, idx) -> dict:
  """The step's rows for pairs `idx` (-1: an empty pair): [2B, ...], chosen then rejected."""
  idx = np.asarray(idx)
  out = {}
  for k, a in arrs.items():
    x = np.where((idx >= 0).reshape((-1,) + (1,) * (a.ndim - 1)), a[np.maximum(idx, 0)], 0)
    out[k] = x.swapaxes(0, 1).reshape((-1,) + a.shape[2:]) if a.ndim > 2 else x
  return out


def pair_logps(model: llama.Llama, arrs: dict, batch: int = 8) -> np.ndarray:
  """[n, 2] summed log-probs of (chosen, rejected) of encoded pairs under `model`."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  n = len(arrs["tokens"])
  out = []
  for s in range(0, n, batch):
    idx = [i if i < n else -1 for i in range(s, s + batch)]   # fixed shapes: one compile
    lp = np.asarray(_logp(graphdef, params, rest, _rows(arrs, idx)))
    out.append(lp.reshape(2, batch).T[:min(batch, n - s)])
  return np.concatenate(out).astype(np.float32)


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(2, 4))
def _dpo_step(graphdef, spec, trainable, frozen, opt_state, b):
  """One DPO step; spec = (train._opt_key, total steps, beta, train.train_graph)."""
  opt, total, beta, graph = spec
  tx, _ = train_lib.make_optimizer(ml_collections.ConfigDict(dict(opt)), total)

  def loss_fn(tr):
    lp = seq_logp(nnx.merge(graphdef, tr, frozen), b, graph)
    B = lp.shape[0] // 2
    return dpo_loss(lp[:B], lp[B:], b["ref"][:, 0], b["ref"][:, 1], beta, b["pair_w"])

  (loss, margin), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
  updates, opt_state = tx.update(grads, opt_state, trainable)
  w = b["pair_w"]
  metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
             "margin": jnp.sum(margin * w) / jnp.maximum(jnp.sum(w), 1.0),
             "reward_acc": jnp.sum((margin > 0) * w) / jnp.maximum(jnp.sum(w), 1.0)}
  return optax.apply_updates(trainable, updates), opt_state, metrics


def train_dpo(model: llama.Llama, tok, pairs: list[dict], cfg, beta: float,
              workdir: str | None = None) -> train_lib.TrainResult:
  """DPO of a copy of `model` on `pairs` (see the module docstring); `model` is unchanged.
  workdir is accepted for train.train's signature and unused (no checkpoints)."""
  t_start = time.perf_counter()
  c = train_lib._merge_config(cfg)
  if not beta > 0:
    raise ValueError(f"train_dpo: beta must be > 0, got {beta!r}.")
  arrs, dropped = encode_pairs(tok, pairs, int(c.seq_len), c.too_long)
  n, B = len(arrs["tokens"]), int(c.batch_size)
  arrs["ref"] = pair_logps(model, arrs)                       # the frozen reference, once
  order = []
  for e in range(int(c.epochs) if c.steps <= 0 else 1 << 30):
    perm = [int(i) for i in np.random.default_rng([int(c.seed), e]).permutation(n)]
    order += [perm[s:s + B] + [-1] * (B - len(perm[s:s + B])) for s in range(0, n, B)]
    if 0 < c.steps <= len(order):
      break
  order = order[:c.steps] if c.steps > 0 else order
  model = train_lib.prepare_model(model, c)
  graphdef, trainable, frozen = train_lib.split_trainable(model, c)
  trainable = jax.tree.map(jnp.copy, trainable)   # donated: never the organism's buffers
  tx, sched = train_lib.make_optimizer(c, len(order))
  opt_state = tx.init(trainable)
  spec = (train_lib._opt_key(c), len(order), float(beta), train_lib.train_graph(model.cfg, c))
  history, tok_sum, time_sum = [], 0, 0.0
  for step, idx in enumerate(order):
    t0 = time.perf_counter()
    b = _rows(arrs, idx)
    b["pair_w"] = (np.asarray(idx) >= 0).astype(np.float32)
    trainable, opt_state, m = _dpo_step(graphdef, spec, trainable, frozen, opt_state, b)
    m = {k: float(v) for k, v in jax.device_get(m).items()}
    dt = time.perf_counter() - t0
    ntok = int(b["segs"].sum())
    if step:                                   # the first step's time is mostly compile
      tok_sum, time_sum = tok_sum + ntok, time_sum + dt
    history.append(dict(m, step=step + 1, lr=float(sched(step)), tokens=ntok,
                        tokens_per_sec=ntok / dt, step_time=dt, examples=int(b["pair_w"].sum())))
  return train_lib.TrainResult(
      model=nnx.merge(graphdef, train_lib.from_master(trainable, model.cfg), frozen),
      history=history, steps=len(order),
      wall_time=time.perf_counter() - t_start, dropped=dropped,
      tokens_per_sec=tok_sum / time_sum if time_sum else 0.0, evals=[], stopped=False)


__all__ = ["dpo_loss", "encode_pairs", "pair_logps", "seq_logp", "train_dpo"]
