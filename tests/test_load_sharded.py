"""Weights load straight into their target shardings (issue 24 item 2): `hf.load_hf(...,
mesh=, rules=)` on 8 fake CPU devices (a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8) builds every weight shard by shard from host
memory: the values equal the 1-device load, each weight carries the training rules' sharding,
a sharded weight's per-device shards are smaller than the weight, and the load never puts a
whole weight on the default device (`jnp.asarray` is not called on the mesh path)."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_WORKER = r"""
import json, sys, tempfile
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from catchjax import sharding as shd
from catchjax.model import hf
from catchjax.model.config import ModelConfig
assert jax.device_count() == 8, jax.devices()
cfg = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=16, tie_embeddings=False,
                  eos_token_id=2, pad_token_id=0)
d = tempfile.mkdtemp()
hf.save_random_hf(cfg, d, seed=0)
ref = nnx.to_pure_dict(nnx.state(hf.load_hf(d)))
calls = []
real = hf.jnp.asarray
hf.jnp.asarray = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
out = {}
for name, shape in dict(fsdp=(1, 8, 1), tensor=(1, 2, 4)).items():
    mesh = shd.make_mesh(shape)
    n0 = len(calls)
    got = nnx.to_pure_dict(nnx.state(hf.load_hf(d, mesh=mesh, rules=shd.DEFAULT_RULES)))
    want = shd.state_shardings(got, mesh, shd.DEFAULT_RULES)
    leaves = jax.tree_util.tree_leaves_with_path(got)
    r = dict(asarray_calls=len(calls) - n0, weights=len(leaves), equal=True, wrong_sharding=[],
             sharded=0, whole_on_a_device=[])
    for (path, x), s, (_, y) in zip(leaves, jax.tree.leaves(want), jax.tree_util.tree_leaves_with_path(ref)):
        key = jax.tree_util.keystr(path)
        r["equal"] &= bool(np.array_equal(np.asarray(x), np.asarray(y)))
        if x.sharding != s:
            r["wrong_sharding"].append(key)
        if not s.is_fully_replicated:
            r["sharded"] += 1
            if any(sh.data.size == x.size for sh in x.addressable_shards):
                r["whole_on_a_device"].append(key)
    out[name] = r
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def loaded():
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1",
             CATCHJAX_NO_DISTRIBUTED="1", XLA_FLAGS="--xla_force_host_platform_device_count=8")
  p = subprocess.run([sys.executable, "-c", _WORKER], cwd=REPO, env=env, capture_output=True,
                     text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-4000:]
  line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT "):])


@pytest.mark.parametrize("mesh", ["fsdp", "tensor"])
def test_weights_load_straight_into_their_shardings(loaded, mesh):
  r = loaded[mesh]
  assert r["equal"], r                       # the same values as the 1-device load
  assert r["wrong_sharding"] == [], r        # every weight in the training rules' sharding
  assert r["sharded"] >= 7, r                # embed, head and the layer matrices
  assert r["whole_on_a_device"] == [], r     # no device holds a whole sharded weight
  assert r["asarray_calls"] == 0, r          # never placed whole on the default device first
