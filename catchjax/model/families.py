"""Model families: how each HF `model_type` maps onto catchjax's decoder.

A family is one `Family` entry: its architecture name, the config.json fields it reads beyond
the common ones, the fields it must see at their default, and its block differences (q/k/v
bias, q/k RMSNorm). Adding a family is one entry here plus, where its block differs, one
flag in `ModelConfig` and its branch in `llama.py`.

Every config.json field that can change the math is either read or refused: a field no
family reads and no allowlist names is refused by name unless it holds a default-like value
(None, False, 0, empty), whichever transformers version wrote the file (the 4.x top-level
`rope_theta` / `rope_scaling`, or the 5.x `rope_parameters`).
"""
from __future__ import annotations

import dataclasses
from typing import Any


class UnsupportedModelError(ValueError):
  """Raised for a config.json whose model_type or options this decoder cannot run."""


@dataclasses.dataclass(frozen=True)
class Family:
  model_type: str
  architecture: str
  reads: frozenset = frozenset()            # family-specific fields read into ModelConfig
  must_be_default: tuple = ()               # (field, default) pairs this decoder cannot vary
  qkv_bias: bool = False
  qk_norm: bool = False
  tie_default: bool = True


# Read by every family (ModelConfig.from_hf_dict maps them).
COMMON_READS = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
    "tie_word_embeddings", "max_position_embeddings", "bos_token_id", "eos_token_id",
    "pad_token_id", "hidden_act", "rope_theta", "rope_scaling", "rope_parameters",
    "layer_types"})
# Known not to change the forward math (bookkeeping, dtype of the file, caching, the
# tensor-parallel slicing of the original Llama release, which computes the same products).
INERT = frozenset({
    "architectures", "model_type", "dtype", "torch_dtype", "transformers_version",
    "initializer_range", "use_cache", "_name_or_path", "output_attentions",
    "output_hidden_states", "return_dict", "pretraining_tp", "tokenizer_class",
    "is_llama_config", "transformers.js_config", "_attn_implementation", "auto_map",
    "_from_model_config", "name_or_path", "_converted_from"})
# Training-only: catchjax applies no dropout, so a non-zero value is refused.
_NO_DROPOUT = (("attention_dropout", 0.0),)
_SLIDING = frozenset({"use_sliding_window", "sliding_window", "max_window_layers"})

FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("llama", "LlamaForCausalLM",
           must_be_default=(("attention_bias", False), ("mlp_bias", False)) + _NO_DROPOUT),
    Family("qwen2", "Qwen2ForCausalLM", reads=_SLIDING, qkv_bias=True,
           must_be_default=_NO_DROPOUT),
    Family("qwen3", "Qwen3ForCausalLM", reads=_SLIDING, qk_norm=True,
           must_be_default=(("attention_bias", False),) + _NO_DROPOUT),
    Family("mistral", "MistralForCausalLM", reads=frozenset({"sliding_window"}),
           tie_default=False, must_be_default=_NO_DROPOUT),
)}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)


def family(model_type: Any, source: str) -> Family:
  if model_type not in FAMILIES:
    raise UnsupportedModelError(
        f"{source}: model_type={model_type!r} is not supported; supported model types are "
        f"{', '.join(SUPPORTED_MODEL_TYPES)}.")
  return FAMILIES[model_type]


def _default_like(v) -> bool:
  return v is None or v is False or (not isinstance(v, bool) and v == 0) or v in ("", [], {})


def check_fields(d: dict, fam: Family, source: str) -> None:
  """Refuse, by name, any field that is neither read, inert, nor at a default-like value."""
  for key, default in fam.must_be_default:
    if key in d and d[key] not in (None, default):
      raise UnsupportedModelError(
          f"{source}: {key}={d[key]!r} is not supported for model_type={fam.model_type!r} "
          f"(only {default!r}).")
  known = COMMON_READS | INERT | fam.reads | {k for k, _ in fam.must_be_default}
  for key in sorted(d):
    if key not in known and not _default_like(d[key]):
      raise UnsupportedModelError(
          f"{source}: field {key}={d[key]!r} is not understood for model_type="
          f"{fam.model_type!r}; refusing rather than ignoring a field that may change the "
          f"math (if it does not, add it to INERT in catchjax/model/families.py).")


