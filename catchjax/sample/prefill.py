"""Prefill programs: a batch of prompts into a fresh KV cache, and the first sampled token.

`prompt_forward` runs [shared prefix | left-padded suffix] (see `layout`): the prefix once at
batch 1, its keys/values broadcast into every row's cache, then the suffix at batch B. The LM
head is applied to the last position only (left padding puts every row's last prompt token
there) and the first new token is sampled from it.

`prefill_rows` is the same for a group of rows of a batch, at the group's own (shorter) suffix
length, written into the batch's donated cache at the slots the batch layout gives them: rows
come sorted by length, so short prompts are not computed at the longest one's padded length.

The cache comes out as per-layer buffers {k: (L arrays [B, ...])}, the form `decode` carries.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from catchjax.model import llama
from catchjax.sample.layout import cache_layout, left_pad_inputs
from catchjax.sample.logits import sample_from_logits
from catchjax.sample.spec import ProgramSpec, is_eos


def prompt_forward(spec: ProgramSpec, m, prefix_P, prefix_len, suffix_BxT, lens_B, cache_len):
  """Run a batch of prompts = shared prefix (prefix_P, left-padded; run once at batch 1 and
  broadcast into every row's cache) + per-row suffix (suffix_BxT, left-padded) into a fresh
  cache of cache_len slots. Returns the suffix hidden states [B, Ts, D] and the cache."""
  cfg = spec.cfg
  B, Ts = suffix_BxT.shape
  Pb = prefix_P.shape[0]
  S = cache_len
  suffix_BxT, lens_B = spec.shard(suffix_BxT), spec.shard(lens_B)
  k_pos, k_valid = cache_layout(lens_B, prefix_len, Pb, Ts, S)
  cache = llama.init_cache(cfg, B, S - Pb)
  if Pb:
    ppos, pvalid = left_pad_inputs(prefix_len[None], Pb)
    pmask = llama.make_mask(ppos, ppos, pvalid, window=cfg.sliding_window)
    _, pcache = m.hidden(prefix_P[None], ppos, pmask, cache=llama.init_cache(cfg, 1, Pb),
                         cache_index=0)
    cache = {k: jnp.concatenate(
        [jnp.broadcast_to(pcache[k], (cfg.num_layers, B) + pcache[k].shape[2:]), v],
        axis=llama.CACHE_SEQ_AXIS[k])
             for k, v in cache.items()}
  cache = spec.shard_cache(cache)
  q_pos = jnp.maximum(jax.lax.dynamic_slice_in_dim(k_pos, Pb, Ts, axis=1), 0)
  slots = jnp.arange(S, dtype=jnp.int32)[None, :]
  mask = llama.make_mask(q_pos, k_pos, k_valid & (slots < Pb + Ts), window=cfg.sliding_window)
  h, cache = m.hidden(suffix_BxT, q_pos, mask, cache=cache, cache_index=Pb,
                      key_positions_BxS=k_pos)
  return h, spec.shard_cache(cache)


def per_layer(spec: ProgramSpec, cache):
  """A stacked cache [L, B, ...] as per-layer buffers {k: (L arrays [B, ...])}."""
  return {k: tuple(spec.shard_layer_cache(v[i]) for i in range(v.shape[0]))
          for k, v in cache.items()}


def _first_token(m, h, active_B, seeds_B, eos_E, pad_id, temperature, top_k, top_p, mode):
  """The first new token of each row from the last prompt position: (tok, lp, done)."""
  logits = m.logits(h[:, -1])
  keys = jax.vmap(jax.random.key)(seeds_B)
  tok, lp = sample_from_logits(logits, keys, 0, temperature, top_k, top_p, mode)
  tok = jnp.where(active_B, tok, pad_id)
  lp = jnp.where(active_B, lp, 0.0)
  return tok, lp, ~active_B | is_eos(tok, eos_E)


def prefill_fn(spec, state, prefix_P, prefix_len, suffix_BxT, lens_B, active_B, seeds_B,
               eos_E, pad_id, temperature, top_k, top_p, *, cache_len, mode):
  """Prompt forward into a cache with room for the new tokens; returns the (per-layer) cache
  and the first sampled token, its raw log-prob and done of each row."""
  m = spec.merge(state)
  h, cache = prompt_forward(spec, m, prefix_P, prefix_len, suffix_BxT, lens_B, cache_len)
  tok, lp, done = _first_token(m, h, active_B, seeds_B, eos_E, pad_id, temperature, top_k,
                               top_p, mode)
  return per_layer(spec, cache), tok, lp, done


prefill = jax.jit(prefill_fn, static_argnums=0, static_argnames=("cache_len", "mode"))


@functools.partial(jax.jit, static_argnums=0, static_argnames=("batch", "cache_len"))
def empty_cache(spec, *, batch, cache_len):
  return per_layer(spec, llama.init_cache(spec.cfg, batch, cache_len))


def _write_rows(cache, part, row0, Pb, T, Ts):
  """Write a group's stacked cache `part` (slots [0, Pb + T)) into rows [row0, row0 + b) of the
  batch's per-layer cache: the prefix at [0, Pb), the suffix right-aligned at
  [Pb + Ts - T, Pb + Ts)."""
  cache = {k: list(v) for k, v in cache.items()}
  for k, ax in llama.CACHE_SEQ_AXIS.items():
    ax -= 1                                   # per-layer buffers: no layer axis
    for li in range(len(cache[k])):
      buf, src = cache[k][li], part[k][li]
      idx = [0] * buf.ndim
      idx[0] = row0
      if Pb:
        buf = jax.lax.dynamic_update_slice(
            buf, jax.lax.slice_in_dim(src, 0, Pb, axis=ax), tuple(idx))
      idx[ax] = Pb + Ts - T
      cache[k][li] = jax.lax.dynamic_update_slice(
          buf, jax.lax.slice_in_dim(src, Pb, Pb + T, axis=ax), tuple(idx))
  return {k: tuple(v) for k, v in cache.items()}


@functools.partial(jax.jit, static_argnums=0, static_argnames=("prompt_len", "mode"),
                   donate_argnames=("cache",))
def prefill_rows(spec, state, cache, row0, prefix_P, prefix_len, suffix_bxT, lens_b, active_b,
                 seeds_b, eos_E, pad_id, temperature, top_k, top_p, *, prompt_len, mode):
  """`prefill` for b rows of a batch whose suffix bucket is prompt_len (Ts) while these rows
  need only T <= Ts: run them at [b, T] and write their keys/values into rows
  [row0, row0 + b) of the batch's (donated) cache, at the slots that the batch layout
  (`layout.cache_layout`) gives them; the slots in between stay masked. Returns the cache and
  these rows' first token, log-prob and done."""
  m = spec.merge(state)
  Pb, T = prefix_P.shape[0], suffix_bxT.shape[1]
  h, part = prompt_forward(spec, m, prefix_P, prefix_len, suffix_bxT, lens_b, Pb + T)
  cache = _write_rows(cache, part, row0, Pb, T, prompt_len)
  tok, lp, done = _first_token(m, h, active_b, seeds_b, eos_E, pad_id, temperature, top_k,
                               top_p, mode)
  return cache, tok, lp, done
