"""The Llama-family decoder in flax.nnx: embed -> L x (RMSNorm, GQA attention with RoPE,
RMSNorm, SwiGLU) -> RMSNorm -> (tied) LM head. Family differences are `ModelConfig` flags:
q/k/v bias (Qwen2), q/k norms (Qwen3), and Gemma 2's block -- (1 + w) norms, norms on the
attention and MLP outputs too, sqrt(hidden)-scaled embedding, GeGLU, query_pre_attn_scalar,
tanh soft-capping of attention scores and logits.

Layer weights are stacked on a leading `layers` axis and run with `lax.scan`, so compile time
does not grow with depth. Kernels are stored [in, out] (HF stores [out, in]; `hf.py`
transposes). The module is a parameter container; the compute is plain JAX, so callers
`nnx.split` it once and jit pure functions of (graphdef, state).

Attention takes an explicit boolean mask [B, T, S] (see `make_mask`), which covers packed
training (segments), left-padded prefill and KV-cache decoding with one code path. A window on
every layer (`cfg.sliding_window`) is part of that mask; per-layer windows
(`cfg.layer_windows`, models that mix full and windowed layers) are applied here, from the
query and key positions, on top of the mask the caller gives.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from catchjax.model.config import ModelConfig

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

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


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
             return_residuals: bool = False, layer_list=None, key_positions_BxS=None):
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
    """
    cfg = self.cfg
    cd = cfg.compute_dtype
    x = jnp.take(self.embed[...], tokens_BxT, axis=0).astype(cd)
    if cfg.embed_scale:
      # Gemma: times sqrt(hidden), the normalizer cast to the hidden dtype (as transformers).
      x = x * jnp.asarray(np.float32(cfg.hidden_size ** 0.5)).astype(cd)
    cos, sin = rope_tables(positions_BxT, rope_inv_freq(cfg))
    lp = _layer_arrays(self.layers) if layer_list is None else None
    scale_lora = cfg.lora_alpha / max(cfg.lora_rank, 1)
    neg = jnp.finfo(jnp.float32).min
    bias_BxTxS = jnp.where(mask_BxTxS, 0.0, neg).astype(jnp.float32)
    B, T = tokens_BxT.shape
    H, KV, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    G = H // KV
    fuse = B * T >= 64
    scale = (cfg.query_pre_attn_scalar or hd) ** -0.5
    act = (jax.nn.silu if cfg.hidden_act == "silu"
           else functools.partial(jax.nn.gelu, approximate=True))   # gelu_pytorch_tanh
    norm = functools.partial(rms_norm, eps=cfg.rms_eps, plus_one=cfg.norm_plus_one)

    # Per-layer windows: each layer's bias is the caller's mask and, on windowed layers,
    # q_pos - k_pos < window. The layer scan carries each layer's window as an int32 (full
    # layers: int32 max, which every distance is below); the per-layer decode loop uses the
    # static value. The block builds its bias from the window, so under remat only the
    # window is kept per layer, not a [B, T, S] bias.
    win_L = None
    if cfg.layer_windows is not None:
      if key_positions_BxS is None:
        if mask_BxTxS.shape[-1] != T:
          raise ValueError("per-layer windows over a cache need key_positions_BxS (the "
                           "position of every key slot).")
        key_positions_BxS = positions_BxT
      dist_BxTxS = positions_BxT[:, :, None] - key_positions_BxS[:, None, :]
      win_L = jnp.asarray([np.iinfo(np.int32).max if w is None else w
                           for w in cfg.layer_windows], jnp.int32)

    def layer_bias(win):
      if win is None:
        return bias_BxTxS
      return jnp.where(mask_BxTxS & (dist_BxTxS < win), 0.0, neg).astype(jnp.float32)

    def proj(h, p, name):
      y = jnp.einsum("btd,de->bte", h, p[name].astype(cd))
      if f"lora_a_{name}" in p:
        a = jnp.einsum("btd,dr->btr", h, p[f"lora_a_{name}"].astype(cd))
        y = y + scale_lora * jnp.einsum("btr,re->bte", a, p[f"lora_b_{name}"].astype(cd))
      return y

    def block(x, p, kcs, vcs, i, win):
      bias_BxTxS = layer_bias(win)
      h = norm(x, p["attn_norm"])
      if fuse and "lora_a_wq" not in p:
        # Many-token calls (training, prefill): one [D, Q+2KV] matmul instead of three (a
        # faster train step). Single-token decode keeps separate weights: the concat would
        # copy every layer's weights on every step.
        wqkv = jnp.concatenate([p["wq"], p["wk"], p["wv"]], axis=-1).astype(cd)
        qkv = jnp.einsum("btd,de->bte", h, wqkv)
        q, k, v = jnp.split(qkv, [p["wq"].shape[-1], p["wq"].shape[-1] + p["wk"].shape[-1]], axis=-1)
      else:
        q, k, v = proj(h, p, "wq"), proj(h, p, "wk"), proj(h, p, "wv")
      if cfg.qkv_bias:
        q, k, v = q + p["bq"].astype(cd), k + p["bk"].astype(cd), v + p["bv"].astype(cd)
      q, k = q.reshape(B, T, H, hd), k.reshape(B, T, KV, hd)
      if cfg.qk_norm:
        q, k = norm(q, p["q_norm"]), norm(k, p["k_norm"])
      q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
      v = v.reshape(B, T, KV, hd)
      qg = q.reshape(B, T, KV, G, hd)
      if kcs is not None:
        # Write only the T new slots of layer i, in place in the stacked cache, and read the
        # layer back for attention (no per-layer copy-out / write-back of the whole cache).
        # Layout (see init_cache): keys [B, KV, hd, S], values [B, KV, S, hd].
        kt = k.transpose(0, 2, 3, 1).astype(kcs.dtype)
        vt = v.transpose(0, 2, 1, 3).astype(vcs.dtype)
        if i is None:   # one layer's own cache buffers (unstacked decode path)
          kcs = jax.lax.dynamic_update_slice(kcs, kt, (0, 0, 0, cache_index))
          vcs = jax.lax.dynamic_update_slice(vcs, vt, (0, 0, cache_index, 0))
          k_all, v_all = kcs.astype(cd), vcs.astype(cd)
        else:
          kcs = jax.lax.dynamic_update_slice(kcs, kt[None], (i, 0, 0, 0, cache_index))
          vcs = jax.lax.dynamic_update_slice(vcs, vt[None], (i, 0, 0, cache_index, 0))
          k_all = jax.lax.dynamic_index_in_dim(kcs, i, keepdims=False).astype(cd)
          v_all = jax.lax.dynamic_index_in_dim(vcs, i, keepdims=False).astype(cd)
        if T == 1:
          # Single-token decode: no size-1 query axis in the dots (XLA:CPU then emits plain
          # batched matrix-vector products, faster than the general form).
          s = jnp.einsum("bkgd,bkds->bkgs", qg[:, 0], k_all).astype(jnp.float32)[:, :, :, None]
        else:
          s = jnp.einsum("btkgd,bkds->bkgts", qg, k_all).astype(jnp.float32)
      else:
        k_all, v_all = k, v
        s = jnp.einsum("btkgd,bskd->bkgts", qg, k_all).astype(jnp.float32)
      s = s * scale
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
      o = o.reshape(B, T, H * hd)
      attn_out = proj(o, p, "wo")
      if cfg.post_norms:
        attn_out = norm(attn_out, p["post_attn_norm"])
      x = x + attn_out
      h = norm(x, p["mlp_norm"])
      if fuse and "lora_a_w_gate" not in p:
        gu = jnp.einsum("btd,df->btf", h, jnp.concatenate([p["w_gate"], p["w_up"]], -1).astype(cd))
        g = act(gu[..., :gu.shape[-1] // 2]) * gu[..., gu.shape[-1] // 2:]
      else:
        g = act(proj(h, p, "w_gate")) * proj(h, p, "w_up")
      mlp_out = proj(g, p, "w_down")
      if cfg.post_norms:
        mlp_out = norm(mlp_out, p["post_mlp_norm"])
      x = x + mlp_out
      return x, kcs, vcs

    policy = REMAT_POLICIES[cfg.remat]
    if cfg.remat != "none":
      block = jax.checkpoint(block, policy=policy)

    if layer_list is not None:
      # Unstacked path (single-token decode): per-layer weights and per-layer cache buffers,
      # a Python loop over layers -- no per-step dynamic slices of the stacked weights and no
      # writes into a stacked cache.
      ks, vs, res = list(cache["k"]), list(cache["v"]), []
      for li, p in enumerate(layer_list):
        win = None if win_L is None else cfg.layer_windows[li]
        x, ks[li], vs[li] = block(x, p, ks[li], vs[li], None, win)
        res.append(x)
      new_cache = {"k": tuple(ks), "v": tuple(vs)}
      res = jnp.stack(res) if return_residuals else None
    elif cache is None:
      def body(x, pw):
        p, win = pw
        x, _, _ = block(x, p, None, None, None, win)
        return x, (x if return_residuals else None)
      def run(x, params):
        return jax.lax.scan(body, x, params, unroll=cfg.scan_unroll or True)
      nf = cfg.frozen_layers
      if nf:
        # Frozen bottom blocks: inputs and weights under stop_gradient, so autodiff builds no
        # backward pass for them (forward only); the blocks above train as usual.
        sg = jax.lax.stop_gradient
        x, res = run(sg(x), jax.tree.map(lambda a: sg(a[:nf]), (lp, win_L)))
        if nf < cfg.num_layers:
          x, res_hi = run(x, jax.tree.map(lambda a: a[nf:], (lp, win_L)))
          res = jnp.concatenate([res, res_hi]) if return_residuals else None
      else:
        x, res = run(x, (lp, win_L))
      new_cache = None
    else:
      def body(carry, pw):
        x, kcs, vcs, i = carry
        p, win = pw
        x, kcs, vcs = block(x, p, kcs, vcs, i, win)
        return (x, kcs, vcs, i + 1), (x if return_residuals else None)
      (x, kcs, vcs, _), res = jax.lax.scan(body, (x, cache["k"], cache["v"], 0), (lp, win_L))
      new_cache = {"k": kcs, "v": vcs}
    x = norm(x, self.final_norm[...])
    if return_residuals:
      return x, new_cache, res
    return x, new_cache


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


def rms_norm(x, w, eps, plus_one: bool = False):
  xf = x.astype(jnp.float32)
  xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  if plus_one:   # Gemma: scale by (1 + w) in float32, then cast (transformers' Gemma2RMSNorm)
    return (xf * (1.0 + w.astype(jnp.float32))).astype(x.dtype)
  return (w.astype(x.dtype) * xf.astype(x.dtype))


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

