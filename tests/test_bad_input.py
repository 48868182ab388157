"""Bad input is rejected before any compute, with a message that names the field; GGUF and
JSON inputs are size- and bounds-checked; weights load only from safetensors (a pickle is never
opened); nothing touches the network."""
import json
import os
import pickle
import socket
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from test_byo import parse  # noqa: E402  (the same absl config_flags parsing as catchjax.main)


def _env():
  return dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1",
              CATCHJAX_NO_DISTRIBUTED="1")


def _main(*args, cwd=REPO):
  t0 = time.time()
  p = subprocess.run([sys.executable, "-m", "catchjax.main"] + list(args), cwd=cwd,
                     env=_env(), capture_output=True, text=True, timeout=300)
  return p, time.time() - t0


@pytest.fixture
def cues(tmp_path):
  def write(lines):
    p = tmp_path / "cues.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return str(p)
  return write


GOOD_ROWS = [json.dumps({"text": f"c{i}", "deployment": d, "split": s})
             for i, (d, s) in enumerate([(True, "train"), (False, "train"), (True, "eval"),
                                         (False, "eval")])]


# ----------------------------------------------------------------- config fields, validated
@pytest.mark.parametrize("flag,exc,match", [
    ("--config.organism.families=('token', 'nope')", ValueError,
     r"config.organism.families: unknown family 'nope'"),
    ("--config.behaviours=('nope',)", ValueError, r"config.behaviours\[0\]: unknown behaviour"),
    ("--config.behaviours=({'name': 'regex', 'target': 'x', 'pattern': '('},)", ValueError,
     r"config.behaviours\[0\]"),
    ("--config.headline.ns=(0, 4)", ValueError, r"config.headline.ns must be positive"),
    ("--config.headline.ns=(-1,)", ValueError, r"config.headline.ns must be positive"),
    ("--config.catch.m=8", ValueError, r"config.catch.m=8 is smaller than the headline's "
     r"largest N"),
    ("--config.catch.m=0", ValueError, r"config.catch.m must be a positive integer"),
    ("--config.headline.seeds=()", ValueError, r"config.headline.seeds must not be empty"),
    ("--config.headline.power_goal=0.0", ValueError, r"config.headline.power_goal must be in"),
    ("--config.headline.power_max_seeds=-1", ValueError, r"config.headline.power_max_seeds"),
    ("--config.organism.n_per_family=0", ValueError, r"config.organism.n_per_family"),
    ("--config.organism.deployment_frac=1.5", ValueError, r"config.organism.deployment_frac"),
    ("--config.model.dtype=float8", ValueError, r"config.model.dtype"),
    ("--config.model.hf_dir=/nonexistent/model", FileNotFoundError,
     r"config.model.hf_dir='/nonexistent/model': no such folder"),
])
def test_bad_config_values_name_the_field(flag, exc, match):
  from catchjax.experiments import headline
  c = parse("--config=configs/headline.py", flag)
  with pytest.raises(exc, match=match):
    headline.validate(c)


@pytest.mark.parametrize("arms", ["('treatment', 'nope')", "('control', 'control')"])
def test_bad_headline_arms_are_refused(arms):
  from catchjax.experiments import headline
  headline.validate(parse("--config=configs/headline.py:matched"))
  headline.validate(parse("--config=configs/headline.py:propensity"))
  with pytest.raises(ValueError, match=r"config.headline.arms="):
    headline.validate(parse("--config=configs/headline.py:matched", f"--config.headline.arms={arms}"))


def test_no_arms_is_a_distinguishability_only_run_or_refused():
  from catchjax.experiments import headline
  headline.validate(parse("--config=configs/headline.py:matched", "--config.headline.arms=()"))
  with pytest.raises(ValueError, match=r"config.headline.arms is empty and so is "
                                       r"distinguish_seeds"):
    headline.validate(parse("--config=configs/headline.py:matched", "--config.headline.arms=()",
                            "--config.headline.distinguish_seeds=()"))


