"""Decode programs: the `lax.while_loop` of single-token steps over the prefilled KV cache.

The loop runs on per-layer weight copies (`unstack`, made once per `generate` call) and
per-layer cache buffers (prefill writes them): a layer scan over stacked arrays would slice
every layer's weights and write into a stacked cache on every step. Step t feeds the token
sampled at step t-1 at slot Pb + Ts + t - 1 and samples token t; the loop stops when every row
has produced an EOS or at t_end. Tokens after a row's EOS are the pad id (log-prob 0).

`compact` gathers the rows not yet done (with done ones to fill the smaller batch) of
everything the loop carries, so the host can go on decoding a smaller batch (Sampler's
`compact_rows`).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from catchjax.model import llama
from catchjax.sample.layout import cache_layout
from catchjax.sample.logits import sample_from_logits
from catchjax.sample.spec import is_eos


@functools.partial(jax.jit, static_argnums=0)
def unstack(spec, state):
  """Per-layer copies of the stacked layer weights (made once per `generate` call)."""
  return llama.unstack_layers(spec.merge(state))


@functools.partial(jax.jit, static_argnums=0)
def compact(spec, cache, tok_B, done_B, toks, lps, lens_B, seeds_B, keep_b):
  """Rows keep_b (b < B) of everything `decode` carries: drops rows that are done."""
  take = lambda x: spec.shard(jnp.take(x, keep_b, axis=0))
  return ({k: tuple(spec.shard_layer_cache(jnp.take(x, keep_b, axis=0)) for x in v)
           for k, v in cache.items()},
          *(take(x) for x in (tok_B, done_B, toks, lps, lens_B, seeds_B)))


def decode_fn(spec, state, layers, cache, tok_B, done_B, toks, lps, t, t_end, prefix_len,
              lens_B, seeds_B, eos_E, pad_id, temperature, top_k, top_p, *, prefix_block,
              prompt_len, out_len, mode):
  """lax.while_loop of single-token steps over the (per-layer, donated) KV cache: step t
  feeds the token sampled at step t-1 and writes token t into toks / lps [B, N]; runs while
  t < t_end and some row is not done. Returns the carry (cache, last tokens, done, toks, lps,
  t), so that the host can resume it -- after dropping done rows (`compact`) -- or stop."""
  cfg = spec.cfg
  m = spec.merge(state)
  Pb, Ts, N = prefix_block, prompt_len, out_len
  S = Pb + Ts + N
  keys = jax.vmap(jax.random.key)(seeds_B)
  k_pos, k_valid = cache_layout(lens_B, prefix_len, Pb, Ts, S)
  slots = jnp.arange(S, dtype=jnp.int32)[None, :]

  def cond(c):
    t, _, _, done, _, _ = c
    return (t < t_end) & ~jnp.all(done)

  def body(c):
    t, cache, tok, done, toks, lps = c
    slot = Pb + Ts + t - 1
    q_pos = (lens_B + t - 1)[:, None]
    mask = llama.make_mask(q_pos, k_pos, k_valid & (slots <= slot), window=cfg.sliding_window)
    h, cache = m.hidden(tok[:, None], q_pos, mask, cache=cache, cache_index=slot,
                        layer_list=layers, key_positions_BxS=k_pos)
    logits = m.logits(h[:, 0])
    new, lp = sample_from_logits(logits, keys, t, temperature, top_k, top_p, mode)
    new = jnp.where(done, pad_id, new)
    lp = jnp.where(done, 0.0, lp)
    toks = jax.lax.dynamic_update_slice(toks, new[:, None], (0, t))
    lps = jax.lax.dynamic_update_slice(lps, lp[:, None], (0, t))
    cache = {k: tuple(spec.shard_layer_cache(x) for x in v) for k, v in cache.items()}
    return t + 1, cache, new, done | is_eos(new, eos_E), toks, lps

  t, cache, tok, done, toks, lps = jax.lax.while_loop(
      cond, body, (t, cache, tok_B, done_B, toks, lps))
  return cache, tok, done, spec.shard(toks), spec.shard(lps), t


DECODE_STATIC = ("prefix_block", "prompt_len", "out_len", "mode")
DECODE_DONATE = ("cache", "toks", "lps")
decode = jax.jit(decode_fn, static_argnums=0, static_argnames=DECODE_STATIC,
                 donate_argnames=DECODE_DONATE)
