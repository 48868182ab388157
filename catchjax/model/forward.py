"""The decoder's forward pass over all layers, on plain arrays: embed, L blocks, final norm.

Three layer loops share one block: a `lax.scan` over the stacked weights without a cache
(training and scoring; the training step's frozen bottom blocks, `TrainGraph`, run under
stop_gradient), a scan that writes a
stacked KV cache (prefill), and a Python loop over per-layer weights and per-layer cache
buffers (single-token decode inside a `lax.while_loop`, where a layer scan over stacked
arrays would slice every layer's weights and write the stacked cache on every step).

Per-layer windows (`cfg.layer_windows`): each layer's bias is the caller's mask and, on
windowed layers, q_pos - k_pos < window. The layer scan carries each layer's window as an
int32 (full layers: int32 max, which every distance is below); the per-layer decode loop uses
the static value. The block builds its bias from the window, so under remat only the window
is kept per layer, not a [B, T, S] bias.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from catchjax.model.attention import rope_inv_freq, rope_tables
from catchjax.model.block import block
from catchjax.model.config import ModelConfig
from catchjax.model.ops import norm

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
_NEG = jnp.finfo(jnp.float32).min


@dataclasses.dataclass(frozen=True)
class TrainGraph:
  """How the training step runs the layer scan; neither field changes the forward's numbers.
  remat: a REMAT_POLICIES name. frozen_layers: the first k blocks run under stop_gradient
  (forward only: autodiff builds no backward pass for them). The train step sets this from
  its config (`train.step.train_graph`, which with train.config validates both fields);
  inference and scoring use the default."""
  remat: str = "none"
  frozen_layers: int = 0


INFERENCE = TrainGraph()


def embed(cfg: ModelConfig, embed_VxD, tokens_BxT):
  x = jnp.take(embed_VxD, tokens_BxT, axis=0).astype(cfg.compute_dtype)
  if cfg.embed_scale:
    # Gemma: times sqrt(hidden), the normalizer cast to the hidden dtype (as transformers).
    x = x * jnp.asarray(np.float32(cfg.hidden_size ** 0.5)).astype(cfg.compute_dtype)
  return x


def layer_windows(cfg: ModelConfig, positions_BxT, mask_BxTxS, key_positions_BxS):
  """(windows [L] int32, query-key distances [B, T, S]) for per-layer windows; (None, None)
  without them."""
  if cfg.layer_windows is None:
    return None, None
  if key_positions_BxS is None:
    if mask_BxTxS.shape[-1] != positions_BxT.shape[1]:
      raise ValueError("per-layer windows over a cache need key_positions_BxS (the "
                       "position of every key slot).")
    key_positions_BxS = positions_BxT
  dist_BxTxS = positions_BxT[:, :, None] - key_positions_BxS[:, None, :]
  win_L = jnp.asarray([np.iinfo(np.int32).max if w is None else w
                       for w in cfg.layer_windows], jnp.int32)
  return win_L, dist_BxTxS


def layer_fn(cfg: ModelConfig, mask_BxTxS, bias_BxTxS, dist_BxTxS, cos, sin, cache_index,
             remat: str = "none"):
  """The block as the layer loops call it, (x, p, kcs, vcs, i, win) -> (x, kcs, vcs): its bias
  built from the layer's window (None: the caller's mask), under the remat policy `remat`."""
  def layer(x, p, kcs, vcs, i, win):
    if win is None:
      bias = bias_BxTxS
    else:
      bias = jnp.where(mask_BxTxS & (dist_BxTxS < win), 0.0, _NEG).astype(jnp.float32)
    return block(cfg, x, p, bias, cos, sin, kcs, vcs, i, cache_index)
  if remat != "none":
    layer = jax.checkpoint(layer, policy=REMAT_POLICIES[remat])
  return layer


def scan_layers(cfg: ModelConfig, layer, x, lp, win_L, return_residuals: bool,
                frozen_layers: int = 0):
  """Without a cache: a layer scan over the stacked weights lp, the first `frozen_layers`
  blocks under stop_gradient. Returns (x, residuals)."""
  def body(x, pw):
    p, win = pw
    x, _, _ = layer(x, p, None, None, None, win)
    return x, (x if return_residuals else None)

  def run(x, params):
    return jax.lax.scan(body, x, params, unroll=cfg.scan_unroll or True)

  nf = frozen_layers
  if not nf:
    return run(x, (lp, win_L))
  # Frozen bottom blocks: inputs and weights under stop_gradient, so autodiff builds no
  # backward pass for them (forward only); the blocks above train as usual.
  sg = jax.lax.stop_gradient
  x, res = run(sg(x), jax.tree.map(lambda a: sg(a[:nf]), (lp, win_L)))
  if nf < cfg.num_layers:
    x, res_hi = run(x, jax.tree.map(lambda a: a[nf:], (lp, win_L)))
    res = jnp.concatenate([res, res_hi]) if return_residuals else None
  return x, res


def scan_cached(layer, x, lp, win_L, cache, return_residuals: bool):
  """With a stacked cache {"k", "v"}: a layer scan that writes layer i's slots in place.
  Returns (x, new cache, residuals)."""
  def body(carry, pw):
    x, kcs, vcs, i = carry
    p, win = pw
    x, kcs, vcs = layer(x, p, kcs, vcs, i, win)
    return (x, kcs, vcs, i + 1), (x if return_residuals else None)

  (x, kcs, vcs, _), res = jax.lax.scan(body, (x, cache["k"], cache["v"], 0), (lp, win_L))
  return x, {"k": kcs, "v": vcs}, res


def decode_layers(cfg: ModelConfig, layer, x, layer_list, cache, return_residuals: bool):
  """Per-layer weights and per-layer cache buffers {"k": (L arrays), "v": (L arrays)}, a
  Python loop over layers: no per-step dynamic slices of the stacked weights and no writes
  into a stacked cache. Returns (x, new cache, residuals)."""
  ks, vs, res = list(cache["k"]), list(cache["v"]), []
  for li, p in enumerate(layer_list):
    win = None if cfg.layer_windows is None else cfg.layer_windows[li]
    x, ks[li], vs[li] = layer(x, p, ks[li], vs[li], None, win)
    res.append(x)
  return x, {"k": tuple(ks), "v": tuple(vs)}, (jnp.stack(res) if return_residuals else None)


def hidden(cfg: ModelConfig, embed_VxD, lp, final_norm_D, tokens_BxT, positions_BxT,
           mask_BxTxS, cache=None, cache_index=None, return_residuals: bool = False,
           layer_list=None, key_positions_BxS=None, graph: TrainGraph = INFERENCE):
  """`Llama.hidden` on arrays: lp are the stacked layer weights (None with layer_list);
  `graph`: the training step's remat and frozen blocks (the cache-free scan only).
  Returns (final-normed hidden states, new cache[, residuals])."""
  x = embed(cfg, embed_VxD, tokens_BxT)
  cos, sin = rope_tables(positions_BxT, rope_inv_freq(cfg))
  bias_BxTxS = jnp.where(mask_BxTxS, 0.0, _NEG).astype(jnp.float32)
  win_L, dist_BxTxS = layer_windows(cfg, positions_BxT, mask_BxTxS, key_positions_BxS)
  layer = layer_fn(cfg, mask_BxTxS, bias_BxTxS, dist_BxTxS, cos, sin, cache_index,
                   graph.remat)
  if layer_list is not None:
    x, new_cache, res = decode_layers(cfg, layer, x, layer_list, cache, return_residuals)
  elif cache is None:
    (x, res), new_cache = scan_layers(cfg, layer, x, lp, win_L, return_residuals,
                                      graph.frozen_layers), None
  else:
    x, new_cache, res = scan_cached(layer, x, lp, win_L, cache, return_residuals)
  x = norm(cfg, x, final_norm_D)
  if return_residuals:
    return x, new_cache, res
  return x, new_cache