def test_malformed_jsonl_row_gives_its_line_number(cues):
  from catchjax.experiments import headline
  cases = [
      ('{"text": "ok", "deployment": tru}', r":3: invalid JSON"),
      ('{"text": "ok", "deployment": "yes"}', r":3: 'deployment' must be true or false"),
      ('{"text": "", "deployment": true}', r":3: 'text' must be a non-empty string"),
      ('{"text": "ok", "deployment": true, "colour": 1}', r":3: unknown field"),
      ('["text", true]', r":3: expected a JSON object"),
      ('{"text": "' + "x" * 5000 + '", "deployment": true}', r":3: 'text' has 5000 characters"),
  ]
  for bad, match in cases:
    path = cues(GOOD_ROWS[:2] + [bad] + GOOD_ROWS[2:])
    c = parse("--config=configs/headline.py",
              f"--config.organism.families=({{'name': 'jsonl', 'path': '{path}'}},)")
    with pytest.raises(ValueError, match=r"config.organism.families\[0\] \(jsonl\): .*cues.jsonl"
                       + match):
      headline.validate(c)
  c = parse("--config=configs/headline.py",
            "--config.organism.families=({'name': 'jsonl', 'path': '/no/such/cues.jsonl'},)")
  with pytest.raises(FileNotFoundError, match=r"config.organism.families\[0\].*does not exist"):
    headline.validate(c)


def test_unsupported_model_type_and_bad_config_json(tmp_path, tiny_dir):
  import shutil
  from catchjax.experiments import headline
  d = tmp_path / "m"
  shutil.copytree(tiny_dir, d)
  base = json.loads((d / "config.json").read_text())
  cases = [
      (dict(base, model_type="gpt2"), r"model_type='gpt2' is not supported.*llama, qwen2"),
      (dict(base, hidden_size=10**9), r"hidden_size=1000000000 is out of bounds"),
      (dict(base, num_hidden_layers=-2), r"num_hidden_layers=-2 is out of bounds"),
      (dict(base, num_key_value_heads=3), r"not a multiple of num_key_value_heads=3"),
      ([1, 2, 3], r"expected a JSON object"),
  ]
  for cfg, match in cases:
    (d / "config.json").write_text(json.dumps(cfg))
    c = parse("--config=configs/headline.py", f"--config.model.hf_dir={d}")
    with pytest.raises(ValueError, match=r"config.model.hf_dir=.*" + match):
      headline.validate(c)
  (d / "config.json").write_text(json.dumps(dict(base, pad=" " * (2 << 20))))
  with pytest.raises(ValueError, match=r"more than the 1048576-byte limit"):
    headline.validate(parse("--config=configs/headline.py", f"--config.model.hf_dir={d}"))


def test_wrong_type_override_is_refused_by_main_naming_the_field(tmp_path):
  """`--config.catch.m=abc` and a non-tuple `ns`: refused by the real entry point before it
  creates the workdir or loads anything."""
  wd = tmp_path / "wd"
  # (The absent model folder is a safety net: nothing could run even if a flag parsed.)
  for flag, field in (("--config.catch.m=abc", "config.catch.m"),
                      ("--config.measure.teacher_forced=maybe", "config.measure.teacher_forced"),
                      ("--config.organism.n_per_family=1.5", "config.organism.n_per_family")):
    p, secs = _main("--config=configs/headline.py", flag, f"--workdir={wd}",
                    "--config.model.hf_dir=/nonexistent/safety-net")
    assert p.returncode == 2, (flag, p.stderr[-2000:])
    assert field in p.stderr, (flag, p.stderr[-2000:])
    assert "Traceback" not in p.stderr, flag
    assert not wd.exists(), flag


