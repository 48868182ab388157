"""ModelConfig: the architecture of a Llama-family decoder, read from a Hugging Face config.json.

Supported families: llama (SmolLM2 is one), qwen2 (q/k/v bias) and mistral (optional sliding
window). Anything else is refused with an error that lists what is supported.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")


MAX_CONFIG_JSON_BYTES = 1 << 20   # HF config.json files are a few KB
# Upper bounds for config.json sizes (far above any Llama / Qwen2 / Mistral release), so a
# corrupt or hostile config cannot ask for absurd allocations.
_BOUNDS = {"vocab_size": 1 << 22, "hidden_size": 1 << 16, "intermediate_size": 1 << 18,
           "num_hidden_layers": 1024, "num_attention_heads": 1024,
           "num_key_value_heads": 1024, "head_dim": 4096,
           "max_position_embeddings": 1 << 24}


class UnsupportedModelError(ValueError):
  """Raised for a config.json whose model_type or options this decoder cannot run."""


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
  rms_eps: float = 1e-5
  tie_embeddings: bool = True
  qkv_bias: bool = False
  sliding_window: int | None = None
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
  remat: str = "none"            # none | full | dots (see llama.REMAT_POLICIES)
  # Training graph only: the first `frozen_layers` blocks (and the embedding lookup's input
  # role) get no gradient; they run forward only, under stop_gradient (train.freeze_layers).
  frozen_layers: int = 0
  # Layers per lax.scan iteration in the full-sequence (training / scoring) pass; 0 = all of
  # them (fully unrolled: lower peak RSS; the speed gain is within noise, see WORKSPACE.md).
  scan_unroll: int = 0

  def without_training_knobs(self) -> "ModelConfig":
    """This config with the training-graph knobs (remat, frozen blocks) at their defaults:
    two models equal under it have the same weights and the same inference math."""
    return self.replace(remat="none", frozen_layers=0)

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
    per_layer = d * q + 2 * d * kv + q * d + 3 * d * f + 2 * d
    if self.qkv_bias:
      per_layer += q + 2 * kv
    n = l * per_layer + d
    if include_embedding:
      n += self.vocab_size * d * (1 if self.tie_embeddings else 2)
    return n

  def flops_per_token(self, seq_len: int, with_head: bool = True) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), as in the PaLM appendix.
    Blocks frozen by `frozen_layers` run forward only (1x instead of 3x)."""
    n = self.num_params(include_embedding=False)
    fwd = 2 * n + 2 * self.num_layers * seq_len * self.num_heads * self.head_dim  # attn scores+values
    frac = self.frozen_layers / self.num_layers   # the blocks are all the non-embedding params
    total = fwd * (3.0 - 2.0 * frac)
    if with_head:
      total += 3.0 * 2 * self.hidden_size * self.vocab_size
    return total

  # ------------------------------------------------------------------ HF config.json
  @classmethod
  def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json", **overrides) -> "ModelConfig":
    mt = d.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
      raise UnsupportedModelError(
          f"{source}: model_type={mt!r} is not supported; supported model types are "
          f"{', '.join(SUPPORTED_MODEL_TYPES)}.")
    rs = d.get("rope_scaling")
    if rs not in (None, {}) and (rs.get("rope_type", rs.get("type")) not in (None, "default")):
      raise UnsupportedModelError(
          f"{source}: rope_scaling={rs!r} is not supported (only unscaled rotate-half RoPE).")
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
    nh = int(d["num_attention_heads"])
    head_dim = d.get("head_dim") or d["hidden_size"] // nh
    sliding = None
    if mt == "mistral":
      sliding = d.get("sliding_window")
    elif mt == "qwen2" and d.get("use_sliding_window"):
      sliding = d.get("sliding_window")
    if d.get("attention_bias") and mt == "llama":
      raise UnsupportedModelError(f"{source}: llama attention_bias=true is not supported.")
    if d.get("hidden_act", "silu") != "silu":
      raise UnsupportedModelError(f"{source}: hidden_act={d.get('hidden_act')!r}; only silu.")
    eos = d.get("eos_token_id")
    if isinstance(eos, list):
      eos = tuple(int(e) for e in eos)
    kw = dict(
        model_type=mt,
        vocab_size=int(d["vocab_size"]),
        hidden_size=int(d["hidden_size"]),
        intermediate_size=int(d["intermediate_size"]),
        num_layers=int(d["num_hidden_layers"]),
        num_heads=nh,
        num_kv_heads=int(d.get("num_key_value_heads") or nh),
        head_dim=int(head_dim),
        rope_theta=float(d.get("rope_theta", 10000.0)),
        rms_eps=float(d.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(d.get("tie_word_embeddings", mt != "mistral")),
        qkv_bias=(mt == "qwen2"),
        sliding_window=int(sliding) if sliding else None,
        max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=eos,
        pad_token_id=d.get("pad_token_id"),
    )
    kw.update(overrides)
    return cls(**kw)

  def to_hf_dict(self) -> dict[str, Any]:
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "mistral": "MistralForCausalLM"}[self.model_type]
    d = {
        "architectures": [arch],
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
        "hidden_act": "silu",
        "bos_token_id": self.bos_token_id,
        "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple)
        else self.eos_token_id,
        "pad_token_id": self.pad_token_id,
        "torch_dtype": "float32" if self.param_dtype == "float32" else "bfloat16",
        "rope_scaling": None,
    }
    if self.model_type == "llama":
      d.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    if self.model_type == "mistral":
      d["sliding_window"] = self.sliding_window
    if self.model_type == "qwen2":
      d.update(use_sliding_window=self.sliding_window is not None,
               sliding_window=self.sliding_window, max_window_layers=self.num_layers)
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
    return cls.from_hf_dict(d, source=f, **overrides)
