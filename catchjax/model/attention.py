"""Grouped-query attention with RoPE: q/k/v projections (optionally fused, biased, q/k-normed),
rotate-half RoPE, a KV-cache write, scores (Gemma 2's soft-cap), an additive mask bias and the
output projection.

KV-cache layout (see `llama.init_cache`): keys [B, KV, hd, S], values [B, KV, S, hd] per
layer, the layouts single-token decode reads fastest. A stacked cache has a leading layer
axis and is indexed by the layer number `i`; a per-layer buffer (the decode loop) has none.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from catchjax.model.config import ModelConfig
from catchjax.model.ops import linear, norm


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
  """RoPE inverse frequencies [head_dim / 2] (float32), with the config's scaling applied as
  transformers does (`linear`: all divided by the factor; `llama3`: low frequencies divided,
  high kept, a smooth blend between)."""
  hd = cfg.head_dim
  inv = np.float32(1.0) / (np.float32(cfg.rope_theta) ** (
      np.arange(0, hd, 2, dtype=np.float32) / np.float32(hd)))   # float32, as transformers
  sc = dict(cfg.rope_scaling or ())
  kind = sc.get("rope_type", "default")
  if kind == "linear":
    inv = inv / sc["factor"]
  elif kind == "llama3":
    f, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
    old = sc["original_max_position_embeddings"]
    wavelen = 2 * np.pi / inv
    scaled = np.where(wavelen > old / lo, inv / f, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * scaled / f + smooth * scaled
    medium = (wavelen >= old / hi) & (wavelen <= old / lo)
    inv = np.where(medium, blended, scaled)
  elif kind != "default":
    raise ValueError(f"RoPE type {kind!r} has no implementation (families.read_rope).")
  return inv.astype(np.float32)


def rope_tables(positions_BxT, inv_freq):
  f = positions_BxT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, hd/2]
  emb = jnp.concatenate([f, f], axis=-1)
  return jnp.cos(emb)[:, :, None, :], jnp.sin(emb)[:, :, None, :]


def apply_rope(x_BxTxNxH, cos, sin):
  """Rotate-half RoPE (the HF convention)."""
  h = x_BxTxNxH.shape[-1] // 2
  x1, x2 = x_BxTxNxH[..., :h], x_BxTxNxH[..., h:]
  rot = jnp.concatenate([-x2, x1], axis=-1)
  xf = x_BxTxNxH.astype(jnp.float32)
  return (xf * cos + rot.astype(jnp.float32) * sin).astype(x_BxTxNxH.dtype)


def project_qkv(cfg: ModelConfig, h_BxTxD, p: dict, cos, sin):
  """Queries grouped by kv head [B, T, KV, G, hd], keys and values [B, T, KV, hd]; RoPE on
  queries and keys."""
  cd = cfg.compute_dtype
  B, T = h_BxTxD.shape[:2]
  H, KV, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  if B * T >= 64 and "lora_a_wq" not in p:
    # Many-token calls (training, prefill): one [D, Q+2KV] matmul instead of three (a
    # faster train step). Single-token decode keeps separate weights: the concat would
    # copy every layer's weights on every step.
    wqkv = jnp.concatenate([p["wq"], p["wk"], p["wv"]], axis=-1).astype(cd)
    qkv = jnp.einsum("btd,de->bte", h_BxTxD, wqkv)
    q, k, v = jnp.split(qkv, [p["wq"].shape[-1], p["wq"].shape[-1] + p["wk"].shape[-1]], axis=-1)
  else:
    q, k, v = (linear(cfg, h_BxTxD, p, n) for n in ("wq", "wk", "wv"))
  if cfg.qkv_bias:
    q, k, v = q + p["bq"].astype(cd), k + p["bk"].astype(cd), v + p["bv"].astype(cd)
  q, k = q.reshape(B, T, H, hd), k.reshape(B, T, KV, hd)
  if cfg.qk_norm:
    q, k = norm(cfg, q, p["q_norm"]), norm(cfg, k, p["k_norm"])
  q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
  v = v.reshape(B, T, KV, hd)
  return q.reshape(B, T, KV, H // KV, hd), k, v


def write_cache(kcs, vcs, k_BxTxKVxH, v_BxTxKVxH, i, cache_index, cd):
  """Write the T new keys/values at slot cache_index, in place: into layer i of a stacked
  cache, or into one layer's own buffers (i None). Returns the caches and this layer's keys
  and values (all slots) in the compute dtype -- no copy-out / write-back of the whole cache."""
  kt = k_BxTxKVxH.transpose(0, 2, 3, 1).astype(kcs.dtype)
  vt = v_BxTxKVxH.transpose(0, 2, 1, 3).astype(vcs.dtype)
  if i is None:   # one layer's own cache buffers (unstacked decode path)
    kcs = jax.lax.dynamic_update_slice(kcs, kt, (0, 0, 0, cache_index))
    vcs = jax.lax.dynamic_update_slice(vcs, vt, (0, 0, cache_index, 0))
    return kcs, vcs, kcs.astype(cd), vcs.astype(cd)
  kcs = jax.lax.dynamic_update_slice(kcs, kt[None], (i, 0, 0, 0, cache_index))
  vcs = jax.lax.dynamic_update_slice(vcs, vt[None], (i, 0, 0, cache_index, 0))
  k_all = jax.lax.dynamic_index_in_dim(kcs, i, keepdims=False).astype(cd)
  v_all = jax.lax.dynamic_index_in_dim(vcs, i, keepdims=False).astype(cd)
  return kcs, vcs, k_all, v_all


ATTENTION_IMPLS = ("auto", "einsum", "dot_product")


def use_dot_product(cfg: ModelConfig, T: int) -> bool:
  """Whether a T-query call goes through jax.nn.dot_product_attention (cfg.attention; never
  for single-token decode or with a score soft-cap, which it does not take)."""
  if cfg.attention not in ATTENTION_IMPLS:
    raise ValueError(f"attention={cfg.attention!r}; one of {ATTENTION_IMPLS}.")
  if T == 1 or cfg.attn_softcap is not None or cfg.attention == "einsum":
    return False
  return cfg.attention == "dot_product" or jax.default_backend() == "gpu"


def dot_product_attend(cfg: ModelConfig, qg_BxTxKVxGxH, k_BxSxKVxH, v_BxSxKVxH, bias_BxTxS):
  """jax.nn.dot_product_attention over grouped queries (GQA: heads of one kv head adjacent,
  as the einsum path groups them), the additive mask bias broadcast over heads."""
  B, T, KV, G, hd = qg_BxTxKVxGxH.shape
  q = qg_BxTxKVxGxH.reshape(B, T, KV * G, hd)
  # The mask's float32-min bias would overflow to -inf in bf16 (a fully masked padding row
  # would then be NaN): clamp it to half the compute dtype's range first.
  bias = jnp.maximum(bias_BxTxS, jnp.finfo(q.dtype).min / 2)[:, None].astype(q.dtype)
  o = jax.nn.dot_product_attention(
      q, k_BxSxKVxH.astype(q.dtype), v_BxSxKVxH.astype(q.dtype), bias=bias,
      scale=float((cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5))
  return o.reshape(B, T, KV * G * hd)


def attend(cfg: ModelConfig, qg_BxTxKVxGxH, k, v, bias_BxTxS, kcs=None, vcs=None, i=None,
           cache_index=None):
  """Softmax attention of the grouped queries over the T keys given (kcs None) or over the
  cache after writing them into it. Returns (output [B, T, H * hd], kcs, vcs)."""
  cd = cfg.compute_dtype
  B, T = qg_BxTxKVxGxH.shape[:2]
  qg = qg_BxTxKVxGxH
  if kcs is not None:
    kcs, vcs, k_all, v_all = write_cache(kcs, vcs, k, v, i, cache_index, cd)
  if use_dot_product(cfg, T):
    if kcs is not None:   # prefill: attend over the cache's slots (keys [B, KV, hd, S])
      k, v = k_all.transpose(0, 3, 1, 2), v_all.transpose(0, 2, 1, 3)
    return dot_product_attend(cfg, qg, k, v, bias_BxTxS), kcs, vcs
  if kcs is not None:
    if T == 1:
      # Single-token decode: no size-1 query axis in the dots (XLA:CPU then emits plain
      # batched matrix-vector products, faster than the general form).
      s = jnp.einsum("bkgd,bkds->bkgs", qg[:, 0], k_all).astype(jnp.float32)[:, :, :, None]
    else:
      s = jnp.einsum("btkgd,bkds->bkgts", qg, k_all).astype(jnp.float32)
  else:
    k_all, v_all = k, v
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k_all).astype(jnp.float32)
  s = s * (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5
  if cfg.attn_softcap is not None:   # Gemma 2: on the scaled scores, before the mask
    s = jnp.tanh(s / cfg.attn_softcap) * cfg.attn_softcap
  s = s + bias_BxTxS[:, None, None]
  w = jax.nn.softmax(s, axis=-1).astype(cd)
  if kcs is None:
    o = jnp.einsum("bkgts,bskd->btkgd", w, v_all)
  elif T == 1:
    o = jnp.einsum("bkgs,bksd->bkgd", w[:, :, :, 0], v_all)[:, None]
  else:
    o = jnp.einsum("bkgts,bksd->btkgd", w, v_all)
  return o.reshape(B, T, cfg.num_heads * cfg.head_dim), kcs, vcs


def attention(cfg: ModelConfig, x_BxTxD, p: dict, bias_BxTxS, cos, sin, kcs=None, vcs=None,
              i=None, cache_index=None):
  """The attention sub-layer on the residual stream x: pre-norm, attention, output projection
  (and Gemma 2's post-norm). Returns (its output [B, T, D], kcs, vcs)."""
  h = norm(cfg, x_BxTxD, p["attn_norm"])
  qg, k, v = project_qkv(cfg, h, p, cos, sin)
  o, kcs, vcs = attend(cfg, qg, k, v, bias_BxTxS, kcs, vcs, i, cache_index)
  out = linear(cfg, o, p, "wo")
  if cfg.post_norms:
    out = norm(cfg, out, p["post_attn_norm"])
  return out, kcs, vcs
