"""The Llama-family decoder in flax.nnx: embed -> L x (RMSNorm, GQA attention with RoPE,
RMSNorm, SwiGLU) -> RMSNorm -> (tied) LM head. Family differences are `ModelConfig` flags:
q/k/v bias (Qwen2), q/k norms (Qwen3), and Gemma 2's block -- (1 + w) norms, norms on the
attention and MLP outputs too, sqrt(hidden)-scaled embedding, GeGLU, query_pre_attn_scalar,
tanh soft-capping of attention scores and logits.

This file holds the parameters (`Llama`, `Layers`, their logical axes), the KV cache, masks and
the one `logits`. The compute is plain JAX, one file per concept: `ops.py` (RMSNorm, LoRA-aware
projection), `attention.py` (RoPE, GQA, the cache write), `block.py` (attention + MLP) and
`forward.py` (the layer scan for training and scoring, the per-layer loop for decode).

Layer weights are stacked on a leading `layers` axis and run with `lax.scan`, so compile time
does not grow with depth. Kernels are stored [in, out] (HF stores [out, in]; `hf.py`
transposes). The module is a parameter container, so callers `nnx.split` it once and jit pure
functions of (graphdef, state).

Attention takes an explicit boolean mask [B, T, S] (see `make_mask`), which covers packed
training (segments), left-padded prefill and KV-cache decoding with one code path. A window on
every layer (`cfg.sliding_window`) is part of that mask; per-layer windows
(`cfg.layer_windows`, models that mix full and windowed layers) are applied in `forward.py`,
from the query and key positions, on top of the mask the caller gives.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from catchjax.model import forward as forward_lib
from catchjax.model.attention import apply_rope, rope_inv_freq, rope_tables  # noqa: F401
from catchjax.model.config import ModelConfig
from catchjax.model.forward import REMAT_POLICIES  # noqa: F401
from catchjax.model.ops import rms_norm  # noqa: F401

# Logical axis names of every parameter (leading `layers` axis for stacked weights). The
# sharding rules in the config map these onto mesh axes (catchjax/sharding.py).
LOGICAL_AXES: dict[str, tuple[str | None, ...]] = {
    "embed": ("vocab", "embed"),
    "lm_head": ("embed", "vocab"),
    "final_norm": ("norm",),
    "attn_norm": ("layers", "norm"),
    "mlp_norm": ("layers", "norm"),
    "post_attn_norm": ("layers", "norm"),
    "post_mlp_norm": ("layers", "norm"),
    "wq": ("layers", "embed", "q_heads"),
    "wk": ("layers", "embed", "kv_heads"),
    "wv": ("layers", "embed", "kv_heads"),
    "bq": ("layers", "q_heads"),
    "bk": ("layers", "kv_heads"),
    "bv": ("layers", "kv_heads"),
    "q_norm": ("layers", None),
    "k_norm": ("layers", None),
    "wo": ("layers", "q_heads", "embed"),
    "w_gate": ("layers", "embed", "mlp"),
    "w_up": ("layers", "embed", "mlp"),
    "w_down": ("layers", "mlp", "embed"),
}
_LORA_IN_AXES = {"wq": "embed", "wk": "embed", "wv": "embed", "wo": "q_heads",
                 "w_gate": "embed", "w_up": "embed", "w_down": "mlp"}
_LORA_OUT_AXES = {"wq": "q_heads", "wk": "kv_heads", "wv": "kv_heads", "wo": "embed",
                  "w_gate": "mlp", "w_up": "mlp", "w_down": "embed"}
for _t in _LORA_IN_AXES:
  LOGICAL_AXES[f"lora_a_{_t}"] = ("layers", _LORA_IN_AXES[_t], None)
  LOGICAL_AXES[f"lora_b_{_t}"] = ("layers", None, _LORA_OUT_AXES[_t])


class LoRAParam(nnx.Param):
  """A LoRA adapter weight: trained when the config asks for LoRA, everything else frozen."""


def _normal(rngs, shape, dtype, std=0.02):
  return (std * jax.random.normal(rngs.params(), shape)).astype(dtype)


class Layers(nnx.Module):
  """All decoder blocks' weights, stacked on a leading axis of size num_layers."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    L, D, F = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
    Q, KV = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    pd = jnp.dtype(cfg.param_dtype)
    ident = jnp.zeros if cfg.norm_plus_one else jnp.ones   # a norm weight that scales by 1
    self.attn_norm = nnx.Param(ident((L, D), pd))
    self.mlp_norm = nnx.Param(ident((L, D), pd))
    if cfg.post_norms:
      self.post_attn_norm = nnx.Param(ident((L, D), pd))
      self.post_mlp_norm = nnx.Param(ident((L, D), pd))
    shapes = {"wq": (D, Q), "wk": (D, KV), "wv": (D, KV), "wo": (Q, D),
              "w_gate": (D, F), "w_up": (D, F), "w_down": (F, D)}
    for name, (i, o) in shapes.items():
      setattr(self, name, nnx.Param(_normal(rngs, (L, i, o), pd)))
    if cfg.qkv_bias:
      self.bq = nnx.Param(jnp.zeros((L, Q), pd))
      self.bk = nnx.Param(jnp.zeros((L, KV), pd))
      self.bv = nnx.Param(jnp.zeros((L, KV), pd))
    if cfg.qk_norm:
      self.q_norm = nnx.Param(ident((L, cfg.head_dim), pd))
      self.k_norm = nnx.Param(ident((L, cfg.head_dim), pd))
    if cfg.lora_rank > 0:
      r = cfg.lora_rank
      for name in cfg.lora_targets:
        i, o = shapes[name]
        setattr(self, f"lora_a_{name}", LoRAParam(_normal(rngs, (L, i, r), pd, std=1.0 / r)))
        setattr(self, f"lora_b_{name}", LoRAParam(jnp.zeros((L, r, o), pd)))