# ------------------------------------------------------------------ RoPE
ROPE_KEYS = {"default": (), "linear": ("factor",),
             "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                        "original_max_position_embeddings")}


def read_rope(d: dict, source: str) -> tuple[float, tuple | None]:
  """(theta, scaling) from either layout; scaling is a sorted tuple of (key, value) pairs
  (hashable, so it can sit in a static config) or None for plain RoPE."""
  params = d.get("rope_parameters")
  legacy = d.get("rope_scaling")
  if params and legacy and dict(legacy) != {k: v for k, v in params.items()
                                             if k != "rope_theta"}:
    raise UnsupportedModelError(
        f"{source}: rope_scaling={legacy!r} and rope_parameters={params!r} disagree.")
  p = dict(params or legacy or {})
  theta = p.pop("rope_theta", None)
  top = d.get("rope_theta")
  if theta is not None and top is not None and float(theta) != float(top):
    raise UnsupportedModelError(
        f"{source}: rope_theta={top!r} and rope_parameters.rope_theta={theta!r} disagree.")
  theta = float(theta if theta is not None else (top if top is not None else 10000.0))
  rtype = p.pop("rope_type", p.pop("type", "default"))
  if rtype not in ROPE_KEYS:
    raise UnsupportedModelError(
        f"{source}: RoPE type {rtype!r} is not supported (supported: "
        f"{', '.join(ROPE_KEYS)}; dynamic, yarn and longrope scaling are refused).")
  prf = p.pop("partial_rotary_factor", 1.0)
  if prf not in (None, 1, 1.0):
    raise UnsupportedModelError(f"{source}: partial_rotary_factor={prf!r} is not supported.")
  need = ROPE_KEYS[rtype]
  extra = sorted(k for k in p if k not in need and not _default_like(p[k]))
  missing = [k for k in need if k not in p]
  if extra or missing:
    raise UnsupportedModelError(
        f"{source}: RoPE {rtype!r} needs exactly {list(need)}; "
        f"unknown {extra}, missing {missing}.")
  if rtype == "default":
    return theta, None
  return theta, tuple(sorted([("rope_type", rtype)] + [(k, p[k]) for k in need]))


def read_window(d: dict, fam: Family, n_layers: int, source: str) -> int | None:
  """The attention window, as transformers applies it: Mistral's `sliding_window` on every
  layer; Qwen's on layers >= max_window_layers when use_sliding_window; `layer_types` when
  given. Per-layer mixes of full and windowed layers are refused (not implemented yet)."""
  window = d.get("sliding_window")
  if fam.model_type == "mistral":
    types = ["sliding_attention" if window else "full_attention"] * n_layers
  elif fam.model_type in ("qwen2", "qwen3"):
    if not d.get("use_sliding_window"):
      window = None
    mwl = d.get("max_window_layers")
    mwl = n_layers if mwl is None else int(mwl)
    types = ["sliding_attention" if window and i >= mwl else "full_attention"
             for i in range(n_layers)]
  else:
    types = ["full_attention"] * n_layers
  if d.get("layer_types"):
    types = list(d["layer_types"])
    if len(types) != n_layers or set(types) - {"full_attention", "sliding_attention"}:
      raise UnsupportedModelError(f"{source}: layer_types={types!r} is not one of "
                                  f"'full_attention' / 'sliding_attention' per layer.")
  kinds = set(types)
  if kinds == {"full_attention"}:
    return None
  if len(kinds) > 1:
    raise UnsupportedModelError(
        f"{source}: layers mix full and sliding-window attention ({types}); per-layer "
        f"windows are not supported yet.")
  if not window:
    raise UnsupportedModelError(f"{source}: sliding layers but no sliding_window size.")
  return int(window)
