"""The small pieces every decoder block uses: RMSNorm, a LoRA-aware projection and the MLP
activation. Plain JAX functions of arrays and a static `ModelConfig`."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from catchjax.model.config import ModelConfig


def rms_norm(x, w, eps, plus_one: bool = False):
  xf = x.astype(jnp.float32)
  xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  if plus_one:   # Gemma: scale by (1 + w) in float32, then cast (transformers' Gemma2RMSNorm)
    return (xf * (1.0 + w.astype(jnp.float32))).astype(x.dtype)
  return (w.astype(x.dtype) * xf.astype(x.dtype))


def norm(cfg: ModelConfig, x, w):
  """`rms_norm` with the config's epsilon and (1 + w) convention."""
  return rms_norm(x, w, eps=cfg.rms_eps, plus_one=cfg.norm_plus_one)


def linear(cfg: ModelConfig, h_BxTxD, p: dict, name: str):
  """h @ p[name] in the compute dtype, plus the LoRA update when p holds its adapters."""
  cd = cfg.compute_dtype
  y = jnp.einsum("btd,de->bte", h_BxTxD, p[name].astype(cd))
  if f"lora_a_{name}" in p:
    scale_lora = cfg.lora_alpha / max(cfg.lora_rank, 1)
    a = jnp.einsum("btd,dr->btr", h_BxTxD, p[f"lora_a_{name}"].astype(cd))
    y = y + scale_lora * jnp.einsum("btr,re->bte", a, p[f"lora_b_{name}"].astype(cd))
  return y


def activation(cfg: ModelConfig):
  """The MLP's gate activation: SiLU (SwiGLU) or tanh-approximated GELU (GeGLU)."""
  return (jax.nn.silu if cfg.hidden_act == "silu"
          else functools.partial(jax.nn.gelu, approximate=True))   # gelu_pytorch_tanh