def _fake_model_dir(tmp_path):
  """A folder that passes validate.check_model_dir (config.json, a model.safetensors file, a
  tokenizer.json, a chat template) but holds no weights: a run that got past validation could not load it."""
  from catchjax.model.config import ModelConfig
  d = tmp_path / "fake-model"
  d.mkdir()
  cfg = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0,
                    rms_eps=1e-5, tie_embeddings=True, eos_token_id=2, bos_token_id=1)
  (d / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
  (d / "model.safetensors").write_bytes(b"")
  (d / "tokenizer.json").write_text("{}")
  (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
  return str(d)


def _one_line_config_error(p, secs, wd, *needles):
  """Exit 2, one `catchjax: config error:` line naming the field, no traceback, in seconds,
  and the workdir never created."""
  err = p.stderr.strip().splitlines()
  assert p.returncode == 2, p.stderr[-3000:]
  assert "Traceback" not in p.stderr, p.stderr[-3000:]
  assert err and err[-1].startswith("catchjax: config error: "), p.stderr[-3000:]
  assert [line for line in err if line.startswith("catchjax:")] == [err[-1]], p.stderr[-3000:]
  for n in needles:
    assert n in err[-1], (n, err[-1])
  assert secs < 60, f"{secs:.0f} s: the refusal must come before any compute"
  assert not wd.exists()
  return err[-1]


def test_unknown_family_is_refused_by_main_before_compute(tmp_path):
  wd = tmp_path / "wd"
  p, secs = _main("--config=configs/headline.py",
                  "--config.organism.families=('token', 'nope')", f"--workdir={wd}",
                  f"--config.model.hf_dir={_fake_model_dir(tmp_path)}")
  _one_line_config_error(p, secs, wd, "config.organism.families: unknown family 'nope'")
  assert not (wd / "results.jsonl").exists() and not (wd / "organisms").exists()


@pytest.mark.parametrize("flag,needles", [
    ("--config.organism.families=('no_such_family',)",
     ("config.organism.families: unknown family 'no_such_family'", "known: [")),
    ("--config.catch.m=1", ("config.catch.m=1 is smaller than the headline's largest N",)),
    ("--config.experiment=nope", ("config.experiment='nope' is unknown",)),
])
def test_validation_error_is_one_line_exit_2(tmp_path, flag, needles):
  """A value `validate` rejects: `catchjax: config error: <message>` and exit 2, no traceback."""
  wd = tmp_path / "wd"
  p, secs = _main("--config=configs/headline.py:tiny", flag, f"--workdir={wd}",
                  f"--config.model.hf_dir={_fake_model_dir(tmp_path)}")
  _one_line_config_error(p, secs, wd, *needles)


def test_missing_model_folder_is_one_line_exit_2(tmp_path):
  wd = tmp_path / "wd"
  p, secs = _main("--config=configs/headline.py:tiny", f"--workdir={wd}",
                  f"--config.model.hf_dir={tmp_path / 'absent'}")
  _one_line_config_error(p, secs, wd, "config.model.hf_dir=", "no such folder")


@pytest.mark.parametrize("flag,needles", [
    # An unknown field: named, with the nearest valid field(s) at that level or elsewhere.
    ("--config.families=('token',)",
     ("unknown field config.families", "config.organism.families")),
    ("--config.organism.n_per_famliy=3",
     ("unknown field config.organism.n_per_famliy", "did you mean config.organism.n_per_family")),
    ("--config.organsim.n_per_family=3",
     ("unknown field config.organsim", "did you mean config.organism")),
    ("--config.organism.zzzz=3", ("unknown field config.organism.zzzz",
                                  "the fields of config.organism are:", "n_per_family")),
    ("--config.organism.n_per_family.x=3", ("config.organism.n_per_family is a value",)),
    # A value of the wrong type: absl's parse error, with the field's type and default.
    ("--config.organism.n_per_family=abc",
     ("--config.organism.n_per_family=abc", "config.organism.n_per_family is an int")),
    ("--config.measure.teacher_forced=maybe",
     ("--config.measure.teacher_forced=maybe", "is a bool")),
    # A field that moved to a stage section (issue 23): its new place, named.
    ("--config.headline.m=8", ("config.headline.m has moved", "config.catch.m")),
    ("--config.headline.stopping.lr=1e-4",
     ("config.headline.stopping has moved", "config.train_against.stopping.lr")),
    ("--config.organism.train=3", ("--config.organism.train=3", "is a section")),
])
def test_bad_override_is_one_line_exit_2(tmp_path, flag, needles):
  """Refused while absl parses the flags (before main()): no model folder is needed."""
  wd = tmp_path / "wd"
  p, secs = _main("--config=configs/headline.py:tiny", flag, f"--workdir={wd}",
                  "--config.model.hf_dir=/nonexistent/safety-net")
  _one_line_config_error(p, secs, wd, *needles)
  assert secs < 30, secs   # flag parsing: no JAX, no validation


def test_missing_config_file_is_one_line_exit_2(tmp_path):
  wd = tmp_path / "wd"
  for extra in ((), ("--config.organism.n_per_family=3",)):
    p, secs = _main("--config=configs/no_such_config.py", *extra, f"--workdir={wd}")
    _one_line_config_error(p, secs, wd, "--config=configs/no_such_config.py: no such file")


CONFIG_FILES = sorted(f[:-3] for f in os.listdir(os.path.join(REPO, "configs"))
                      if f.endswith(".py") and f not in ("__init__.py", "common.py"))


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_every_config_refuses_an_unknown_variant(name):
  """Each configs/*.py builds its listed VARIANTS (and the default: none or ''), and refuses any
  other variant with a ConfigError listing them, instead of silently running the default."""
  import importlib
  from catchjax.validate import ConfigError
  mod = importlib.import_module(f"configs.{name}")
  assert mod.VARIANTS, name
  for v in (None, "") + tuple(mod.VARIANTS):
    mod.get_config(v)
  with pytest.raises(ConfigError, match=rf"--config=configs/{name}.py:nope: unknown variant "
                                        rf"'nope'; the variants of configs/{name}.py are "
                                        + ", ".join(mod.VARIANTS)):
    mod.get_config("nope")


@pytest.mark.parametrize("spec,known", [
    ("configs/headline.py:nope", "full, tiny, matched, propensity, reseeded, bounds, pilot, crossed, curves, distinguish, graded, dpo_pilot"),
    ("configs/transfer.py:matched", "full, tiny"),      # a headline variant, not transfer's
    ("configs/smoke.py:tiny", "sampled"),
])
def test_unknown_variant_is_one_line_exit_2(tmp_path, spec, known):
  """Through main (also with an override after it): refused while the flags are parsed, one
  line naming the variant and listing the known ones, no traceback, no workdir."""
  wd = tmp_path / "wd"
  variant = spec.split(":")[1]
  for extra in ((), ("--config.seed=3",)):
    p, secs = _main(f"--config={spec}", *extra, f"--workdir={wd}")
    line = _one_line_config_error(p, secs, wd, f"--config={spec}: unknown variant {variant!r}",
                                  f"are {known} (or none, for the default)")
    assert secs < 30, secs
    assert "Error whilst parsing" not in line


# --------------------------------------------------------------------- weights: never pickle
class _Boom:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, "w"))   # unpickling would create the marker file


