"""Model families against transformers + torch, on tiny random checkpoints that transformers
itself saves (so config.json is in the transformers 5.x layout, with `rope_parameters`), with
the math fields off their defaults: rope_theta != 10000, RoPE scaling, head_dim != hidden /
heads, q/k norms, a sliding window (on every layer, or on some: per-layer windows) and
max_position_embeddings shorter than the sequence; Gemma 2 with its (1 + w) sandwich norms,
scaled embedding, GeGLU, query_pre_attn_scalar != head_dim and both soft-caps.

Each case checks fp32 logits within 1e-4, equal greedy tokens from catchjax's KV-cache
sampler and transformers' generate, and that the legacy 4.x layout (top-level rope_theta /
rope_scaling) of the same file loads to the same model. Refusals are checked by name."""
import json
import os

import numpy as np
import pytest

from catchjax.model import hf
from catchjax.model.config import ModelConfig, UnsupportedModelError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SEQ = 24
SMALL = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=24, rms_norm_eps=1e-6,
             bos_token_id=1, eos_token_id=2, max_position_embeddings=16)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 8}
CASES = {
    "llama3_untied": ("LlamaConfig", "LlamaForCausalLM",
                      dict(rope_theta=500000.0, rope_scaling=LLAMA3, tie_word_embeddings=False)),
    "llama3_tied": ("LlamaConfig", "LlamaForCausalLM",
                    dict(rope_theta=500000.0, rope_scaling=LLAMA3, tie_word_embeddings=True)),
    "llama_theta_only": ("LlamaConfig", "LlamaForCausalLM",
                         dict(rope_theta=500000.0, tie_word_embeddings=False)),
    "llama_linear": ("LlamaConfig", "LlamaForCausalLM",
                     dict(rope_theta=50000.0, rope_scaling={"rope_type": "linear",
                                                            "factor": 4.0})),
    "qwen2_window": ("Qwen2Config", "Qwen2ForCausalLM",
                     dict(rope_theta=1e6, use_sliding_window=True, sliding_window=8,
                          max_window_layers=0, tie_word_embeddings=False)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM",
              dict(rope_theta=1e6, tie_word_embeddings=True)),
    "mistral_window": ("MistralConfig", "MistralForCausalLM",
                       dict(rope_theta=1e6, sliding_window=8, tie_word_embeddings=False)),
    # Per-layer windows: transformers windows Qwen layers >= max_window_layers (layer 1 of 2).
    "qwen2_mixed_window": ("Qwen2Config", "Qwen2ForCausalLM",
                           dict(rope_theta=1e6, use_sliding_window=True, sliding_window=8,
                                max_window_layers=1, tie_word_embeddings=False)),
    # Gemma 2: layer_types left to transformers' default (sliding on even layers, so 0 and 2
    # of 3); eager attention, the implementation with soft-capping. Larger projections and
    # norm weights (the 4th entry: matrix, embedding and norm scales) so that the attention
    # soft-cap acts (~1 in the logits if dropped), the window matters and greedy tokens vary.
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(num_hidden_layers=3, rope_theta=50000.0, query_pre_attn_scalar=32,
                    attn_logit_softcapping=20.0, final_logit_softcapping=15.0,
                    sliding_window=8, attn_implementation="eager"), (16.0, 4.0, 1.0)),
}
EAGER = {"gemma2"}   # loaded back with attn_implementation="eager" (soft-capping)


def _save(path, name):
  cfg_cls, model_cls, kw, *scales = CASES[name]
  mat, emb, vec = scales[0] if scales else (4.0, 4.0, 0.2)
  cfg = getattr(transformers, cfg_cls)(**{**SMALL, **kw})
  torch.manual_seed(0)
  model = getattr(transformers, model_cls)(cfg).eval()
  with torch.no_grad():   # norms (and biases) off 1 / 0, so every weight is exercised
    for n, p in model.named_parameters():
      if p.ndim == 1:
        p.add_(vec * torch.randn_like(p))
      else:              # larger weights: greedy outputs vary from step to step
        p.mul_(emb if "embed_tokens" in n else mat)
  model.save_pretrained(path)
  return model


def _legacy_layout(src, dst):
  """The same folder with config.json rewritten in the transformers 4.x layout."""
  import shutil
  shutil.copytree(src, dst)
  with open(os.path.join(src, "config.json")) as f:
    d = json.load(f)
  rp = dict(d.pop("rope_parameters"))
  d["rope_theta"] = rp.pop("rope_theta")
  d["rope_scaling"] = None if rp.get("rope_type") == "default" else rp
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(d, f)


def _logits(model, ids):
  import jax.numpy as jnp
  from catchjax.model import llama
  B, T = ids.shape
  pos = jnp.broadcast_to(jnp.arange(T), (B, T))
  mask = llama.make_mask(pos, pos, jnp.ones((B, T), bool), window=model.cfg.sliding_window)
  return np.asarray(model(jnp.asarray(ids), pos, mask)[0])


