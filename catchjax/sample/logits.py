"""Drawing one token per row from logits: greedy, temperature, top-k, top-p (nucleus).

Temperature 0 is greedy. Otherwise the logits are divided by the temperature, filtered by
top-k (`lax.top_k` over a static power-of-two candidate count >= 8, the dynamic k picks the
threshold) and/or top-p (nucleus: from the sorted top-k candidates when top-k is on, else by
bisection on the probability threshold -- a full sort of the vocabulary is slow on CPU), and
sampled by inverse CDF with one uniform per row (a two-level cumulative sum over blocks of 256
logits; cheaper than generating Gumbel-max noise). Row i at step t uses the key
`fold_in(key(seed_i), t)`, so a row's draw depends on nothing but its seed, the step and its
own logits.

The returned log-probs are the RAW model log-probs of each chosen token: log-softmax of the
unscaled, unfiltered logits (temperature 1), the quantity likelihoods and KL estimates need.
Written for XLA:CPU (see WORKSPACE.md, "Performance"): argmax as max + min-of-iota, and the
chosen token's log-prob gathered from the logits minus logsumexp.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

CDF_BLOCK = 256              # block size of the two-level inverse-CDF sampler
TOP_P_BISECT_STEPS = 30

def fast_argmax(x):
  """argmax over the last axis (first index of the max). jnp.argmax lowers to a variadic
  reduce that XLA:CPU runs slower than this max + min-of-iota pair."""
  m = jnp.max(x, axis=-1, keepdims=True)
  iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  idx = jnp.min(jnp.where(x == m, iota, x.shape[-1]), axis=-1)
  return jnp.minimum(idx, x.shape[-1] - 1)  # all-NaN row -> last id rather than out of range


def inverse_cdf_sample(x_BxV, u_B):
  """Index drawn from softmax(x) (rows may hold -inf) with one uniform u in [0, 1) per row:
  the first index whose cumulative probability exceeds u. The cumulative sum is two-level
  (over blocks of CDF_BLOCK, then inside the chosen block): XLA:CPU's cumsum over the whole
  vocabulary is much slower."""
  B, V = x_BxV.shape
  nb = -(-V // CDF_BLOCK)
  x = jnp.pad(x_BxV, ((0, 0), (0, nb * CDF_BLOCK - V)), constant_values=-jnp.inf)
  w = jnp.exp(x - jnp.max(x, axis=-1, keepdims=True)).reshape(B, nb, CDF_BLOCK)
  block_sum = jnp.sum(w, axis=-1)                                   # [B, nb]
  block_cum = jnp.cumsum(block_sum, axis=-1)
  target = u_B[:, None] * block_cum[:, -1:]                         # [B, 1]
  # Blocks with zero mass never win (strict <), so the chosen block has mass.
  bi = jnp.minimum(jnp.sum(block_cum <= target, axis=-1), nb - 1)   # [B]
  before = (jnp.take_along_axis(block_cum, bi[:, None], axis=-1)
            - jnp.take_along_axis(block_sum, bi[:, None], axis=-1))
  row = jnp.take_along_axis(w, bi[:, None, None], axis=1)[:, 0]     # [B, BLOCK]
  cum = before + jnp.cumsum(row, axis=-1)
  j = jnp.sum(cum <= target, axis=-1)
  # Never land on a zero-probability entry (round-off at the very end of the block).
  last_nz = CDF_BLOCK - 1 - fast_argmax(jnp.flip(row > 0, axis=-1).astype(jnp.int32))
  j = jnp.minimum(j, last_nz)
  return (bi * CDF_BLOCK + j).astype(jnp.int32)


def _top_p_threshold(probs_BxV, top_p):
  """Largest t with sum(p[p >= t]) >= top_p, by bisection (the nucleus is {p >= t})."""
  lo = jnp.zeros(probs_BxV.shape[:1] + (1,), probs_BxV.dtype)
  hi = jnp.max(probs_BxV, axis=-1, keepdims=True)

  def body(_, c):
    lo, hi = c
    mid = 0.5 * (lo + hi)
    ok = jnp.sum(jnp.where(probs_BxV >= mid, probs_BxV, 0.0), axis=-1, keepdims=True) >= top_p
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

  # hi = max p always qualifies (the top token is always kept).
  lo, hi = jax.lax.fori_loop(0, TOP_P_BISECT_STEPS, body, (lo, hi))
  mass_hi = jnp.sum(jnp.where(probs_BxV >= hi, probs_BxV, 0.0), axis=-1, keepdims=True)
  return jnp.where(mass_hi >= top_p, hi, lo)


def sample_from_logits(logits_BxV, keys_B, step, temperature, top_k, top_p, mode):
  """Sample one token per row. Returns (tokens [B] int32, raw log-probs [B] float32).

  mode = (greedy, top-k candidate cap (0: no top-k), top-p by bisection over the full
  vocabulary) is static (see SamplingParams.mode); with top-k on, top-p is applied among the
  k candidates. temperature, top_k (<= cap) and top_p are traced scalars. keys_B are typed
  PRNG keys, one per row; row i uses fold_in(keys_B[i], step), so its draw depends on nothing
  but its own seed, the step and its own logits.
  """
  greedy, k_cap, use_top_p = mode
  logits_BxV = logits_BxV.astype(jnp.float32)
  if greedy:
    tok = fast_argmax(logits_BxV)
  else:
    x = logits_BxV / temperature
    neg = jnp.asarray(-jnp.inf, x.dtype)
    if k_cap:
      cand = jax.lax.top_k(x, min(k_cap, x.shape[-1]))[0]            # [B, cap] descending
      k = jnp.clip(top_k, 1, cand.shape[-1])
      cand = jnp.where(jnp.arange(cand.shape[-1]) < k, cand, neg)
      # Nucleus among the k candidates (top_p = 1 keeps all k).
      probs = jax.nn.softmax(cand, axis=-1)
      before = jnp.cumsum(probs, axis=-1) - probs                    # mass strictly above
      n_keep = jnp.clip(jnp.sum(before < top_p, axis=-1, keepdims=True), 1, k)
      x = jnp.where(x < jnp.take_along_axis(cand, n_keep - 1, axis=-1), neg, x)
    elif use_top_p:
      probs = jax.nn.softmax(x, axis=-1)
      x = jnp.where(probs < _top_p_threshold(probs, top_p), neg, x)
    step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys_B, step)
    u = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(step_keys)
    tok = inverse_cdf_sample(x, u)
  # Gathering from the logits and subtracting logsumexp is much cheaper on CPU than gathering
  # from a materialised log_softmax.
  lp = (jnp.take_along_axis(logits_BxV, tok[:, None], axis=-1)[:, 0]
        - jax.nn.logsumexp(logits_BxV, axis=-1))
  return tok, lp