def test_pickle_weights_are_never_opened(tmp_path, tiny_dir):
  import shutil
  from catchjax.experiments import headline
  from catchjax.model import hf
  d = tmp_path / "m"
  shutil.copytree(tiny_dir, d)
  os.remove(d / "model.safetensors")
  marker = tmp_path / "unpickled"
  with open(d / "pytorch_model.bin", "wb") as f:
    pickle.dump(_Boom(str(marker)), f)
  with pytest.raises(hf.CheckpointError, match="pickle .bin checkpoints are not read"):
    hf.load_hf(str(d))
  with pytest.raises(ValueError, match=r"config.model.hf_dir=.*never pickle"):
    headline.validate(parse("--config=configs/headline.py", f"--config.model.hf_dir={d}"))
  assert not marker.exists()
  # A tokenizer_config that asks for remote code is not executed either.
  cfg = json.loads((d / "tokenizer_config.json").read_text())
  cfg["auto_map"] = {"AutoTokenizer": ["evil.Tok", None]}
  (d / "tokenizer_config.json").write_text(json.dumps(cfg))
  (d / "evil.py").write_text(f"open({str(marker)!r}, 'w')\nclass Tok: pass\n")
  from catchjax.tokenizer import load_tokenizer
  try:
    load_tokenizer(str(d))
  except Exception:  # noqa: BLE001 - refusing is fine; running the code is not
    pass
  assert not marker.exists()


def test_safetensors_index_is_checked(tmp_path, tiny_dir):
  import shutil
  from catchjax.model import hf
  d = tmp_path / "m"
  shutil.copytree(tiny_dir, d)
  os.remove(d / "model.safetensors")
  for index, match in (({"weight_map": {"a": 3}}, "must map tensor names"),
                       ({"weight_map": {"a": "../../etc/passwd"}}, "escapes the folder"),
                       ({"nothing": 1}, "corrupt safetensors index")):
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(hf.CheckpointError, match=match):
      hf.load_hf(str(d))


