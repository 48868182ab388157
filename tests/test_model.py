"""Model engine: parity with transformers PyTorch, HF folder I/O, GGUF conversion, tokenizer."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from catchjax.model import hf, llama
from catchjax.model.config import ModelConfig, UnsupportedModelError
from catchjax.model.forward import TrainGraph
from catchjax.model.gguf import permute_qk, unpermute_qk


def _tiny(**kw):
  base = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_layers=2,
              num_heads=4, num_kv_heads=4, head_dim=16, rope_theta=10000.0, rms_eps=1e-6,
              tie_embeddings=True, eos_token_id=2, bos_token_id=1, max_position_embeddings=256)
  base.update(kw)
  return ModelConfig(**base)


def _jax_logits(model, ids, graph=None):
  ids = jnp.asarray(ids)
  B, T = ids.shape
  pos = jnp.broadcast_to(jnp.arange(T), (B, T))
  mask = llama.make_mask(pos, pos, jnp.ones((B, T), bool), window=model.cfg.sliding_window)
  if graph is None:
    logits, _ = model(ids, pos, mask)
  else:   # the training step's remat and frozen blocks: the same numbers
    logits = model.logits(model.hidden(ids, pos, mask, graph=graph)[0])
  return np.asarray(logits)


def _torch_logits(path, ids):
  import torch
  from transformers import AutoModelForCausalLM
  tm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
  tm.eval()
  with torch.no_grad():
    return tm(torch.tensor(np.asarray(ids))).logits.numpy()


PARITY = {
    "llama_mha_tied": _tiny(),
    "llama_gqa_tied": _tiny(num_kv_heads=2),
    "llama_gqa_untied": _tiny(num_kv_heads=1, tie_embeddings=False),
    "qwen2_gqa": _tiny(model_type="qwen2", num_kv_heads=2, tie_embeddings=False,
                       qkv_bias=True, rope_theta=1e6),
    "mistral_gqa": _tiny(model_type="mistral", num_kv_heads=2, tie_embeddings=False),
}


@pytest.mark.parametrize("name", sorted(PARITY))
def test_parity_with_transformers(tmp_path, name):
  cfg = PARITY[name]
  path = str(tmp_path / name)
  hf.save_random_hf(cfg, path, seed=1)
  model = hf.load_hf(path)
  assert model.cfg.model_type == cfg.model_type and model.cfg.qkv_bias == cfg.qkv_bias
  ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 24))
  ours, ref = _jax_logits(model, ids), _torch_logits(path, ids)
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_packed_segments_equal_separate_forwards():
  model = llama.Llama(_tiny(num_kv_heads=2))
  rng = np.random.default_rng(0)
  a, b = rng.integers(0, 300, 7), rng.integers(0, 300, 5)
  seg = jnp.asarray([[1] * 7 + [2] * 5 + [0] * 4])
  toks = jnp.asarray([list(a) + list(b) + [0] * 4])
  pos, mask = llama.packed_inputs(seg)
  packed, _ = model(toks, pos, mask)
  la, lb = _jax_logits(model, a[None]), _jax_logits(model, b[None])
  np.testing.assert_allclose(np.asarray(packed[0, :7]), la[0], atol=1e-5)
  np.testing.assert_allclose(np.asarray(packed[0, 7:12]), lb[0], atol=1e-5)


def test_per_layer_windows():
  """`layer_windows` (applied inside the model) on every path: the same window on every layer
  equals `sliding_window` in the caller's mask, bitwise; a mix runs under packing, frozen
  blocks with remat, a rolled scan and the KV-cache sampler, with the same numbers."""
  from flax import nnx
  from catchjax.sample import Sampler, SamplingParams
  def make(cfg):   # larger weights than the init: logits spread, greedy tokens vary
    m = llama.Llama(cfg, nnx.Rngs(0))
    for name in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"):
      v = getattr(m.layers, name)
      v[...] = 6.0 * v[...]
    m.embed[...] = 20.0 * m.embed[...]
    return m
  ids = np.random.default_rng(2).integers(0, 300, (2, 14))
  uni = make(_tiny(num_layers=3, sliding_window=4))
  per = make(_tiny(num_layers=3, layer_windows=(4, 4, 4)))
  np.testing.assert_array_equal(_jax_logits(uni, ids), _jax_logits(per, ids))
  mixed = _tiny(num_layers=3, layer_windows=(None, 4, None))
  m = make(mixed)
  ref = _jax_logits(m, ids)
  assert np.abs(ref - _jax_logits(make(_tiny(num_layers=3)), ids)).max() > 1e-2  # window acts
  assert np.abs(ref - _jax_logits(uni, ids)).max() > 1e-2     # ... on layer 1 only
  np.testing.assert_allclose(_jax_logits(make(mixed.replace(scan_unroll=1)), ids), ref, atol=1e-4)
  np.testing.assert_allclose(_jax_logits(m, ids, graph=TrainGraph("full", 2)), ref, atol=1e-4)
  # Packed rows: each segment's positions restart, so its window is its own.
  seg = jnp.asarray([[1] * 9 + [2] * 5 + [0] * 2])
  toks = jnp.asarray([list(ids[0, :9]) + list(ids[1, :5]) + [0, 0]])
  pos, mask = llama.packed_inputs(seg, window=mixed.sliding_window)
  packed = np.asarray(m(toks, pos, mask)[0])
  np.testing.assert_allclose(packed[0, :9], _jax_logits(m, ids[:1, :9])[0], atol=1e-4)
  np.testing.assert_allclose(packed[0, 9:14], _jax_logits(m, ids[1:, :5])[0], atol=1e-4)
  # KV-cache prefill and decode: greedy tokens equal the argmax of full forwards.
  prompt = list(ids[0, :5])
  out = Sampler(m, batch_size=1, eos_ids=[], progress=False).generate(
      [prompt], SamplingParams(max_new_tokens=8)).tokens[0]
  seq = list(prompt)
  for _ in range(8):
    seq.append(int(_jax_logits(m, np.asarray([seq]))[0, -1].argmax()))
  assert list(out) == seq[5:]
  with pytest.raises(ValueError, match="not both"):
    _tiny(sliding_window=4, layer_windows=(4, None))
  with pytest.raises(ValueError, match="entries for 2 layers"):
    _tiny(layer_windows=(4,))


def test_scan_unroll_changes_speed_not_results():
  from flax import nnx
  m1 = llama.Llama(_tiny(num_layers=4, scan_unroll=1), nnx.Rngs(0))   # a rolled loop
  m2 = llama.Llama(_tiny(num_layers=4), nnx.Rngs(0))                  # default: unrolled
  assert m2.cfg.scan_unroll == 0
  ids = np.random.default_rng(1).integers(0, 300, (2, 9))
  np.testing.assert_allclose(_jax_logits(m1, ids), _jax_logits(m2, ids), atol=1e-5)


def test_export_roundtrip_and_sharded_index(tmp_path):
  cfg = _tiny(num_kv_heads=2, tie_embeddings=False)
  src = str(tmp_path / "src")
  m0 = hf.save_random_hf(cfg, src, seed=3)
  # Re-save as a two-shard checkpoint with an index, as large hub models are.
  from safetensors.numpy import load_file, save_file
  t = load_file(os.path.join(src, "model.safetensors"))
  keys = sorted(t)
  shard = str(tmp_path / "sharded")
  os.makedirs(shard)
  halves = {"model-00001-of-00002.safetensors": keys[::2],
            "model-00002-of-00002.safetensors": keys[1::2]}
  wm = {}
  for fn, ks in halves.items():
    save_file({k: t[k] for k in ks}, os.path.join(shard, fn))
    wm.update({k: fn for k in ks})
  with open(os.path.join(shard, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": wm}, f)
  with open(os.path.join(src, "config.json")) as f:
    cj = f.read()
  with open(os.path.join(shard, "config.json"), "w") as f:
    f.write(cj)
  m1 = hf.load_hf(shard)
  ids = np.arange(20)[None] % 300
  np.testing.assert_array_equal(_jax_logits(m0, ids), _jax_logits(m1, ids))


def test_lora_export_merges_adapters(tmp_path):
  cfg = _tiny(num_kv_heads=2)
  src = str(tmp_path / "base")
  hf.save_random_hf(cfg, src, seed=0)
  m = hf.load_hf(src, lora_rank=4)
  # Nudge one adapter so the merge is non-trivial.
  m.layers.lora_b_wq[...] = 0.05 * jnp.ones_like(m.layers.lora_b_wq[...])
  ids = np.arange(16)[None]
  before = _jax_logits(m, ids)
  out = str(tmp_path / "merged")
  hf.save_hf(m, out)
  merged = hf.load_hf(out)
  assert merged.cfg.lora_rank == 0
  np.testing.assert_allclose(_jax_logits(merged, ids), before, atol=1e-4)
  assert not np.allclose(_jax_logits(hf.load_hf(src), ids), before, atol=1e-3)


def test_unsupported_model_type_lists_supported(tmp_path):
  with pytest.raises(UnsupportedModelError, match="llama, qwen2, qwen3, mistral"):
    ModelConfig.from_hf_dict({"model_type": "gpt2", "vocab_size": 10})


def test_missing_and_corrupt_files_are_named(tmp_path):
  cfg = _tiny()
  path = str(tmp_path / "m")
  hf.save_random_hf(cfg, path)
  st = os.path.join(path, "model.safetensors")
  data = open(st, "rb").read()
  with open(st, "wb") as f:
    f.write(data[: len(data) // 2])
  with pytest.raises(hf.CheckpointError, match="model.safetensors"):
    hf.load_hf(path)
  os.remove(st)
  with pytest.raises(hf.CheckpointError, match="neither model.safetensors"):
    hf.load_hf(path)
  os.remove(os.path.join(path, "config.json"))
  with pytest.raises(FileNotFoundError, match="config.json"):
    hf.load_hf(path)


def test_gguf_qk_permutation_is_inverted():
  w = np.random.default_rng(0).standard_normal((3 * 64, 10)).astype(np.float32)
  p = permute_qk(w, 3)
  assert not np.array_equal(p, w)
  np.testing.assert_array_equal(unpermute_qk(p, 3), w)


def test_gguf_unsupported_quant_is_refused(tmp_path):
  import gguf
  from catchjax.model.gguf import GGUFError, gguf_to_hf
  path = str(tmp_path / "x.gguf")
  w = gguf.GGUFWriter(path, "llama")
  w.add_block_count(1)
  w.add_embedding_length(32)
  w.add_head_count(2)
  w.add_feed_forward_length(64)
  w.add_token_list(["a", "b", "c", "d"])
  w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32),
               raw_dtype=gguf.GGMLQuantizationType.F32)
  w.add_tensor("blk.0.attn_q.weight", np.zeros((4, 66), np.uint8),
               raw_dtype=gguf.GGMLQuantizationType.IQ2_XXS)
  w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
  with pytest.raises(GGUFError, match="IQ2_XXS.*not supported"):
    gguf_to_hf(path, str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out")


def test_gguf_missing_metadata_is_named(tmp_path):
  import gguf
  from catchjax.model.gguf import GGUFError, gguf_to_hf
  path = str(tmp_path / "y.gguf")
  w = gguf.GGUFWriter(path, "llama")
  w.add_block_count(1)
  w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
  with pytest.raises(GGUFError, match="llama.embedding_length"):
    gguf_to_hf(path, str(tmp_path / "out"))


# ------------------------------------------------------------------ real SmolLM2
@pytest.mark.real_model
def test_real_smollm2_matches_transformers(smollm2, smollm2_dir):
  model, tok = smollm2
  from catchjax.tokenizer import prompt_ids
  ids = np.asarray([prompt_ids(tok, "Name three colours of the rainbow.")])
  ours, ref = _jax_logits(model, ids), _torch_logits(smollm2_dir, ids)
  # fp32 through 30 layers; logits reach ~40 in magnitude.
  np.testing.assert_allclose(ours, ref, atol=2e-3, rtol=0)
  assert (ours.argmax(-1) == ref.argmax(-1)).mean() == 1.0


@pytest.mark.real_model
def test_tokenizer_roundtrip_and_chat_template(smollm2):
  _, tok = smollm2
  from catchjax.tokenizer import chat_text, prompt_ids
  for s in ["Hello world!", "Digits 12345 split, naïve café ünïcode 😀", "  two  spaces\nnew"]:
    assert tok.decode(tok(s, add_special_tokens=False)["input_ids"]) == s
  # SmolLM's pre-tokenizer splits digits individually.
  assert len(tok("12345", add_special_tokens=False)["input_ids"]) == 5
  text = chat_text(tok, "Hi?", system="Be brief.")
  assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n" \
                 "<|im_start|>assistant\n"
  ids = prompt_ids(tok, "Hi?", system="Be brief.")
  assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") == 1
  assert tok.convert_tokens_to_ids("<|im_end|>") == tok.eos_token_id == 2
  # The default template inserts SmolLM's own system prompt when none is given.
  assert "named SmolLM" in chat_text(tok, "Hi?", system=None)
