"""Batch and mesh (issue 24 item 1): a training section whose per-micro-batch rows do not divide
over the batch-sharded devices is refused at validation, before any compute, naming the field
and a valid value (batch sizes are global and never changed silently). Runs under 8 fake CPU
devices (XLA_FLAGS=--xla_force_host_platform_device_count=8) in subprocesses."""
import os
import subprocess
import sys
import textwrap
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from test_bad_input import _fake_model_dir, _one_line_config_error  # noqa: E402

SMOLLM2 = os.path.join(REPO, "artifacts", "smollm2-135m-instruct")


def _env8():
  return dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1",
              CATCHJAX_NO_DISTRIBUTED="1",
              XLA_FLAGS="--xla_force_host_platform_device_count=8")


def test_main_refuses_unshardable_batch_before_compute(tmp_path):
  """`:tiny` on 8 devices: organism batch 4 cannot split over 8 -> one line, exit 2, seconds,
  no workdir (it used to fail inside train() at the organism's first step)."""
  wd = tmp_path / "wd"
  t0 = time.time()
  p = subprocess.run([sys.executable, "-m", "catchjax.main", "--config=configs/headline.py:tiny",
                      f"--workdir={wd}", f"--config.model.hf_dir={_fake_model_dir(tmp_path)}"],
                     cwd=REPO, env=_env8(), capture_output=True, text=True, timeout=300)
  line = _one_line_config_error(p, time.time() - t0, wd, "config.organism.train.batch_size=4",
                                "8 batch-sharded devices", "use a multiple of 8 (e.g. 8)")
  assert "grad_accum 1" in line


_CHECKS = r"""
import json, sys
from catchjax import sharding
from catchjax.validate import ConfigError
import jax
assert jax.device_count() == 8, jax.devices()
fake, real = sys.argv[1], sys.argv[2]

# The shared rule (train.train raises on it too).
m = sharding.make_mesh((1, -1, 1))
assert sharding.micro_batch_error(16, 2, m) is None
e = sharding.micro_batch_error(8, 2, m)
assert "(8 / grad_accum 2 = 4)" in e and "multiple of 16 (e.g. 16)" in e, e
assert "multiple of 8 (e.g. 16)" in sharding.micro_batch_error(12, 1, m)
assert sharding.micro_batch_error(4, 1, sharding.make_mesh((1, 1, 8))) is None  # tensor only

def check(cfg_mod, variant, hf_dir, overrides, expect):
  import importlib
  c = importlib.import_module(f"configs.{cfg_mod}").get_config(variant)
  c.model.hf_dir = hf_dir
  for path, v in overrides.items():
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
    field, unit = expect if isinstance(expect, tuple) else (expect, 8)
    assert got and got.startswith(field) and f"use a multiple of {unit} " in got, (
        cfg_mod, variant, got)

both8 = {"organism.train.batch_size": 8, "headline.train.batch_size": 8}
O, H = "config.organism.train.batch_size=", "config.headline.train.batch_size="
check("headline", "tiny", fake, {}, O + "4")
check("headline", "tiny", fake, both8, None)
check("headline", "tiny", fake, {"organism.train.batch_size": 8}, H + "4")
check("headline", "full", fake, {}, H + "4")              # organism 16 is fine, headline 4 not
check("headline", "full", fake, {"headline.train.batch_size": 8}, None)
check("organism", "tiny", fake, {}, O + "4")
check("organism", "full", fake, {}, None)
check("headline", "tiny", fake, dict(both8, **{"headline.train.grad_accum": 2}), (H + "8", 16))
for mod in ("transfer", "coherence", "long_trained"):
  check(mod, "tiny", fake, {"organism.train.batch_size": 8}, H + "4")
  check(mod, "tiny", fake, both8, None)
if real:   # cot / propensity read the tokenizer at validation
  for mod in ("cot", "propensity"):
    check(mod, "tiny", real, {"organism.train.batch_size": 8}, H + "4")
    check(mod, "tiny", real, both8, None)
print("OK", bool(real))
"""


def test_validation_on_8_devices(tmp_path):
  """In-process validation under 8 devices: every experiment's training sections are checked
  (organism.train and headline.train), with both set to 8 validation passes."""
  real = SMOLLM2 if os.path.isfile(os.path.join(SMOLLM2, "tokenizer.json")) else ""
  p = subprocess.run([sys.executable, "-c", textwrap.dedent(_CHECKS), _fake_model_dir(tmp_path),
                      real], cwd=REPO, env=_env8(), capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-4000:]
  assert "OK" in p.stdout


@pytest.mark.parametrize("both8", [False, True])
def test_dry_run_with_shardable_batches_passes_validation(tmp_path, both8):
  """Through main on 8 devices, `transfer.py:tiny --config.dry_run=True` with both batch sizes 8
  passes validation and prints its plan (exit 0); with the defaults (4) it is refused."""
  wd = tmp_path / "wd"
  args = [sys.executable, "-m", "catchjax.main", "--config=configs/transfer.py:tiny",
          f"--workdir={wd}", f"--config.model.hf_dir={_fake_model_dir(tmp_path)}",
          "--config.dry_run=True"]
  if both8:
    args += ["--config.organism.train.batch_size=8", "--config.headline.train.batch_size=8"]
  t0 = time.time()
  p = subprocess.run(args, cwd=REPO, env=_env8(), capture_output=True, text=True, timeout=300)
  if both8:
    assert p.returncode == 0, p.stderr[-3000:]
    assert "config error" not in p.stderr
    assert "[transfer] dry run:" in p.stdout, p.stdout[-2000:]
    assert not (wd / "organisms").exists()   # a plan only: nothing was built
  else:
    _one_line_config_error(p, time.time() - t0, wd, "config.organism.train.batch_size=4")
