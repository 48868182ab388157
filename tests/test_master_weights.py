"""Precision for big models (issue 24 item 4): a bf16 model (param_dtype=bfloat16) trains with
fp32 master weights and AdamW moments by default (train config master_dtype), comes back in
bf16, and keeps updates that bf16 master weights lose; the checkpoint restores into a bf16
model. The compile plan sees the same fp32 master state."""
import os
import sys

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from catchjax import train as T
from catchjax.checkpoint import restore_params

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from helpers_train_worker import synthetic_data, tiny_model  # noqa: E402

# lr 2e-5 on weights of size ~0.02-1: each AdamW update (~lr) is under half a bf16 ulp of
# most weights, so bf16 master weights swallow it; 16 steps of fp32 master weights add up
# to a change bf16 can show.
CFG = dict(steps=16, batch_size=4, seq_len=64, lr=2e-5, warmup_steps=0, decay="constant",
           clip=0.0, ckpt_every=0)


def _bf16_model():
  return tiny_model(param_dtype="bfloat16")


def _params(m):
  return {k: np.asarray(v, np.float32) for k, v in
          jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(m)))}


def test_split_trainable_holds_fp32_master_weights_and_moments():
  c = T._merge_config(CFG)
  m = T.prepare_model(_bf16_model(), c)
  _, trainable, frozen = T.split_trainable(m, c)
  assert {x.dtype for x in jax.tree.leaves(trainable)} == {jnp.dtype("float32")}
  tx, _ = T.make_optimizer(c, 16)
  opt = jax.eval_shape(tx.init, trainable)
  floats = {x.dtype for x in jax.tree.leaves(opt) if jnp.issubdtype(x.dtype, jnp.floating)}
  assert floats == {jnp.dtype("float32")}
  c2 = T._merge_config(dict(CFG, master_dtype="param"))
  _, tr2, _ = T.split_trainable(m, c2)
  assert {x.dtype for x in jax.tree.leaves(tr2)} == {jnp.dtype("bfloat16")}
  with pytest.raises(ValueError, match="master_dtype"):
    T._merge_config(dict(CFG, master_dtype="float64x"))


def test_fp32_master_weights_keep_updates_that_bf16_loses(tmp_path):
  data = datasets.Dataset.from_list(synthetic_data(n=32, seed=3))
  before = _params(_bf16_model())
  r32 = T.train(_bf16_model(), data, CFG, str(tmp_path / "m32"), progress=False)
  r16 = T.train(_bf16_model(), data, dict(CFG, master_dtype="param"), str(tmp_path / "m16"),
                progress=False)
  assert {x.dtype for x in jax.tree.leaves(nnx.state(r32.model, nnx.Param))} == {
      jnp.dtype("bfloat16")}                    # the trained model comes back in bf16
  moved = lambda r: np.mean([np.mean(v != before[k])   # noqa: E731
                             for k, v in _params(r.model).items()])
  m32, m16 = moved(r32), moved(r16)
  assert m32 > 0.2, m32                         # fp32 master weights accumulated the updates
  assert m16 < 0.5 * m32, (m16, m32)            # bf16 master weights lost most of them
  # The checkpoint (fp32 master weights) restores into a fresh bf16 model.
  got = _params(restore_params(str(tmp_path / "m32"), _bf16_model()))
  want = _params(r32.model)
  assert all(np.array_equal(got[k], want[k]) for k in want)
