"""The attention implementations (issue 24 item 6): jax.nn.dot_product_attention against the
explicit einsum path on a tiny model, the training loss and its gradients included, padded
(left-pad) rows included; and which calls take it (auto: GPU only; never decode or a
soft-capped model)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from catchjax.model import llama
from catchjax.model.attention import use_dot_product
from catchjax.model.config import ModelConfig

CFG = ModelConfig(vocab_size=128, hidden_size=48, intermediate_size=96, num_layers=2,
                  num_heads=6, num_kv_heads=2, head_dim=8, eos_token_id=2, pad_token_id=0)


def _loss_and_grads(cfg, ids, lens):
  g, st = nnx.split(llama.Llama(cfg, nnx.Rngs(0)))
  B, T = ids.shape
  valid = jnp.arange(T)[None] >= (T - lens)[:, None]          # left padding
  pos = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
  mask = llama.make_mask(pos, pos, valid)

  def loss(st):
    logits = nnx.merge(g, st)(ids, pos, mask)[0]
    lp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
    tok = jnp.take_along_axis(lp, ids[:, 1:, None], -1)[..., 0]
    return -(tok * valid[:, 1:]).sum() / valid[:, 1:].sum(), logits
  (val, logits), grads = jax.value_and_grad(loss, has_aux=True)(st)
  return float(val), np.asarray(logits), grads


def test_dot_product_attention_matches_einsum_with_gradients():
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(3, 128, (3, 16)))
  lens = jnp.asarray([16, 11, 5])
  a = _loss_and_grads(CFG.replace(attention="einsum"), ids, lens)
  b = _loss_and_grads(CFG.replace(attention="dot_product"), ids, lens)
  assert np.isfinite(b[0]) and abs(a[0] - b[0]) < 1e-5
  valid = np.arange(16)[None] >= (16 - np.asarray(lens))[:, None]
  np.testing.assert_allclose(b[1][valid], a[1][valid], atol=2e-5, rtol=0)
  for x, y in zip(jax.tree.leaves(a[2]), jax.tree.leaves(b[2])):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-5, rtol=1e-4)


def test_which_calls_take_dot_product_attention():
  dp = CFG.replace(attention="dot_product")
  assert use_dot_product(dp, 16) and not use_dot_product(dp, 1)      # never decode
  assert not use_dot_product(dp.replace(attn_softcap=20.0), 16)      # Gemma 2's soft-cap
  assert not use_dot_product(CFG.replace(attention="einsum"), 16)
  assert use_dot_product(CFG, 16) == (jax.default_backend() == "gpu")  # auto
  with pytest.raises(ValueError, match="attention="):
    use_dot_product(CFG.replace(attention="flash"), 16)
