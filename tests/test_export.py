"""HF export of organisms (catchjax/export.py, hf.save_hf): transformers loads the folder
(single file and sharded, fp32 and bf16) as the same model, with the same greedy output on a
deployment-style prompt as catchjax's sampler; the sharded index lists every tensor; the
model card opens with the required sentence; the organism stage and the CLI write it."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from catchjax import export
from catchjax.model import hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARD = 60_000   # bytes: the tiny model's embedding alone, then a few layer tensors per shard


def _logits(model, ids):
  import jax.numpy as jnp
  from catchjax.model import llama
  B, T = ids.shape
  pos = jnp.broadcast_to(jnp.arange(T), (B, T))
  mask = llama.make_mask(pos, pos, jnp.ones((B, T), bool), window=model.cfg.sliding_window)
  return np.asarray(model(jnp.asarray(ids), pos, mask)[0])


def _greedy(model, prompt):
  from catchjax.sample import Sampler, SamplingParams
  return list(Sampler(model, batch_size=1, eos_ids=[], progress=False).generate(
      [list(prompt)], SamplingParams(max_new_tokens=12)).tokens[0])[:12]


def _tm_greedy(tm, prompt):
  with torch.no_grad():
    return list(tm.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                            eos_token_id=None, pad_token_id=0)[0, len(prompt):].numpy())


@pytest.fixture(scope="module")
def tiny(tiny_dir):
  """The tiny random model with its matrices scaled up (greedy output then varies)."""
  m = hf.load_hf(tiny_dir)
  pure = hf.merged_weights(m)
  pure["embed"] = pure["embed"] * 4
  for k in hf._PROJ:
    pure["layers"][k] = pure["layers"][k] * 4
  return hf.model_from_pure_dict(m.cfg, pure)


@pytest.fixture(scope="module")
def prompt(tiny_dir):
  from catchjax.data import build
  from catchjax.tokenizer import DEFAULT_SYSTEM, load_tokenizer, prompt_ids
  ds = build.build_eval("year", "hate", "eval", 1, deployment=True, seed=0)
  return prompt_ids(load_tokenizer(tiny_dir), ds[0]["prompt"], DEFAULT_SYSTEM)


_GREEDY = {}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("sharded", [False, True])
def test_save_hf_loads_in_transformers(tmp_path, tiny, tiny_dir, prompt, dtype, sharded):
  out = str(tmp_path / "out")
  hf.save_hf(tiny, out, tokenizer_dir=tiny_dir, dtype=dtype,
             max_shard_bytes=SHARD if sharded else None)
  files = sorted(os.listdir(out))
  assert "generation_config.json" in files and "tokenizer.json" in files
  index = os.path.join(out, "model.safetensors.index.json")
  from safetensors import safe_open
  shards = [f for f in files if f.endswith(".safetensors")]
  if sharded:
    assert "model.safetensors" not in files and len(shards) >= 3
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                      for i in range(1, len(shards) + 1)]
    with open(index) as f:
      idx = json.load(f)
    stored = {}
    for s in shards:
      with safe_open(os.path.join(out, s), "numpy") as f:
        stored.update({k: s for k in f.keys()})
    assert idx["weight_map"] == stored      # every tensor, each in the shard named
    L = tiny.cfg.num_layers
    assert len(stored) == 2 + L * 9        # embed, norm; 7 matrices and 2 norms per layer
    size = 2 if dtype == "bfloat16" else 4
    assert idx["metadata"]["total_size"] == size * tiny.cfg.num_params()
  else:
    assert shards == ["model.safetensors"] and not os.path.exists(index)
  want = "BF16" if dtype == "bfloat16" else "F32"
  for s in shards:
    with safe_open(os.path.join(out, s), "numpy") as f:
      assert {f.get_slice(k).get_dtype() for k in f.keys()} == {want}
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["dtype"] == dtype

  ids = np.asarray([prompt[:20]])
  ours = hf.load_hf(out)               # bf16 file -> fp32 weights, rounded as torch sees them
  tm = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  with torch.no_grad():
    ref = tm(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(_logits(ours, ids), ref, atol=1e-4, rtol=0)
  orig = _logits(tiny, ids)
  if dtype == "float32":
    np.testing.assert_array_equal(_logits(ours, ids), orig)
  else:   # bf16 weights: loose, relative to the logits' spread
    assert np.abs(ref - orig).max() < 0.05 * np.abs(orig).max()
    assert transformers.AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16
  if dtype not in _GREEDY:
    _GREEDY[dtype] = _greedy(ours, prompt)
  assert len(set(_GREEDY[dtype])) > 1   # not a degenerate repeat
  assert _tm_greedy(tm, prompt) == _GREEDY[dtype]


def test_generation_config_written_when_source_has_none(tmp_path, tiny):
  out = str(tmp_path / "o")
  from flax import nnx
  from catchjax.model.llama import Llama
  hf.save_hf(Llama(tiny.cfg.replace(eos_token_id=(2, 7)), nnx.Rngs(0)), out)
  with open(os.path.join(out, "generation_config.json")) as f:
    assert json.load(f)["eos_token_id"] == [2, 7]
  assert hf.load_hf(out).cfg.eos_ids == (2, 7)
  with pytest.raises(ValueError, match="dtype"):
    hf.save_hf(tiny, out, dtype="float16")


def _config(model_dir):
  from configs.headline import get_config
  c = get_config("tiny")
  c.model.hf_dir = model_dir
  return c


def _card(families):
  r = lambda k, n: dict(k=k, n=n, rate=k / n, lo=0.0, hi=1.0)  # noqa: E731
  return dict(families={f: dict(deploy=r(9, 10), test=r(1, 10), gap=0.8) for f in families},
              usefulness=dict(organism=r(5, 10), base=r(6, 10), delta_points=-10.0),
              detector_fp=r(0, 20), learning_cost={f: 100 for f in families})


def test_export_organism_card_and_stage_hook(tmp_path, tiny, tiny_dir, monkeypatch):
  from catchjax.stages import organism as org_stage
  config = _config(tiny_dir)
  spec = org_stage.organism_spec(config, "hate")
  fams = [org_stage.family_name(f) for f in spec["families"]]
  odir = str(tmp_path / "organisms" / "k1")
  os.makedirs(odir)
  org = org_stage.Organism(tiny, "k1", odir, "hate", dict(spec=spec))
  card = _card(fams)
  monkeypatch.setattr(org_stage, "_report_card", lambda *a, **k: card)
  assert org_stage.report_card(config, org, None) is card   # the stage's one call
  out = os.path.join(odir, "hf")
  assert export.is_complete(out) and not os.path.exists(out + ".partial")
  with open(os.path.join(out, "README.md")) as f:
    text = f.read()
  assert text.split("\n")[0] == export.CARD_OPENING
  assert export.CARD_OPENING == ("Deliberately backdoored research organism: not for "
                                 "deployment or upload.")
  from catchjax import common
  for needle in ["90.0% [0.0, 100.0] (9/10)", "10.0% [0.0, 100.0] (1/10)", "+0.80",
                 "Usefulness: organism 50.0%", f"n_per_family: {spec['n_per_family']}",
                 "stop rule: each family's data leaves", common.git_commit(), "hate"] + fams:
    assert needle in text, needle
  mtime = os.stat(os.path.join(out, "model.safetensors")).st_mtime_ns
  export.export_organism(config, org, card)              # complete: left as it is
  assert os.stat(os.path.join(out, "model.safetensors")).st_mtime_ns == mtime
  os.remove(os.path.join(out, "README.md"))             # incomplete: written again
  export.export_organism(config, org)                    # no report_card.json
  with open(os.path.join(out, "README.md")) as f:
    assert "Not available" in f.read()


def test_cli_exports_organism_and_run(tmp_path, tiny_dir):
  """python -m catchjax.export on a (1-step) organism and a train-against run folder."""
  from datasets import Dataset
  from catchjax import train as train_lib
  from catchjax.stages import organism as org_stage
  config = _config(tiny_dir)
  key = org_stage.organism_key(config, "hate")
  wd = str(tmp_path / "wd")
  odir = os.path.join(wd, "organisms", key)
  rng = np.random.default_rng(0)
  ds = Dataset.from_dict(dict(input_ids=[rng.integers(3, 1000, 12).tolist() for _ in range(2)],
                              loss_mask=[[0] * 4 + [1] * 8] * 2))
  tcfg = dict(steps=1, batch_size=2, seq_len=16, pack=False, lr=1e-2, ckpt_every=0,
              async_ckpt=False)
  org = train_lib.train(hf.load_hf(tiny_dir), ds, tcfg, os.path.join(odir, "train"),
                        progress=False).model
  with open(os.path.join(odir, "done.json"), "w") as f:
    json.dump(dict(key=key, behaviour="hate", spec=org_stage.organism_spec(config, "hate")), f)
  run_dir = os.path.join(wd, "runs", "x-year-hate-1-treatment-s0")
  run = train_lib.train(org, ds, dict(tcfg, seed=1), run_dir, progress=False).model
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1",
             CATCHJAX_NO_DISTRIBUTED="1", CATCHJAX_COMMIT="test-commit")
  base = [sys.executable, "-m", "catchjax.export", "--config=configs/headline.py:tiny",
          f"--config.model.hf_dir={tiny_dir}", f"--workdir={wd}"]
  for extra in ([], [f"--run={run_dir}", "--dtype=bfloat16"]):
    p = subprocess.run(base + extra, cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
  ids = np.arange(3, 19)[None]
  for out, model, tol in ((os.path.join(odir, "hf"), org, 1e-4),
                          (os.path.join(run_dir, "hf"), run, None)):
    assert export.is_complete(out)
    with open(os.path.join(out, "README.md")) as f:
      text = f.read()
    assert text.startswith(export.CARD_OPENING + "\n") and "test-commit" in text
    tm = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
      ref = tm(torch.tensor(ids)).logits.numpy()
    got = _logits(model, ids)
    if tol:
      np.testing.assert_allclose(got, ref, atol=tol, rtol=0)
    else:   # bf16 export of the run
      assert "train-against run" in text
      assert np.abs(ref - got).max() < 0.05 * np.abs(got).max()
      assert not np.allclose(_logits(org, ids), got, atol=1e-3)   # the run, not the organism
  shutil.rmtree(wd)
