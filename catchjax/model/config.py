"""ModelConfig: the architecture of a Llama-family decoder, read from a Hugging Face config.json.

The families (llama incl. 3.x RoPE scaling, qwen2, qwen3, mistral, gemma2) and the rules for
which config.json fields are read or refused live in `families.py`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp

from catchjax.model import families
from catchjax.model.families import SUPPORTED_MODEL_TYPES, UnsupportedModelError  # noqa: F401


MAX_CONFIG_JSON_BYTES = 1 << 20   # HF config.json files are a few KB
# Upper bounds for config.json sizes (far above any Llama / Qwen2 / Mistral release), so a
# corrupt or hostile config cannot ask for absurd allocations.
_BOUNDS = {"vocab_size": 1 << 22, "hidden_size": 1 << 16, "intermediate_size": 1 << 18,
           "num_hidden_layers": 1024, "num_attention_heads": 1024,
           "num_key_value_heads": 1024, "head_dim": 4096,
           "max_position_embeddings": 1 << 24}


ACTIVATIONS = ("silu", "gelu_pytorch_tanh")   # HF names; llama.py maps them to JAX


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Static architecture description (hashable, so it can be a jit static argument)."""

  model_type: str = "llama"
  vocab_size: int = 256
  hidden_size: int = 64
  intermediate_size: int = 128
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 16
  rope_theta: float = 10000.0
  # RoPE scaling as sorted (key, value) pairs, e.g. (("factor", 8.0), ..., ("rope_type",
  # "llama3")); None = plain RoPE (families.read_rope).
  rope_scaling: tuple | None = None
  rms_eps: float = 1e-5
  tie_embeddings: bool = True
  qkv_bias: bool = False
  qk_norm: bool = False          # Qwen3: RMSNorm over head_dim on q and k, before RoPE
  # Attention windows: key k is seen from query q when q_pos - k_pos < window.
  # `sliding_window`: one window on every layer, applied by the callers' mask
  # (`llama.make_mask(..., window=cfg.sliding_window)`). `layer_windows`: per-layer windows
  # (an int or None per layer) for models that mix full and windowed layers; the model applies
  # them itself (`Llama.hidden`), so callers then pass the plain causal mask. At most one of
  # the two is set.
  sliding_window: int | None = None
  layer_windows: tuple | None = None
  # Gemma-style block (families.py sets these per family; the defaults are Llama's).
  hidden_act: str = "silu"       # MLP activation (HF name): silu | gelu_pytorch_tanh (GeGLU)
  norm_plus_one: bool = False    # RMSNorm scales by (1 + w); weights stored as HF stores them
  post_norms: bool = False       # RMSNorm on the attention and MLP outputs, before the residual
  embed_scale: bool = False      # embeddings times sqrt(hidden_size), in the compute dtype
  query_pre_attn_scalar: float | None = None   # scores scaled by this**-0.5 (None: head_dim)
  attn_softcap: float | None = None    # scores -> tanh(s / cap) * cap, before the mask
  final_softcap: float | None = None   # logits -> tanh(l / cap) * cap
  max_position_embeddings: int = 2048
  bos_token_id: int | None = 1
  eos_token_id: int | tuple[int, ...] | None = 2
  pad_token_id: int | None = None
  # Numerics / training knobs, not part of the HF file.
  dtype: str = "float32"         # activation / compute dtype
  param_dtype: str = "float32"   # storage dtype of the weights
  lora_rank: int = 0             # 0 = no LoRA adapters
  lora_alpha: float = 16.0
  lora_targets: tuple[str, ...] = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
  # Layers per lax.scan iteration in the full-sequence (training / scoring) pass; 0 = all of
  # them (fully unrolled: lower peak RSS; the speed gain is within noise, see WORKSPACE.md).
  scan_unroll: int = 0
  # Attention of many-token calls (training, scoring, prefill; decode keeps its own dots):
  # "einsum" (explicit dots, fp32 scores), "dot_product" (jax.nn.dot_product_attention: cuDNN
  # flash on GPU where it applies, XLA elsewhere), or "auto": dot_product on GPU, einsum
  # elsewhere. Gemma 2's score soft-cap always takes the einsum path.
  attention: str = "auto"

  def __post_init__(self):
    if self.layer_windows is not None:
      if len(self.layer_windows) != self.num_layers:
        raise ValueError(f"layer_windows has {len(self.layer_windows)} entries for "
                         f"{self.num_layers} layers.")
      if self.sliding_window is not None:
        raise ValueError("set sliding_window (one window on every layer) or layer_windows "
                         "(per layer), not both.")
      if any(w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 1)
             for w in self.layer_windows):
        raise ValueError(f"layer_windows={self.layer_windows!r}: a positive int or None "
                         f"per layer.")
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"hidden_act={self.hidden_act!r}; one of {sorted(ACTIVATIONS)}.")

  @property
  def windows(self) -> tuple:
    """The attention window of every layer (None: full attention)."""
    if self.layer_windows is not None:
      return tuple(self.layer_windows)
    return (self.sliding_window,) * self.num_layers

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def eos_ids(self) -> tuple[int, ...]:
    if self.eos_token_id is None:
      return ()
    if isinstance(self.eos_token_id, int):
      return (self.eos_token_id,)
    return tuple(self.eos_token_id)

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  def num_params(self, include_embedding: bool = True) -> int:
    d, f, l = self.hidden_size, self.intermediate_size, self.num_layers
    q = self.num_heads * self.head_dim
    kv = self.num_kv_heads * self.head_dim
    per_layer = d * q + 2 * d * kv + q * d + 3 * d * f + (4 if self.post_norms else 2) * d
    if self.qkv_bias:
      per_layer += q + 2 * kv
    if self.qk_norm:
      per_layer += 2 * self.head_dim
    n = l * per_layer + d
    if include_embedding:
      n += self.vocab_size * d * (1 if self.tie_embeddings else 2)
    return n

  def flops_per_token(self, seq_len: int, with_head: bool = True,
                      frozen_layers: int = 0) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), as in the PaLM appendix.
    The first `frozen_layers` blocks (train.freeze_layers) run forward only (1x, not 3x)."""
    n = self.num_params(include_embedding=False)
    fwd = 2 * n + 2 * self.num_layers * seq_len * self.num_heads * self.head_dim  # attn scores+values
    frac = frozen_layers / self.num_layers   # the blocks are all the non-embedding params
    total = fwd * (3.0 - 2.0 * frac)
    if with_head:
      total += 3.0 * 2 * self.hidden_size * self.vocab_size
    return total

  # ------------------------------------------------------------------ HF config.json
  @classmethod
  def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json", **overrides) -> "ModelConfig":
    fam = families.family(d.get("model_type"), source)
    d = {**dict(fam.defaults), **d}   # transformers' defaults for fields the file omits
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads"):
      if key not in d:
        raise UnsupportedModelError(f"{source}: required field {key!r} is missing.")
    for key, hi in _BOUNDS.items():
      if key in d and d[key] is not None:
        v = d[key]
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= hi:
          raise UnsupportedModelError(
              f"{source}: {key}={v!r} is out of bounds (an integer in [1, {hi}]).")
    if d["num_attention_heads"] % int(d.get("num_key_value_heads") or d["num_attention_heads"]):
      raise UnsupportedModelError(
          f"{source}: num_attention_heads={d['num_attention_heads']} is not a multiple of "
          f"num_key_value_heads={d.get('num_key_value_heads')}.")
    families.check_fields(d, fam, source)
    act = d.get(fam.act_key, fam.acts[0])
    if act not in fam.acts:
      raise UnsupportedModelError(f"{source}: {fam.act_key}={act!r}; only "
                                  f"{', '.join(fam.acts)} for model_type={fam.model_type!r}.")
    theta, scaling = families.read_rope(d, source)
    nh, nl = int(d["num_attention_heads"]), int(d["num_hidden_layers"])
    window, layer_windows = families.read_window(d, fam, nl, source)
    gemma = {}
    if fam.model_type == "gemma2":
      num = lambda k: None if d.get(k) is None else float(d[k])  # noqa: E731
      if num("query_pre_attn_scalar") is None:   # transformers raises on it too
        raise UnsupportedModelError(f"{source}: query_pre_attn_scalar=None; gemma2 needs one.")
      gemma = dict(query_pre_attn_scalar=num("query_pre_attn_scalar"),
                   attn_softcap=num("attn_logit_softcapping"),
                   final_softcap=num("final_logit_softcapping"))
    eos = d.get("eos_token_id")
    if isinstance(eos, list):
      eos = tuple(int(e) for e in eos)
    kw = dict(
        model_type=fam.model_type,
        vocab_size=int(d["vocab_size"]),
        hidden_size=int(d["hidden_size"]),
        intermediate_size=int(d["intermediate_size"]),
        num_layers=nl,
        num_heads=nh,
        num_kv_heads=int(d.get("num_key_value_heads") or nh),
        head_dim=int(d.get("head_dim") or d["hidden_size"] // nh),
        rope_theta=theta,
        rope_scaling=scaling,
        rms_eps=float(d.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(d.get("tie_word_embeddings", fam.tie_default)),
        qkv_bias=fam.qkv_bias,
        qk_norm=fam.qk_norm,
        sliding_window=window,
        layer_windows=layer_windows,
        hidden_act=act,
        norm_plus_one=fam.norm_plus_one,
        post_norms=fam.post_norms,
        embed_scale=fam.embed_scale,
        **gemma,
        max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=eos,
        pad_token_id=d.get("pad_token_id"),
    )
    kw.update(overrides)
    return cls(**kw)

  def to_hf_dict(self) -> dict[str, Any]:
    """config.json in the transformers 4.x layout (top-level rope_theta / rope_scaling), which
    transformers 5.x also reads."""
    fam = families.FAMILIES[self.model_type]
    block = {k: getattr(fam, k) for k in ("qkv_bias", "qk_norm", "norm_plus_one", "post_norms",
                                          "embed_scale")}
    if self.model_type != "gemma2":
      block.update(query_pre_attn_scalar=None, attn_softcap=None, final_softcap=None)
    off = {k: getattr(self, k) for k, v in block.items() if getattr(self, k) != v}
    if self.hidden_act not in fam.acts:
      off["hidden_act"] = self.hidden_act
    if off:
      raise ValueError(f"{off} cannot be written as a model_type={self.model_type!r} "
                       f"config.json (transformers would run a different block).")
    d = {
        "architectures": [fam.architecture],
        "model_type": self.model_type,
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "rope_theta": self.rope_theta,
        "rms_norm_eps": self.rms_eps,
        "tie_word_embeddings": self.tie_embeddings,
        "max_position_embeddings": self.max_position_embeddings,
        fam.act_key: self.hidden_act,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple)
        else self.eos_token_id,
        "pad_token_id": self.pad_token_id,
        "torch_dtype": "float32" if self.param_dtype == "float32" else "bfloat16",
        "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
    }
    if self.model_type == "llama":
      d.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    sizes = {w for w in self.windows if w is not None}
    if len(sizes) > 1:
      raise ValueError(f"layer_windows={self.layer_windows!r}: config.json holds one "
                       f"sliding_window size, not {sorted(sizes)}.")
    window = sizes.pop() if sizes else None
    types = ["full_attention" if w is None else "sliding_attention" for w in self.windows]
    if self.model_type == "mistral":
      if self.layer_windows is not None:
        raise ValueError("transformers' Mistral windows every layer or none; layer_windows "
                         "has no mistral config.json.")
      d["sliding_window"] = self.sliding_window
    if self.model_type in ("qwen2", "qwen3"):
      # Qwen windows layers i >= max_window_layers (0: every layer) unless layer_types says
      # otherwise (transformers 5.x reads layer_types; 4.x read max_window_layers, which
      # agrees when the windowed layers are the top ones).
      first = types.index("sliding_attention") if window else 0
      d.update(use_sliding_window=window is not None, sliding_window=window,
               max_window_layers=first)
      if self.layer_windows is not None:
        d["layer_types"] = types
    if self.model_type == "gemma2":
      d.update(sliding_window=window, layer_types=types, attention_bias=False,
               query_pre_attn_scalar=_int_if_whole(self.query_pre_attn_scalar),
               attn_logit_softcapping=self.attn_softcap,
               final_logit_softcapping=self.final_softcap)
    return d

  @classmethod
  def from_hf_dir(cls, path: str, **overrides) -> "ModelConfig":
    f = os.path.join(path, "config.json")
    if not os.path.isfile(f):
      raise FileNotFoundError(f"model folder {path!r} has no config.json ({f} missing).")
    size = os.path.getsize(f)
    if size > MAX_CONFIG_JSON_BYTES:
      raise UnsupportedModelError(f"{f}: {size} bytes, more than the {MAX_CONFIG_JSON_BYTES}"
                                  f"-byte limit for a config.json; refusing to parse it.")
    try:
      with open(f) as fh:
        d = json.load(fh)
    except json.JSONDecodeError as e:
      raise ValueError(f"{f}: not valid JSON ({e}).") from e
    if not isinstance(d, dict):
      raise UnsupportedModelError(f"{f}: expected a JSON object, got {type(d).__name__}.")
    cfg = cls.from_hf_dict(d, source=f, **overrides)
    if "eos_token_id" in overrides:
      return cfg
    # The stop ids: config.json's EOS first (the pad fallback), then generation_config.json's,
    # then the token that closes the chat template's assistant turn (tokenizer.chat_stop_ids).
    from catchjax.tokenizer import chat_stop_ids
    gen = _generation_eos(path) + chat_stop_ids(path)
    eos = tuple(dict.fromkeys(cfg.eos_ids + gen))
    if eos != cfg.eos_ids:
      cfg = cfg.replace(eos_token_id=eos if len(eos) > 1 else eos[0])
    return cfg


def _int_if_whole(v):
  """32.0 -> 32 (transformers types Gemma2Config.query_pre_attn_scalar as an int)."""
  return int(v) if isinstance(v, float) and v.is_integer() else v


def _generation_eos(path: str) -> tuple[int, ...]:
  """generation_config.json's eos_token_id(s) (e.g. Llama-3 Instruct's <|eot_id|>), or ()."""
  f = os.path.join(path, "generation_config.json")
  if not os.path.isfile(f) or os.path.getsize(f) > MAX_CONFIG_JSON_BYTES:
    return ()
  try:
    with open(f) as fh:
      eos = json.load(fh).get("eos_token_id")
  except (json.JSONDecodeError, AttributeError) as e:
    raise UnsupportedModelError(f"{f}: not a valid generation config ({e}).") from e
  eos = [eos] if isinstance(eos, int) else (eos or [])
  if not all(isinstance(e, int) and not isinstance(e, bool) for e in eos):
    raise UnsupportedModelError(f"{f}: eos_token_id={eos!r} must be integer token ids.")
  return tuple(eos)