@pytest.mark.parametrize("name", sorted(CASES))
def test_family_parity_with_transformers(tmp_path, name):
  from catchjax.sample import Sampler, SamplingParams
  path = str(tmp_path / name)
  tm = _save(path, name)
  with open(os.path.join(path, "config.json")) as f:
    assert "rope_parameters" in json.load(f)      # the 5.x layout is what we test
  model = hf.load_hf(path)
  ids = np.random.default_rng(0).integers(3, 300, (2, SEQ))
  with torch.no_grad():
    ref = tm(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(_logits(model, ids), ref, atol=1e-4, rtol=0)
  # KV-cache greedy decode against transformers' generate (no EOS stop on either side).
  prompt = ids[0, :6]
  with torch.no_grad():
    gen = tm.generate(torch.tensor(prompt[None]), max_new_tokens=12, do_sample=False,
                      eos_token_id=None, pad_token_id=0)[0, 6:].numpy()
  ours = Sampler(model, batch_size=1, eos_ids=[], progress=False).generate(
      [list(prompt)], SamplingParams(max_new_tokens=12)).tokens[0]
  assert list(ours)[:12] == list(gen)
  legacy = str(tmp_path / (name + "_legacy"))
  _legacy_layout(path, legacy)
  assert ModelConfig.from_hf_dir(legacy) == model.cfg


def test_theta_is_read_from_rope_parameters(tmp_path):
  """The silent bug this file guards: a 5.x config with theta only in rope_parameters."""
  path = str(tmp_path / "l")
  _save(path, "llama_theta_only")
  cfg = ModelConfig.from_hf_dir(path)
  assert cfg.rope_theta == 500000.0 and cfg.rope_scaling is None
  assert ModelConfig.from_hf_dir(path, eos_token_id=5).eos_ids == (5,)


def _base_dict(**kw):
  d = dict(model_type="llama", **SMALL)
  d.update(kw)
  return d


@pytest.mark.parametrize("field,value,needle", [
    ("rope_scaling", {"rope_type": "dynamic", "factor": 2.0}, "'dynamic'"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "'yarn'"),
    ("rope_parameters", {"rope_theta": 1e4, "rope_type": "longrope"}, "'longrope'"),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0}, "missing"),
    ("rope_interleaved", True, "rope_interleaved"),
    ("some_new_knob", 3, "some_new_knob"),
    ("attention_bias", True, "attention_bias"),
    ("attention_dropout", 0.1, "attention_dropout"),
    ("quantization_config", {"quant_method": "gptq"}, "quantization_config"),
])
def test_math_fields_are_read_or_refused_by_name(field, value, needle):
  with pytest.raises(UnsupportedModelError, match=needle):
    ModelConfig.from_hf_dict(_base_dict(**{field: value}))


def test_inert_and_default_fields_pass():
  cfg = ModelConfig.from_hf_dict(_base_dict(
      initializer_range=0.5, use_cache=False, transformers_version="4.40.0",
      rope_interleaved=False, some_new_knob=None, attention_dropout=0.0))
  assert cfg.model_type == "llama"


def test_disagreeing_rope_layouts_refused():
  with pytest.raises(UnsupportedModelError, match="disagree"):
    ModelConfig.from_hf_dict(_base_dict(rope_theta=1e4,
                                        rope_parameters={"rope_theta": 5e5,
                                                         "rope_type": "default"}))


def test_qwen_window_follows_max_window_layers():
  """transformers windows Qwen layers i >= max_window_layers only; a mix is per-layer."""
  q = dict(_base_dict(model_type="qwen2"), use_sliding_window=True, sliding_window=8)
  c = ModelConfig.from_hf_dict(dict(q, max_window_layers=2))
  assert c.sliding_window is None and c.layer_windows is None
  c = ModelConfig.from_hf_dict(dict(q, max_window_layers=0))
  assert c.sliding_window == 8 and c.layer_windows is None
  c = ModelConfig.from_hf_dict(dict(q, max_window_layers=1))
  assert c.sliding_window is None and c.layer_windows == (None, 8) == c.windows
  # layer_types, when given, decides (transformers 5.x); without use_sliding_window no size.
  c = ModelConfig.from_hf_dict(dict(q, layer_types=["sliding_attention", "full_attention"]))
  assert c.layer_windows == (8, None)
  with pytest.raises(UnsupportedModelError, match="no sliding_window size"):
    ModelConfig.from_hf_dict(dict(q, use_sliding_window=False,
                                  layer_types=["sliding_attention", "full_attention"]))


def test_mistral_layer_types_must_agree_with_its_uniform_window():
  """transformers' Mistral ignores layer_types (it windows every layer): a disagreeing one is
  refused rather than run either way."""
  m = dict(_base_dict(model_type="mistral"), sliding_window=8)
  assert ModelConfig.from_hf_dict(
      dict(m, layer_types=["sliding_attention"] * 2)).sliding_window == 8
  with pytest.raises(UnsupportedModelError, match="ignores layer_types"):
    ModelConfig.from_hf_dict(dict(m, layer_types=["full_attention", "sliding_attention"]))