class Llama(nnx.Module):
  """Llama / Qwen2 / Qwen3 / Mistral / Gemma 2 decoder. See module docstring for the calling
  convention."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs | None = None):
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    self.cfg = cfg
    pd = jnp.dtype(cfg.param_dtype)
    self.embed = nnx.Param(_normal(rngs, (cfg.vocab_size, cfg.hidden_size), pd))
    self.layers = Layers(cfg, rngs)
    self.final_norm = nnx.Param((jnp.zeros if cfg.norm_plus_one else jnp.ones)(
        (cfg.hidden_size,), pd))
    if not cfg.tie_embeddings:
      self.lm_head = nnx.Param(_normal(rngs, (cfg.hidden_size, cfg.vocab_size), pd))

  # ---------------------------------------------------------------- forward
  def __call__(self, tokens_BxT, positions_BxT, mask_BxTxS, cache=None, cache_index=None,
               key_positions_BxS=None):
    """Returns (logits_BxTxV float32, new_cache)."""
    h, cache = self.hidden(tokens_BxT, positions_BxT, mask_BxTxS, cache, cache_index,
                           key_positions_BxS=key_positions_BxS)
    return self.logits(h), cache

  def logits(self, h_BxTxD):
    """The LM head on final hidden states (call it only where logits are needed)."""
    cfg = self.cfg
    w = self.embed[...].T if cfg.tie_embeddings else self.lm_head[...]
    out = jnp.einsum("...d,dv->...v", h_BxTxD.astype(cfg.compute_dtype),
                     w.astype(cfg.compute_dtype), preferred_element_type=jnp.float32)
    if cfg.final_softcap is not None:   # Gemma 2
      out = jnp.tanh(out / cfg.final_softcap) * cfg.final_softcap
    return out

  def hidden(self, tokens_BxT, positions_BxT, mask_BxTxS, cache=None, cache_index=None,
             return_residuals: bool = False, layer_list=None, key_positions_BxS=None,
             graph: forward_lib.TrainGraph = forward_lib.INFERENCE):
    """Final-normed hidden states [B, T, D] and the updated KV cache.

    cache: None (attend within the T tokens given) or a dict from `init_cache`; then the T new
    keys/values are written at slot `cache_index` and the mask is [B, T, S_cache].
    return_residuals: also return the residual stream after every layer, [L, B, T, D] (probes).
    layer_list: per-layer weights from `unstack_layers` (they replace the stacked ones); the
      cache must then be per layer too, {"k": (L arrays), "v": (L arrays)}, and the layers run
      as a Python loop. Single-token decode uses this: inside a `lax.while_loop`, a layer scan
      over stacked arrays slices every layer's weights and writes the stacked cache each step.
    key_positions_BxS: the position of every key slot of the mask, for per-layer windows
      (`cfg.layer_windows`) with a cache; without one the keys are the T tokens given.
    graph: the training step's remat policy and frozen bottom blocks (`forward.TrainGraph`).
    """
    lp = _layer_arrays(self.layers) if layer_list is None else None
    return forward_lib.hidden(self.cfg, self.embed[...], lp, self.final_norm[...], tokens_BxT,
                              positions_BxT, mask_BxTxS, cache, cache_index, return_residuals,
                              layer_list, key_positions_BxS, graph)


def _layer_arrays(layers: Layers) -> dict[str, jax.Array]:
  return {k: v[...] for k, v in vars(layers).items() if isinstance(v, nnx.Variable)}


def unstack_layers(model: "Llama") -> list[dict[str, jax.Array]]:
  """The stacked layer weights as one dict per layer (for `hidden(..., layer_list=...)`)."""
  lp = _layer_arrays(model.layers)
  return [{k: v[i] for k, v in lp.items()} for i in range(model.cfg.num_layers)]


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None) -> dict[str, jax.Array]:
  """An empty KV cache: keys [layers, batch, kv_heads, head_dim, length] and values
  [layers, batch, kv_heads, length, head_dim] (the layouts single-token decode reads fastest);
  CACHE_SEQ_AXIS names each one's slot axis."""
  L, B, KV, hd = cfg.num_layers, batch, cfg.num_kv_heads, cfg.head_dim
  dt = jnp.dtype(dtype or cfg.dtype)
  return {"k": jnp.zeros((L, B, KV, hd, length), dt), "v": jnp.zeros((L, B, KV, length, hd), dt)}


