"""One decoder block on the residual stream: x + attention(x), then + MLP (SwiGLU or GeGLU),
each sub-layer pre-normed (and post-normed in Gemma 2's sandwich)."""
from __future__ import annotations

import jax.numpy as jnp

from catchjax.model.attention import attention
from catchjax.model.config import ModelConfig
from catchjax.model.ops import activation, linear, norm


def mlp(cfg: ModelConfig, x_BxTxD, p: dict):
  """The MLP sub-layer: pre-norm, gated MLP (and Gemma 2's post-norm); output [B, T, D]."""
  cd = cfg.compute_dtype
  act = activation(cfg)
  B, T = x_BxTxD.shape[:2]
  h = norm(cfg, x_BxTxD, p["mlp_norm"])
  if B * T >= 64 and "lora_a_w_gate" not in p:   # many tokens: one fused gate/up matmul
    gu = jnp.einsum("btd,df->btf", h, jnp.concatenate([p["w_gate"], p["w_up"]], -1).astype(cd))
    g = act(gu[..., :gu.shape[-1] // 2]) * gu[..., gu.shape[-1] // 2:]
  else:
    g = act(linear(cfg, h, p, "w_gate")) * linear(cfg, h, p, "w_up")
  out = linear(cfg, g, p, "w_down")
  if cfg.post_norms:
    out = norm(cfg, out, p["post_mlp_norm"])
  return out


def block(cfg: ModelConfig, x_BxTxD, p: dict, bias_BxTxS, cos, sin, kcs=None, vcs=None, i=None,
          cache_index=None):
  """One layer with weights p (one layer's slice of the stacked weights). kcs/vcs: the KV
  cache (stacked, written at layer i, or one layer's buffers with i None) or None. Returns
  (x, kcs, vcs)."""
  attn_out, kcs, vcs = attention(cfg, x_BxTxD, p, bias_BxTxS, cos, sin, kcs, vcs, i,
                                 cache_index)
  x = x_BxTxD + attn_out
  x = x + mlp(cfg, x, p)
  return x, kcs, vcs