# A Gemma 2 config.json as transformers 4.42 wrote it for google/gemma-2-2b (sizes shrunk):
# hidden_act beside hidden_activation, cache_implementation, top-level rope_theta.
GEMMA2_HUB = {
    "architectures": ["Gemma2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "attn_logit_softcapping": 50.0, "bos_token_id": 2, "cache_implementation": "hybrid",
    "eos_token_id": 1, "final_logit_softcapping": 30.0, "head_dim": 256,
    "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 1024, "initializer_range": 0.02, "intermediate_size": 2048,
    "max_position_embeddings": 8192, "model_type": "gemma2", "num_attention_heads": 8,
    "num_hidden_layers": 4, "num_key_value_heads": 4, "pad_token_id": 0,
    "query_pre_attn_scalar": 224, "rms_norm_eps": 1e-06, "rope_theta": 10000.0,
    "sliding_window": 4096, "torch_dtype": "bfloat16", "transformers_version": "4.42.4",
    "use_cache": True, "vocab_size": 256000}


def test_gemma2_hub_config_reads_every_math_field():
  c = ModelConfig.from_hf_dict(GEMMA2_HUB)
  assert (c.model_type, c.hidden_act, c.head_dim, c.query_pre_attn_scalar) == \
      ("gemma2", "gelu_pytorch_tanh", 256, 224.0)
  assert (c.attn_softcap, c.final_softcap, c.tie_embeddings) == (50.0, 30.0, True)
  assert c.norm_plus_one and c.post_norms and c.embed_scale and not c.qkv_bias
  assert c.sliding_window is None and c.layer_windows == (4096, None, 4096, None)
  # Fields the file omits take transformers' Gemma2Config defaults, not the Llama ones.
  d = {k: v for k, v in GEMMA2_HUB.items() if k not in (
      "attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar",
      "sliding_window", "head_dim", "num_key_value_heads")}
  c = ModelConfig.from_hf_dict(d)
  assert (c.attn_softcap, c.final_softcap, c.query_pre_attn_scalar, c.head_dim,
          c.num_kv_heads, c.layer_windows[0]) == (50.0, 30.0, 256.0, 256, 4, 4096)
  # Soft-caps may be off (null); the rest is refused by name.
  c = ModelConfig.from_hf_dict(dict(GEMMA2_HUB, final_logit_softcapping=None))
  assert c.final_softcap is None
  for field, value, needle in [
      ("hidden_activation", "gelu", "hidden_activation='gelu'"),
      ("attention_bias", True, "attention_bias"),
      ("use_bidirectional_attention", True, "use_bidirectional_attention"),
      ("query_pre_attn_scalar", None, "query_pre_attn_scalar"),
      ("layer_types", ["sliding_attention"] * 3, "layer_types"),
      ("sliding_window", None, "no sliding_window size")]:
    with pytest.raises(UnsupportedModelError, match=needle):
      ModelConfig.from_hf_dict(dict(GEMMA2_HUB, **{field: value}))


def test_generation_config_eos_is_a_stop_id(tmp_path):
  path = str(tmp_path / "l")
  _save(path, "llama3_untied")
  with open(os.path.join(path, "generation_config.json"), "w") as f:
    json.dump({"eos_token_id": [2, 7]}, f)
  assert ModelConfig.from_hf_dir(path).eos_ids == (2, 7)


@pytest.mark.parametrize("name", ["llama3_untied", "qwen3", "qwen2_window",
                                  "qwen2_mixed_window", "gemma2"])
def test_export_round_trip_loads_in_transformers(tmp_path, name):
  """catchjax's own export of each family is read back by transformers as the same model."""
  path, out = str(tmp_path / "src"), str(tmp_path / "out")
  _save(path, name)
  model = hf.load_hf(path)
  hf.save_hf(model, out)
  assert ModelConfig.from_hf_dir(out) == model.cfg
  kw = dict(attn_implementation="eager") if name in EAGER else {}
  tm = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, **kw).eval()
  ids = np.random.default_rng(1).integers(3, 300, (1, SEQ))
  with torch.no_grad():
    ref = tm(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(_logits(model, ids), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", sorted(set(CASES) - EAGER))
def test_dot_product_attention_matches_the_einsum_path(tmp_path, name):
  """config.model.attention='dot_product' (jax.nn.dot_product_attention, issue 24 item 6):
  logits equal the einsum path's to float32 round-off and transformers' within 1e-4, and the
  KV-cache greedy decode (prefill through it) is unchanged."""
  from catchjax.sample import Sampler, SamplingParams
  path = str(tmp_path / name)
  tm = _save(path, name)
  ein, dp = hf.load_hf(path, attention="einsum"), hf.load_hf(path, attention="dot_product")
  ids = np.random.default_rng(1).integers(3, 300, (2, SEQ))
  with torch.no_grad():
    ref = tm(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(_logits(dp, ids), _logits(ein, ids), atol=2e-5, rtol=0)
  np.testing.assert_allclose(_logits(dp, ids), ref, atol=1e-4, rtol=0)
  prompts = [list(ids[0, :6]), list(ids[1, :9])]
  sp = SamplingParams(max_new_tokens=10)
  outs = [Sampler(m, batch_size=2, eos_ids=[], progress=False).generate(prompts, sp).tokens
          for m in (ein, dp)]
  assert outs[0] == outs[1]
