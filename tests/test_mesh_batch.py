"""Batch and mesh (issue 24 item 1): batch sizes are global and never changed; a micro-batch
that does not divide over the batch-sharded devices is padded with zero-weight rows
(`sharding.padded_micro`), so any batch runs on any mesh with the recipe's loss and gradients:
a batch-4 run on 8 fake devices (data and fsdp meshes) trains like the 1-device run, and every
experiment's tiny / default / full config validates on 8 devices. Runs under 8 fake CPU
devices (XLA_FLAGS=--xla_force_host_platform_device_count=8) in subprocesses."""
import os
import subprocess
import sys
import textwrap

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from test_bad_input import _fake_model_dir  # noqa: E402

SMOLLM2 = os.path.join(REPO, "artifacts", "smollm2-135m-instruct")


def _env8():
  return dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1",
              CATCHJAX_NO_DISTRIBUTED="1",
              XLA_FLAGS="--xla_force_host_platform_device_count=8")


_PADDED = r"""
import json, sys
import datasets, jax, numpy as np
from flax import nnx
sys.path.insert(0, sys.argv[1])
from helpers_train_worker import synthetic_data, tiny_model
from catchjax import sharding, train as T
assert jax.device_count() == 8, jax.devices()
m = sharding.make_mesh((1, -1, 1))
assert sharding.padded_micro(16, 2, m) == 8 and sharding.padded_micro(4, 1, m) == 8
assert sharding.padded_micro(8, 2, m) == 8 and sharding.padded_micro(12, 1, m) == 16
assert sharding.padded_micro(4, 1, sharding.make_mesh((1, 1, 8))) == 4   # tensor only
assert sharding.padding_note(16, 1, m) is None
assert "4 rows per micro-batch padded to 8" in sharding.padding_note(4, 1, m)
data = datasets.Dataset.from_list(synthetic_data(n=24, seed=5))
cfg = dict(steps=4, batch_size=4, seq_len=64, lr=1e-2, warmup_steps=0, ckpt_every=0)
out = {}
for name, shape, accum in (("one", (1, 1, 1), 1), ("fsdp", (1, 8, 1), 1),
                           ("data", (8, 1, 1), 1), ("fsdp_accum", (1, 8, 1), 2)):
    devs = jax.devices()[:int(np.prod(shape))]
    mesh = sharding.make_mesh(shape, devices=devs)
    r = T.train(tiny_model(), data, dict(cfg, grad_accum=accum), f"/tmp/padded-{name}-{shape}",
                mesh=mesh, progress=False)
    flat = np.concatenate([np.asarray(x, np.float32).ravel() for x in
                           jax.tree.leaves(nnx.to_pure_dict(nnx.state(r.model)))])
    out[name] = dict(loss=[h["loss"] for h in r.history], params=flat.tolist()[:4000],
                     tokens=sum(h["tokens"] for h in r.history))
print("RESULT " + json.dumps(out))
"""


def test_padded_batches_train_like_the_one_device_run(tmp_path):
  """batch_size 4 on 8 devices (padded to 8 zero-weight rows a micro-batch, on fsdp and data
  meshes, also with grad_accum 2): the same losses and weights as on one device, and the same
  token count (padding is not counted)."""
  import json
  env = dict(_env8(), TMPDIR=str(tmp_path))
  p = subprocess.run([sys.executable, "-c", textwrap.dedent(_PADDED), HERE], cwd=REPO,
                     env=env, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-4000:]
  out = json.loads([ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])
  import numpy as np
  ref = out["one"]
  for name in ("fsdp", "data", "fsdp_accum"):
    got = out[name]
    np.testing.assert_allclose(got["loss"], ref["loss"], rtol=2e-5, atol=1e-6, err_msg=name)
    # Weights after 4 AdamW steps at lr 1e-2: Adam divides by the gradient's own scale, so a
    # near-zero gradient's float32 round-off (another reduction order over 8 devices) can
    # move one weight by a few 1e-5; a padding bug moves most of them.
    d = np.abs(np.asarray(got["params"]) - np.asarray(ref["params"]))
    assert np.mean(d > 2e-5) < 0.005 and d.max() < 1e-3, (name, np.mean(d > 2e-5), d.max())
    assert got["tokens"] == ref["tokens"], name


_CHECKS = r"""
import sys
from catchjax.validate import ConfigError
import jax
assert jax.device_count() == 8, jax.devices()
fake, real = sys.argv[1], sys.argv[2]

def check(cfg_mod, variant, hf_dir, overrides=None, expect=None):
  import importlib
  c = importlib.import_module(f"configs.{cfg_mod}").get_config(variant)
  c.model.hf_dir = hf_dir
  for path, v in (overrides or {}).items():
    node = c
    *head, last = path.split(".")
    for k in head:
      node = node[k]
    node[last] = v
  exp = importlib.import_module(f"catchjax.experiments.{c.experiment}")
  try:
    exp.validate(c)
    got = None
  except ConfigError as err:
    got = str(err)
  if expect is None:
    assert got is None, (cfg_mod, variant, overrides, got)
  else:
    assert got and got.startswith(expect), (cfg_mod, variant, got)

# Every batch size validates on 8 devices (padding), the defaults (4) included.
for variant in ("tiny", None, "full"):
  check("headline", variant, fake)
  check("organism", variant, fake)
check("headline", "tiny", fake, {"train_against.train.grad_accum": 2})
for mod in ("transfer", "coherence", "long_trained"):
  check(mod, "tiny", fake)
if real:   # cot / propensity read the tokenizer at validation
  for mod in ("cot", "propensity"):
    check(mod, "tiny", real)
# A mesh that cannot be built on these devices is still refused before compute.
check("headline", "tiny", fake, {"organism.train.mesh_shape": (3, 1, 1)},
      "config.organism.train.mesh_shape=(3, 1, 1)")
print("OK", bool(real))
"""


def test_validation_on_8_devices(tmp_path):
  """In-process validation under 8 devices: every experiment's tiny config, and the headline
  and organism default and :full configs, validate with their own batch sizes."""
  real = SMOLLM2 if os.path.isfile(os.path.join(SMOLLM2, "tokenizer.json")) else ""
  p = subprocess.run([sys.executable, "-c", textwrap.dedent(_CHECKS), _fake_model_dir(tmp_path),
                      real], cwd=REPO, env=_env8(), capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-4000:]
  assert "OK" in p.stdout


def test_dry_run_with_default_batches_on_8_devices(tmp_path):
  """Through main on 8 devices, `transfer.py:tiny --config.dry_run=True` with its default
  batch sizes (4, padded) passes validation and prints its plan (exit 0), building nothing."""
  wd = tmp_path / "wd"
  args = [sys.executable, "-m", "catchjax.main", "--config=configs/transfer.py:tiny",
          f"--workdir={wd}", f"--config.model.hf_dir={_fake_model_dir(tmp_path)}",
          "--config.dry_run=True"]
  p = subprocess.run(args, cwd=REPO, env=_env8(), capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-3000:]
  assert "config error" not in p.stderr
  assert "[transfer] dry run:" in p.stdout, p.stdout[-2000:]
  assert not (wd / "organisms").exists()   # a plan only: nothing was built
