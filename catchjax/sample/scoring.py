"""Teacher-forcing programs: one forward over the prompt (+ continuation), no decode.

`score` returns log p(continuation token | everything before it) per token, through the same
shared-prefix + left-padded-suffix path as generation; the LM head runs only on the positions
that predict continuation tokens, a few at a time, so no [B, T, V] array is ever built.
`next_token` gives log p(candidate | prompt) for a list of candidate next tokens. Both use the
raw model distribution (temperature 1, no filtering).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from catchjax.sample.prefill import prompt_forward

SCORE_CHUNK = 8              # LM-head positions computed at once when scoring


@functools.partial(jax.jit, static_argnums=0, static_argnames=("cont_len",))
def score(spec, state, prefix_P, prefix_len, suffix_BxT, lens_B, *, cont_len):
  """log p(suffix[:, T-C+j] | everything before it) for j < C: [B, C]. The LM head runs
  only on the C positions that predict them, SCORE_CHUNK positions at a time."""
  m = spec.merge(state)
  T, C = suffix_BxT.shape[1], cont_len
  h, _ = prompt_forward(spec, m, prefix_P, prefix_len, suffix_BxT, lens_B,
                        prefix_P.shape[0] + T)
  hs = jnp.moveaxis(h[:, T - C - 1:T - 1], 1, 0)          # [C, B, D]
  tg = jnp.moveaxis(spec.shard(suffix_BxT)[:, T - C:], 1, 0)  # [C, B]

  def one(args):
    hc, tc = args
    logits = m.logits(hc)                                  # [B, V]
    lse = jax.nn.logsumexp(logits, axis=-1)
    return jnp.take_along_axis(logits, tc[:, None], axis=-1)[:, 0] - lse

  out = jax.lax.map(one, (hs, tg), batch_size=min(C, SCORE_CHUNK))
  return spec.shard(out.T)


@functools.partial(jax.jit, static_argnums=0)
def next_token(spec, state, prefix_P, prefix_len, suffix_BxT, lens_B, cand_K):
  """log p(next token = cand_K[k] | prompt): [B, K] (full-vocabulary normalisation)."""
  m = spec.merge(state)
  h, _ = prompt_forward(spec, m, prefix_P, prefix_len, suffix_BxT, lens_B,
                        prefix_P.shape[0] + suffix_BxT.shape[1])
  logits = m.logits(h[:, -1])
  return spec.shard(logits[:, cand_K] - jax.nn.logsumexp(logits, axis=-1, keepdims=True))
