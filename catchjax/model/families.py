"""Model families: how each HF `model_type` maps onto catchjax's decoder.

A family is one `Family` entry: its architecture name, the config.json fields it reads beyond
the common ones, the fields it must see at their default, transformers' defaults for the fields
a config.json may omit (where they differ from the common ones), its activation, and its block
differences (q/k/v bias, q/k RMSNorm, Gemma's (1 + w) norms, post-attention / post-MLP norms and
scaled embedding). Adding a family is one entry here plus, where its block differs, one flag in
`ModelConfig` and its branch in `llama.py` (and its weight names in `hf.py`).

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
  # The config.json field that names the MLP activation, and the values this decoder runs.
  act_key: str = "hidden_act"
  acts: tuple = ("silu",)
  # transformers' config-class defaults for fields a config.json may omit ((field, value)
  # pairs), where they differ from ModelConfig.from_hf_dict's common fallbacks.
  defaults: tuple = ()
  norm_plus_one: bool = False     # RMSNorm scales by (1 + w) (Gemma)
  post_norms: bool = False        # RMSNorm on the attention / MLP outputs too (Gemma 2)
  embed_scale: bool = False       # embeddings times sqrt(hidden_size) (Gemma)


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
    "_from_model_config", "name_or_path", "_converted_from", "cache_implementation"})
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
    # Gemma 2: (1 + w) norms around attention and MLP, sqrt(hidden)-scaled embedding, GeGLU,
    # query_pre_attn_scalar, tanh soft-capping of attention scores and logits, sliding-window
    # attention on the layers `layer_types` names (default: even layers). transformers' Gemma2
    # takes its activation from `hidden_activation`; a `hidden_act` beside it (hub configs
    # carry both) is never read there, so it is not read here either.
    Family("gemma2", "Gemma2ForCausalLM",
           reads=frozenset({"sliding_window", "query_pre_attn_scalar", "attn_logit_softcapping",
                            "final_logit_softcapping", "hidden_activation"}),
           must_be_default=(("attention_bias", False), ("use_bidirectional_attention", False))
           + _NO_DROPOUT,
           act_key="hidden_activation", acts=("gelu_pytorch_tanh",),
           defaults=(("num_key_value_heads", 4), ("head_dim", 256), ("rms_norm_eps", 1e-6),
                     ("max_position_embeddings", 8192), ("pad_token_id", 0),
                     ("eos_token_id", 1), ("bos_token_id", 2),
                     ("hidden_activation", "gelu_pytorch_tanh"), ("query_pre_attn_scalar", 256),
                     ("sliding_window", 4096), ("final_logit_softcapping", 30.0),
                     ("attn_logit_softcapping", 50.0)),
           norm_plus_one=True, post_norms=True, embed_scale=True),
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


def read_window(d: dict, fam: Family, n_layers: int,
                source: str) -> tuple[int | None, tuple | None]:
  """(sliding_window, layer_windows): the attention window(s) as transformers applies them.

  Mistral: `sliding_window` on every layer (transformers' Mistral ignores `layer_types`, so a
  `layer_types` that disagrees is refused). Qwen2/3: the window on layers >= max_window_layers
  when use_sliding_window, or on the layers `layer_types` names. Gemma 2: on the layers
  `layer_types` names, by default the even ones. Llama: no window.
  One window on every layer (or none) is `sliding_window` (layer_windows None); a mix of full
  and windowed layers is `layer_windows`, the window (or None) of each layer."""
  window = d.get("sliding_window")
  given = list(d["layer_types"]) if d.get("layer_types") else None
  if given is not None and (len(given) != n_layers or
                            set(given) - {"full_attention", "sliding_attention"}):
    raise UnsupportedModelError(f"{source}: layer_types={given!r} is not one of "
                                f"'full_attention' / 'sliding_attention' per layer.")
  if fam.model_type == "mistral":
    types = ["sliding_attention" if window else "full_attention"] * n_layers
    if given is not None and given != types:
      raise UnsupportedModelError(
          f"{source}: layer_types={given!r} disagrees with sliding_window={window!r}; "
          f"transformers' Mistral ignores layer_types and windows every layer (a Ministral-"
          f"style alternating model is not model_type 'mistral').")
  elif fam.model_type in ("qwen2", "qwen3"):
    if not d.get("use_sliding_window"):
      window = None
    mwl = d.get("max_window_layers")
    mwl = n_layers if mwl is None else int(mwl)
    types = ["sliding_attention" if window and i >= mwl else "full_attention"
             for i in range(n_layers)]
  elif fam.model_type == "gemma2":
    types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]
  else:
    types = ["full_attention"] * n_layers
  if given is not None:
    types = given
  if "sliding_attention" in types and not window:
    raise UnsupportedModelError(f"{source}: sliding layers but no sliding_window size.")
  windows = tuple(int(window) if t == "sliding_attention" else None for t in types)
  if len(set(windows)) == 1:
    return windows[0], None
  return None, windows