CACHE_SEQ_AXIS = {"k": 4, "v": 3}


def make_mask(q_pos_BxT, k_pos_BxS, k_valid_BxS, q_seg_BxT=None, k_seg_BxS=None,
              window: int | None = None):
  """Boolean attention mask [B, T, S]: key is valid, not in the future, in the same segment
  (packing) and, for sliding-window models, within the window."""
  m = (k_pos_BxS[:, None, :] <= q_pos_BxT[:, :, None]) & k_valid_BxS[:, None, :]
  if q_seg_BxT is not None:
    # A negative segment id marks a row's shared prefix: every segment of the row sees it.
    m &= (q_seg_BxT[:, :, None] == k_seg_BxS[:, None, :]) | (k_seg_BxS[:, None, :] < 0)
  if window is not None:
    m &= (q_pos_BxT[:, :, None] - k_pos_BxS[:, None, :]) < window
  return m


def packed_inputs(segment_ids_BxT, window: int | None = None):
  """Positions and mask for (possibly packed) training rows; segment 0 is padding.

  Prefix sharing (train.share_prefix): a row may open with P tokens of segment id -1, a
  prefix common to all its examples, stored once. Each segment s > 0 then holds only its
  example's tokens after the prefix: its positions continue from P and it attends to the
  prefix and to itself, which is exactly the attention of the whole example on its own.
  """
  seg = segment_ids_BxT
  valid = seg != 0
  shared = seg < 0
  # Position restarts at every new segment; segments after a shared prefix start at P.
  idx = jnp.arange(seg.shape[1])[None, :]
  start = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], 1)
  seg_start = jax.lax.cummax(jnp.where(start, idx, 0), axis=1)
  n_shared = jnp.sum(shared, axis=1, keepdims=True)
  pos = jnp.where(shared, idx, idx - seg_start + n_shared)
  pos = jnp.where(valid, pos, 0)
  return pos, make_mask(pos, pos, valid, seg, seg, window)


def forward(graphdef, state, tokens_BxT, positions_BxT, mask_BxTxS) -> jax.Array:
  """Pure full-sequence forward: logits [B, T, V] (used by tests and scoring)."""
  model = nnx.merge(graphdef, state)
  logits, _ = model(tokens_BxT, positions_BxT, mask_BxTxS)
  return logits