def test_nothing_is_fetched_from_the_network(monkeypatch, tiny_dir):
  from catchjax.experiments import headline
  from catchjax.model import hf
  from catchjax.tokenizer import load_tokenizer

  def refuse(*a, **k):
    raise AssertionError(f"network access attempted: {a}")

  monkeypatch.setattr(socket.socket, "connect", refuse)
  monkeypatch.setattr(socket, "create_connection", refuse)
  load_tokenizer.cache_clear()
  headline.validate(parse("--config=configs/headline.py", f"--config.model.hf_dir={tiny_dir}"))
  tok = load_tokenizer(tiny_dir)
  assert tok("hello")["input_ids"]
  assert hf.load_hf(tiny_dir).cfg.num_layers == 2


# -------------------------------------------------------------------------- GGUF bounds
def _tiny_gguf(path):
  import gguf
  w = gguf.GGUFWriter(path, "llama")
  w.add_block_count(1)
  w.add_embedding_length(32)
  w.add_token_list(["a", "b", "c", "d"])
  w.add_tensor("token_embd.weight", np.ones((4, 32), np.float32))
  w.add_tensor("output_norm.weight", np.ones((32,), np.float32))
  w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
  return path


def _tensor_info_offset(data: bytes, name: bytes) -> int:
  """Byte offset of tensor `name`'s info record (its name length field)."""
  i = data.index(struct.pack("<Q", len(name)) + name)
  return i


def test_gguf_header_is_bounds_checked(tmp_path):
  from catchjax.model.gguf import GGUFError, check_gguf_layout, read_gguf
  good = _tiny_gguf(str(tmp_path / "good.gguf"))
  raw = open(good, "rb").read()
  info = check_gguf_layout(good)
  assert info["version"] == 3 and info["n_tensors"] == 2 and info["n_kv"] >= 3
  read_gguf(good)

  def variant(name, data):
    p = str(tmp_path / name)
    with open(p, "wb") as f:
      f.write(data)
    return p

  def patch(data, off, fmt, value):
    b = bytearray(data)
    struct.pack_into(fmt, b, off, value)
    return bytes(b)

  ti = _tensor_info_offset(raw, b"output_norm.weight")
  name_end = ti + 8 + len(b"output_norm.weight")
  cases = {
      "magic": (patch(raw, 0, "<I", 0x12345678), "bad magic"),
      "version": (patch(raw, 4, "<I", 99), "version 99"),
      "tensor_count": (patch(raw, 8, "<Q", 1 << 40), "tensor count 1099511627776 exceeds"),
      "kv_count": (patch(raw, 16, "<Q", 1 << 40), "metadata count 1099511627776 exceeds"),
      "key_length": (patch(raw, 24, "<Q", 1 << 50), "length 1125899906842624 at byte 24 "
                                                    "exceeds"),
      "rank": (patch(raw, name_end, "<I", 7), "rank 7"),
      "dim": (patch(raw, name_end + 4, "<Q", 1 << 60), "impossible dimension"),
      "offset": (patch(raw, name_end + 4 + 8 + 4, "<Q", 1 << 40), "beyond the end of the file"),
      "type": (patch(raw, name_end + 4 + 8, "<I", 250), "unknown type id 250"),
      "truncated_data": (raw[:-64], "beyond the end of the file"),
      "truncated_header": (raw[:40], "truncated or corrupt header"),
  }
  for name, (data, match) in cases.items():
    p = variant(name + ".gguf", data)
    with pytest.raises(GGUFError, match=match):
      read_gguf(p)
  # The converter refuses it too (and writes nothing).
  from catchjax.model.gguf import gguf_to_hf
  with pytest.raises(GGUFError):
    gguf_to_hf(str(tmp_path / "offset.gguf"), str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()


@pytest.mark.real_model
def test_shipped_gguf_passes_the_bounds_check():
  from catchjax.model.gguf import check_gguf_layout, default_gguf_path
  info = check_gguf_layout(default_gguf_path())
  assert info["n_tensors"] == 272 and info["version"] == 3
