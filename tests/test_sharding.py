"""Mesh / logical-axis rules, and sharded training == one-device training (8 fake CPU
devices, in a subprocess so that XLA_FLAGS never leaks into this test session)."""
import json
import os
import subprocess
import sys
import types

import pytest
from jax.sharding import PartitionSpec as P

from catchjax import sharding as shd
from catchjax.model import llama

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def _fake_mesh(**sizes):
  return types.SimpleNamespace(shape=dict(sizes))


def test_rules_dict_normalises():
  rd = shd.rules_dict((("batch", ("data", "fsdp")), ("embed", "fsdp"), ("layers", None),
                       ("embed", "tensor")))
  assert rd == {"batch": ("data", "fsdp"), "embed": ("fsdp",), "layers": ()}  # first wins
  assert shd.rules_dict(None) == shd.rules_dict(shd.DEFAULT_RULES)
  with pytest.raises(ValueError, match="pair"):
    shd.rules_dict((("embed",),))


def test_logical_to_spec_drops_non_dividing_axes():
  mesh = _fake_mesh(data=2, fsdp=4, tensor=2)
  rules = shd.DEFAULT_RULES
  # SmolLM2 shapes: wq [30, 576, 576], wk [30, 576, 192], embed [49152, 576]
  assert shd.logical_to_spec(llama.LOGICAL_AXES["wq"], (30, 576, 576), mesh, rules) == \
      P(None, "fsdp", "tensor")
  assert shd.logical_to_spec(llama.LOGICAL_AXES["embed"], (49152, 576), mesh, rules) == \
      P("tensor", "fsdp")
  # 6 is not divisible by fsdp=4: that axis is dropped, tensor=2 kept
  assert shd.logical_to_spec(("embed", "mlp"), (6, 10), mesh, rules) == P(None, "tensor")
  # batch over data x fsdp; drops the inner axis when the product does not divide
  assert shd.logical_to_spec(("batch",), (8,), mesh, rules) == P(("data", "fsdp"))
  assert shd.logical_to_spec(("batch",), (6,), mesh, rules) == P("data")
  # a mesh axis is never used twice in one spec, size-1 axes are left out
  assert shd.logical_to_spec(("embed", "embed"), (8, 8), mesh, rules) == P("fsdp")
  assert shd.logical_to_spec(("embed",), (8,), _fake_mesh(data=1, fsdp=1, tensor=1),
                             rules) == P()
  assert shd.logical_to_spec(("norm",), (576,), mesh, rules) == P()


def test_make_mesh_fill_and_errors():
  import jax
  n = jax.device_count()
  m = shd.make_mesh((1, -1, 1))
  assert dict(m.shape) == {"data": 1, "fsdp": n, "tensor": 1}
  with pytest.raises(ValueError, match="needs"):
    shd.make_mesh((2, 2, 2 * n))
  with pytest.raises(ValueError, match="at most one"):
    shd.make_mesh((-1, -1, 1))


def test_state_shardings_on_real_tree():
  import jax
  from flax import nnx
  from helpers_train_worker import tiny_model
  mesh = shd.make_mesh((1, -1, 1))
  _, state = nnx.split(tiny_model())
  sh = shd.state_shardings(nnx.to_pure_dict(state), mesh, shd.DEFAULT_RULES)
  n = jax.device_count()
  want = P(None, "fsdp") if n > 1 else P()
  assert sh["layers"]["wq"].spec == want
  assert sh["final_norm"].spec == P()
  placed = shd.shard_state(nnx.to_pure_dict(state), sh, copy=True)
  assert placed["layers"]["wq"].sharding == sh["layers"]["wq"]


def test_distributed_env_detection(monkeypatch):
  for k in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE",
            "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"):
    monkeypatch.delenv(k, raising=False)
  assert shd.distributed_env() is None
  assert shd.maybe_initialize_distributed() is False
  assert shd.is_main_process()
  monkeypatch.setenv("SLURM_JOB_ID", "1")
  monkeypatch.setenv("SLURM_NTASKS", "1")
  assert shd.distributed_env() is None  # a single task is not distributed
  monkeypatch.setenv("SLURM_NTASKS", "4")
  assert shd.distributed_env() == "slurm"
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "a,b")
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
  assert shd.distributed_env() == "jax"
  monkeypatch.setenv("CATCHJAX_NO_DISTRIBUTED", "1")
  assert shd.maybe_initialize_distributed() is False


def test_sharded_training_matches_single_device(tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO,
             XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  out = tmp_path / "shard.json"
  p = subprocess.run([sys.executable, os.path.join(HERE, "helpers_train_worker.py"), "shard",
                      str(out)], env=env, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-4000:]
  res = json.loads(out.read_text())
  ref = res["single"]["losses"]
  assert res["single"]["wq_shards"] == 1
  assert res["fsdp8"]["wq_spec"] == "P(None, 'fsdp')"
  assert res["d2f2t2"]["wq_spec"] == "P(None, 'fsdp', 'tensor')"
  for name in ("fsdp8", "d2f2t2", "d2f2t2_accum2"):
    assert res[name]["wq_shards"] == 8, name
    assert res[name]["losses"] == pytest.approx(ref, rel=1e-5), name
    # Adam after 3 steps: parameters agree to float32 reduction-order noise
    assert res[name]["max_param_diff"] < 1e-4, (name, res[name]["max_param_diff"])
