"""Batched sampling and teacher-forced scoring for the Llama-family decoder (gemma-style).

Design
------
`Sampler` splits the nnx model once (`nnx.split`) and keeps a few *pure* functions of
(state, arrays), compiled ahead of time with functional `jax.jit` and cached per shape
(module-wide, so Samplers over the same architecture share them; `Sampler.compile_seconds`
records what each compile cost):

* **prefill** -- a batch of prompts becomes [shared prefix | per-row suffix]. The longest
  prefix common to every row of the batch (chat prompts share the whole system turn) is run
  once at batch 1 and its keys/values are broadcast into every row's cache; the rest of each
  prompt is LEFT-padded to a length bucket Ts and run at batch B. (Without a common prefix the
  whole prompt is the suffix.) The cache has S = Pb + Ts + N slots (Pb: prefix bucket, N:
  max_new_tokens rounded up to a multiple of 8). The LM head is applied to the last position
  only (left padding puts every row's last prompt token there) and the first new token is
  sampled from it.
  With `prefill_rows` (default: ~32 rows, a divisor of the batch size), the batch is prefilled
  in groups of rows, each at its own longest suffix (rounded up to a multiple of 4), and
  written into the batch's cache at the slots the batch layout gives them: rows come sorted by
  length, so short prompts are not computed at the longest one's padded length.
* **decode** -- a `lax.while_loop` over the KV cache, kept as per-layer buffers (prefill
  writes them) with per-layer copies of the weights (made once per `generate` call; a layer
  scan over stacked arrays would slice weights and write a stacked cache every step): step t
  feeds the token sampled at step t-1 at slot Pb + Ts + t - 1 and samples token t. It stops
  when every row has produced an EOS or after max_new_tokens. Tokens after a row's EOS are the
  pad id (log-prob 0) on device; the host cuts each row right after its first EOS.
  With `compact_rows` (opt-in) the loop stops every `decode_chunk` steps; when the rows not
  yet done fit a smaller multiple of compact_rows, the host gathers those rows (cache,
  tokens, seeds) into a smaller batch and decoding goes on with it, so rows past their EOS
  stop costing compute. Each smaller batch size is one more compiled decode (at most
  batch / compact_rows per prompt shape). Off by
  default: on the headline's batch shape (batch 100, 12 new tokens) few rows end early and the
  host check every chunk made decode slower (WORKSPACE.md, "Performance").

Positions and masks are per row: every real token keeps the position it has in the unpadded
prompt (the first prompt token is position 0), padding and not-yet-written slots are masked
out (`llama.make_mask`), so gaps in the cache are harmless and a row's numbers do not depend on
the batch it is in. All shapes are static: prompts go in fixed-size batches (the last one
padded with inactive dummy rows), Pb and Ts come from `prompt_buckets`, N from max_new_tokens,
and the EOS ids, pad id, temperature, top-k and top-p are traced values -- so repeated calls
never recompile. Prompts are sorted by length before batching (results come back in the
caller's order) so that buckets are tight.

Randomness is per row: row i at step t uses the key `fold_in(key(seed_i), t)`, so a prompt
samples the same tokens alone or inside any mixed batch (up to float round-off in the logits).
Temperature 0 is greedy. Otherwise the logits are divided by the temperature, filtered by
top-k (`lax.top_k` over a static power-of-two candidate count >= 8, the dynamic k picks the
threshold) and/or top-p (nucleus: from the sorted top-k candidates when top-k is on, else by
bisection on the probability threshold -- a full sort of the vocabulary is slow on CPU), and
sampled by inverse CDF with one uniform per row (a two-level cumulative sum over blocks of 256
logits; cheaper than generating Gumbel-max noise).

`SampleOutput.logprobs` are the RAW model log-probs of each chosen token: log-softmax of the
unscaled, unfiltered logits (temperature 1). That is the quantity needed for likelihoods and
KL estimates; the log-prob under the tempered/filtered sampling distribution is not returned.

Teacher forcing: `score` runs one forward over prompt + continuation through the same
shared-prefix + left-padded-suffix path (no decode) and returns log p(continuation token |
everything before it) per token; the LM head is applied only to the positions that predict
continuation tokens, a few positions at a time, so no [B, T, V] array is ever built.
`next_token_logprobs` gives log p(candidate | prompt) for a list of candidate next tokens (A-vs-B
choices, the probability that an attack starts with a given token). Both use the raw model
distribution (temperature 1, no filtering).

Sharding: with `mesh` given, every batch-major array (tokens, cache, outputs) is sharded over
the mesh's batch axes ('data', and 'fsdp' when the mesh has it) with `NamedSharding`, and the
weights by the logical-axis `rules` (`sharding.state_shardings`, the rules training uses;
default `sharding.DEFAULT_RULES`). Experiments build their Sampler with
`catchjax.stages.sampling.make_sampler`, on the mesh of `config.sampler`. With mesh=None
everything lives on the default device.

Speed notes (XLA:CPU; figures in WORKSPACE.md, "Performance"): argmax is written as max +
min-of-iota (`jnp.argmax` is slower there) and the chosen token's log-prob is gathered from the
logits minus logsumexp (cheaper than gathering from a materialised log_softmax).
`Sampler.last_stats` / `last_decode_steps` report the prefill / decode wall time of the last
`generate` call.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from catchjax import common, sharding
from catchjax.common import common_prefix_len
from catchjax.model import llama

DEFAULT_PROMPT_BUCKETS = (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256,
                          320, 384, 448, 512)
_PREFILL_ROWS = 32               # default `prefill_rows` (see Sampler)
_ROWS_MULTIPLE, _ROWS_FINE_UPTO = 4, 64   # `prefill_rows` groups: suffix length multiple of 4
_NEW_TOKENS_MULTIPLE = 8      # max_new_tokens is rounded up to this for the static shapes
_SCORE_CHUNK = 8              # LM-head positions computed at once when scoring
_MIN_SHARED_PREFIX = 8        # shorter common prompt prefixes are not prefilled separately
_MAX_EOS = 8                  # EOS ids are passed as a padded array of this length
_MIN_TOPK_CAP = 8             # top-k candidates are fetched in powers of two >= this
_CDF_BLOCK = 256              # block size of the two-level inverse-CDF sampler
_TOP_P_BISECT_STEPS = 30

# Compiled executables shared by all Samplers: key -> (executable, compile seconds).
_COMPILE_CACHE: dict[tuple, tuple[object, float]] = {}


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """temperature 0 = greedy; top_k 0 = off; top_p 1.0 = off."""

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  max_new_tokens: int = 64

  def __post_init__(self):
    if not self.temperature >= 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0, got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0

  def mode(self) -> tuple[bool, int, bool]:
    """The static part (what changes the compiled program): (greedy, top-k candidate count
    (0 = no top-k), full-vocabulary top-p on)."""
    if self.greedy:
      return (True, 0, False)
    if self.top_k > 0:   # top-p, if any, is applied among the top-k candidates
      return (False, max(_MIN_TOPK_CAP, 1 << (self.top_k - 1).bit_length()), False)
    return (False, 0, self.top_p < 1.0)


@dataclasses.dataclass
class SampleOutput:
  tokens: list[list[int]]          # new tokens, up to and including the first EOS
  logprobs: list[np.ndarray]       # raw model log p(token) (log-softmax at temperature 1)
  num_prompt_tokens: list[int]
  finished: list[bool]             # True if the row ended with an EOS
  token_array: np.ndarray          # [N, max_new_tokens] int32 as decoded: pad after EOS
  text: list[str] | None = None    # decoded new tokens (special tokens skipped), if tokenizer


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _pick_bucket(n: int, buckets: Sequence[int], what: str) -> int:
  for b in buckets:
    if b >= n:
      return b
  raise ValueError(f"{what} of length {n} exceeds the largest bucket {buckets[-1]}; "
                   f"pass larger prompt_buckets to Sampler.")


# ------------------------------------------------------------------------ sampling
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
  (over blocks of _CDF_BLOCK, then inside the chosen block): XLA:CPU's cumsum over the whole
  vocabulary is much slower."""
  B, V = x_BxV.shape
  nb = -(-V // _CDF_BLOCK)
  x = jnp.pad(x_BxV, ((0, 0), (0, nb * _CDF_BLOCK - V)), constant_values=-jnp.inf)
  w = jnp.exp(x - jnp.max(x, axis=-1, keepdims=True)).reshape(B, nb, _CDF_BLOCK)
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
  last_nz = _CDF_BLOCK - 1 - fast_argmax(jnp.flip(row > 0, axis=-1).astype(jnp.int32))
  j = jnp.minimum(j, last_nz)
  return (bi * _CDF_BLOCK + j).astype(jnp.int32)


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
  lo, hi = jax.lax.fori_loop(0, _TOP_P_BISECT_STEPS, body, (lo, hi))
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


# ------------------------------------------------------------------------ pure functions
def _left_pad_inputs(lens_B, T):
  """Per-row positions [B,T] (0 at the first real token) and validity [B,T] of a left-padded
  batch of length T."""
  pad = T - lens_B
  j = jnp.arange(T, dtype=jnp.int32)[None, :]
  valid = j >= pad[:, None]
  pos = jnp.where(valid, j - pad[:, None], 0)
  return pos, valid


def _cache_layout(lens_B, prefix_len, Pb, Ts, S):
  """Key position [B,S] and validity [B,S] of every cache slot (decode slots included; the
  caller also masks slots not written yet).

  Slots: [0, Pb) the shared prefix, left-padded (prefix_len real tokens, positions
  0..prefix_len-1); [Pb, Pb+Ts) each row's own suffix, left-padded; [Pb+Ts, S) new tokens.
  Row i (total prompt length lens_B[i]) has its slot j >= Pb at position j - Pb - Ts + lens_i.
  """
  j = jnp.arange(S, dtype=jnp.int32)[None, :]
  lens = lens_B[:, None]
  in_prefix = j < Pb
  k_pos = jnp.where(in_prefix, j - (Pb - prefix_len), j - Pb - Ts + lens)
  suffix_len = lens - prefix_len
  k_valid = jnp.where(in_prefix, j >= Pb - prefix_len, j >= Pb + Ts - suffix_len)
  return k_pos, k_valid


class _Fns:
  """The pure functions, closed over the graphdef and the static configuration."""

  def __init__(self, graphdef, cfg, mesh, batch_axes):
    self.graphdef, self.cfg = graphdef, cfg
    self.mesh, self.batch_axes = mesh, batch_axes

  def _c(self, x, batch_axis=0):
    """Shard a batch-major array over the batch mesh axes (no-op without a mesh)."""
    if self.mesh is None:
      return x
    spec = [None] * x.ndim
    spec[batch_axis] = self.batch_axes
    return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, P(*spec)))

  def _cache_c(self, cache):
    return {k: self._c(v, 1) for k, v in cache.items()}

  @staticmethod
  def _is_eos(tok_B, eos_E):
    return jnp.any(tok_B[:, None] == eos_E[None, :], axis=-1)

  def _prompt_forward(self, m, prefix_P, prefix_len, suffix_BxT, lens_B, cache_len):
    """Run a batch of prompts = shared prefix (prefix_P, left-padded; run once at batch 1 and
    broadcast into every row's cache) + per-row suffix (suffix_BxT, left-padded) into a fresh
    cache of cache_len slots. Returns the suffix hidden states [B, Ts, D] and the cache."""
    cfg = self.cfg
    B, Ts = suffix_BxT.shape
    Pb = prefix_P.shape[0]
    S = cache_len
    suffix_BxT, lens_B = self._c(suffix_BxT), self._c(lens_B)
    k_pos, k_valid = _cache_layout(lens_B, prefix_len, Pb, Ts, S)
    cache = llama.init_cache(cfg, B, S - Pb)
    if Pb:
      ppos, pvalid = _left_pad_inputs(prefix_len[None], Pb)
      pmask = llama.make_mask(ppos, ppos, pvalid, window=cfg.sliding_window)
      _, pcache = m.hidden(prefix_P[None], ppos, pmask, cache=llama.init_cache(cfg, 1, Pb),
                           cache_index=0)
      cache = {k: jnp.concatenate(
          [jnp.broadcast_to(pcache[k], (cfg.num_layers, B) + pcache[k].shape[2:]), v],
          axis=llama.CACHE_SEQ_AXIS[k])
               for k, v in cache.items()}
    cache = self._cache_c(cache)
    q_pos = jnp.maximum(jax.lax.dynamic_slice_in_dim(k_pos, Pb, Ts, axis=1), 0)
    slots = jnp.arange(S, dtype=jnp.int32)[None, :]
    mask = llama.make_mask(q_pos, k_pos, k_valid & (slots < Pb + Ts), window=cfg.sliding_window)
    h, cache = m.hidden(suffix_BxT, q_pos, mask, cache=cache, cache_index=Pb,
                        key_positions_BxS=k_pos)
    return h, self._cache_c(cache)

  # -- generation
  def prefill(self, state, prefix_P, prefix_len, suffix_BxT, lens_B, active_B, seeds_B,
              eos_E, pad_id, temperature, top_k, top_p, *, cache_len, mode):
    """Prompt forward (see `_prompt_forward`) into a cache with room for the new tokens;
    returns the cache and the first sampled token of each row."""
    m = nnx.merge(self.graphdef, state)
    h, cache = self._prompt_forward(m, prefix_P, prefix_len, suffix_BxT, lens_B, cache_len)
    logits = m.logits(h[:, -1])
    keys = jax.vmap(jax.random.key)(seeds_B)
    tok, lp = sample_from_logits(logits, keys, 0, temperature, top_k, top_p, mode)
    tok = jnp.where(active_B, tok, pad_id)
    lp = jnp.where(active_B, lp, 0.0)
    done = ~active_B | self._is_eos(tok, eos_E)
    return self._per_layer(cache), tok, lp, done

  def _per_layer(self, cache):
    """A stacked cache [L, B, ...] as per-layer buffers {k: (L arrays [B, ...])}, the form
    `decode` carries."""
    return {k: tuple(self._c(v[i]) for i in range(v.shape[0])) for k, v in cache.items()}

  def empty_cache(self, *, batch, cache_len):
    return self._per_layer(llama.init_cache(self.cfg, batch, cache_len))

  def unstack(self, state):
    """Per-layer copies of the stacked layer weights (made once per `generate` call)."""
    return llama.unstack_layers(nnx.merge(self.graphdef, state))

  def compact(self, cache, tok_B, done_B, toks, lps, lens_B, seeds_B, keep_b):
    """Rows keep_b (b < B) of everything `decode` carries: drops rows that are done."""
    take = lambda x: self._c(jnp.take(x, keep_b, axis=0))
    return ({k: tuple(take(x) for x in v) for k, v in cache.items()},
            *(take(x) for x in (tok_B, done_B, toks, lps, lens_B, seeds_B)))

  def prefill_rows(self, state, cache, row0, prefix_P, prefix_len, suffix_bxT, lens_b, active_b,
                   seeds_b, eos_E, pad_id, temperature, top_k, top_p, *, prompt_len, mode):
    """`prefill` for b rows of a batch whose suffix bucket is prompt_len (Ts) while these rows
    need only T <= Ts: run them at [b, T] and write their keys/values into rows
    [row0, row0 + b) of the batch's (donated) cache, the suffix slots right-aligned at
    [Pb + Ts - T, Pb + Ts) -- the slots that the batch layout (`_cache_layout`) gives them; the
    slots in between stay masked. Returns the cache and these rows' first token."""
    m = nnx.merge(self.graphdef, state)
    Pb, T, Ts = prefix_P.shape[0], suffix_bxT.shape[1], prompt_len
    h, part = self._prompt_forward(m, prefix_P, prefix_len, suffix_bxT, lens_b, Pb + T)
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
    cache = {k: tuple(v) for k, v in cache.items()}
    logits = m.logits(h[:, -1])
    keys = jax.vmap(jax.random.key)(seeds_b)
    tok, lp = sample_from_logits(logits, keys, 0, temperature, top_k, top_p, mode)
    tok = jnp.where(active_b, tok, pad_id)
    lp = jnp.where(active_b, lp, 0.0)
    return cache, tok, lp, ~active_b | self._is_eos(tok, eos_E)

  def decode(self, state, layers, cache, tok_B, done_B, toks, lps, t, t_end, prefix_len, lens_B,
             seeds_B, eos_E, pad_id, temperature, top_k, top_p, *, prefix_block, prompt_len,
             out_len, mode):
    """lax.while_loop of single-token steps over the (per-layer, donated) KV cache: step t
    feeds the token sampled at step t-1 and writes token t into toks / lps [B, N]; runs while
    t < t_end and some row is not done. Returns the carry (cache, last tokens, done, toks, lps,
    t), so that the host can resume it -- after dropping done rows (`compact`) -- or stop."""
    cfg = self.cfg
    m = nnx.merge(self.graphdef, state)
    Pb, Ts, N = prefix_block, prompt_len, out_len
    S = Pb + Ts + N
    keys = jax.vmap(jax.random.key)(seeds_B)
    k_pos, k_valid = _cache_layout(lens_B, prefix_len, Pb, Ts, S)
    slots = jnp.arange(S, dtype=jnp.int32)[None, :]

    def cond(c):
      t, _, _, done, _, _ = c
      return (t < t_end) & ~jnp.all(done)

    # The loop runs on per-layer weights (`unstack`) and per-layer cache buffers: a layer scan
    # over stacked arrays would slice every layer's weights and write into the stacked cache
    # on every step.
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
      cache = {k: tuple(self._c(x) for x in v) for k, v in cache.items()}
      return t + 1, cache, new, done | self._is_eos(new, eos_E), toks, lps

    t, cache, tok, done, toks, lps = jax.lax.while_loop(
        cond, body, (t, cache, tok_B, done_B, toks, lps))
    return cache, tok, done, self._c(toks), self._c(lps), t

  # -- teacher forcing
  def score(self, state, prefix_P, prefix_len, suffix_BxT, lens_B, *, cont_len):
    """log p(suffix[:, T-C+j] | everything before it) for j < C: [B, C]. The LM head runs
    only on the C positions that predict them, _SCORE_CHUNK positions at a time."""
    m = nnx.merge(self.graphdef, state)
    T, C = suffix_BxT.shape[1], cont_len
    h, _ = self._prompt_forward(m, prefix_P, prefix_len, suffix_BxT, lens_B,
                                prefix_P.shape[0] + T)
    hs = jnp.moveaxis(h[:, T - C - 1:T - 1], 1, 0)          # [C, B, D]
    tg = jnp.moveaxis(self._c(suffix_BxT)[:, T - C:], 1, 0)  # [C, B]

    def one(args):
      hc, tc = args
      logits = m.logits(hc)                                  # [B, V]
      lse = jax.nn.logsumexp(logits, axis=-1)
      return jnp.take_along_axis(logits, tc[:, None], axis=-1)[:, 0] - lse

    out = jax.lax.map(one, (hs, tg), batch_size=min(C, _SCORE_CHUNK))
    return self._c(out.T)

  def next_token(self, state, prefix_P, prefix_len, suffix_BxT, lens_B, cand_K):
    m = nnx.merge(self.graphdef, state)
    h, _ = self._prompt_forward(m, prefix_P, prefix_len, suffix_BxT, lens_B,
                                prefix_P.shape[0] + suffix_BxT.shape[1])
    logits = m.logits(h[:, -1])
    return self._c(logits[:, cand_K] - jax.nn.logsumexp(logits, axis=-1, keepdims=True))


def _signature(tree) -> tuple:
  """Hashable (structure, shapes, dtypes, shardings) of the arguments of a compiled call."""
  leaves, treedef = jax.tree.flatten(tree)

  def one(x):
    s = getattr(x, "sharding", None)
    s = s if isinstance(s, NamedSharding) else None
    return (tuple(np.shape(x)), str(getattr(x, "dtype", type(x).__name__)), s)
  return (treedef, tuple(one(x) for x in leaves))


def _auto_prefill_rows(batch_size: int) -> int:
  """The divisor of batch_size in [_PREFILL_ROWS / 2, 2 * _PREFILL_ROWS] closest to
  _PREFILL_ROWS, smaller than the batch (e.g. 128 -> 32, 100 -> 25); 0 (one prefill per
  batch) when there is none."""
  lo, hi = _PREFILL_ROWS // 2, 2 * _PREFILL_ROWS
  ds = [d for d in range(lo, min(hi, batch_size - 1) + 1) if batch_size % d == 0]
  return min(ds, key=lambda d: (abs(d - _PREFILL_ROWS), d)) if ds else 0


def _auto_mesh(mesh: Mesh) -> Mesh:
  """The same mesh with Auto axes (with_sharding_constraint needs Auto axes)."""
  types = getattr(mesh, "axis_types", None)
  if types and any(t != AxisType.Auto for t in types):
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(types))
  return mesh


# ------------------------------------------------------------------------ the Sampler
class Sampler:
  """Batched generation and scoring for a `llama.Llama` (see the module docstring).

  Args:
    model: an nnx `llama.Llama` (split once here; call `update_model` after training it).
    prompt_buckets: allowed padded lengths (ascending) for prompts, shared prefixes and
      prompt+continuation when scoring. Each bucket used compiles once.
    batch_size: rows per compiled batch (the last batch is padded with dummy rows). With a mesh
      it must be divisible by the product of the batch axes' sizes.
    mesh: optional `jax.sharding.Mesh`; the batch is sharded over its axes named in
      `batch_axes` (those present; 'data' at least).
    batch_axes: mesh axes to shard the batch over.
    rules: logical-axis sharding rules for the weights on the mesh (`sharding.rules_dict`
      input; default `sharding.DEFAULT_RULES`). Unused without a mesh.
    eos_ids: token ids that end a row (default: model.cfg.eos_ids; at most 8).
    pad_id: id written after EOS and used for padding (default: cfg.pad_token_id, else the
      first EOS id, else 0).
    tokenizer: optional HF tokenizer; if given `SampleOutput.text` is filled in.
    progress: show a tqdm bar over batches (each call can override it).
    share_prefix: prefill the longest prompt prefix common to a batch once (batch 1) and
      broadcast its keys/values into every row (chat prompts share the system turn).
    compact_rows: drop rows that are done from the decode batch, to a multiple of this many
      rows, every `decode_chunk` steps (see the module docstring). 0 (default): never; e.g.
      batch/8 for workloads where many rows end long before max_new_tokens. Not used with a
      mesh.
    decode_chunk: decode steps between the host's checks for done rows (with compact_rows).
    prefill_rows: prefill a batch in groups of this many rows (must divide batch_size), each
      at the suffix bucket of its own longest prompt, instead of every row at the batch's
      longest (rows are sorted by length, so this removes most padding). 0: one prefill per
      batch. None (default): the divisor of batch_size in [16, 64] closest to 32 (128 -> 32,
      100 -> 25), else 0. Not used with a mesh (one sharded prefill per batch there).

  Attributes: `compile_seconds` {shape key: seconds} of the programs this Sampler used,
  `last_stats` (prefill_s, decode_s, prefill_tokens, decode_row_steps: batch rows x decode
  steps computed) and `last_decode_steps` (tokens produced
  per batch; fewer than max_new_tokens when every row hit EOS) of the last `generate`.
  """

  def __init__(self, model: llama.Llama, *,
               prompt_buckets: Sequence[int] = DEFAULT_PROMPT_BUCKETS, batch_size: int = 64,
               mesh: Mesh | None = None, batch_axes: Sequence[str] = ("data", "fsdp"),
               rules=None,
               eos_ids: Sequence[int] | None = None, pad_id: int | None = None,
               tokenizer=None, progress: bool = True, share_prefix: bool = True,
               prefill_rows: int | None = None, compact_rows: int = 0,
               decode_chunk: int = 4):
    self.cfg = model.cfg
    self.prompt_buckets = tuple(sorted(int(b) for b in prompt_buckets))
    if not self.prompt_buckets or self.prompt_buckets[0] < 1:
      raise ValueError(f"prompt_buckets must be positive lengths, got {prompt_buckets}")
    self.batch_size = int(batch_size)
    self.batch_axes = None
    if mesh is not None:
      if "data" not in mesh.axis_names:
        raise ValueError(f"mesh needs an axis named 'data', has {mesh.axis_names}")
      mesh = _auto_mesh(mesh)
      axes = tuple(a for a in batch_axes if a in mesh.axis_names)
      if not axes:
        raise ValueError(f"none of batch_axes {tuple(batch_axes)} is in mesh {mesh.axis_names}")
      n = int(np.prod([mesh.shape[a] for a in axes]))
      if self.batch_size % n:
        raise ValueError(f"batch_size {batch_size} is not divisible by the batch mesh axes "
                         f"{axes} (size {n})")
      self.batch_axes = axes if len(axes) > 1 else axes[0]
    self.mesh = mesh
    self.rules = sharding.rules_dict(rules)
    eos = tuple(int(e) for e in (self.cfg.eos_ids if eos_ids is None else eos_ids))
    if len(eos) > _MAX_EOS:
      raise ValueError(f"at most {_MAX_EOS} EOS ids, got {len(eos)}")
    self.eos_ids = eos
    if pad_id is None:
      pad_id = (self.cfg.pad_token_id if self.cfg.pad_token_id is not None
                else (eos[0] if eos else 0))
    self.pad_id = int(pad_id)
    self.tokenizer = tokenizer
    self.progress = progress
    self.share_prefix = share_prefix
    if prefill_rows is None:   # auto
      prefill_rows = _auto_prefill_rows(self.batch_size)
    if prefill_rows and (prefill_rows < 1 or self.batch_size % prefill_rows):
      raise ValueError(f"prefill_rows {prefill_rows} must divide batch_size {self.batch_size}")
    self.prefill_rows = int(prefill_rows or 0)
    if compact_rows < 0 or decode_chunk < 1:
      raise ValueError(f"compact_rows must be >= 0 and decode_chunk >= 1, got {compact_rows} "
                       f"and {decode_chunk}")
    self.compact_rows, self.decode_chunk = int(compact_rows), int(decode_chunk)
    self.graphdef, state = nnx.split(model)
    self.state = self._place_state(state)
    self.compile_seconds: dict[tuple, float] = {}
    self.last_decode_steps: list[int] = []
    self.last_stats: dict[str, float] = {}

  # -- state / placement
  def update_model(self, model: llama.Llama) -> None:
    """Use new weights (same architecture); compiled functions are kept."""
    graphdef, state = nnx.split(model)
    if graphdef != self.graphdef:
      # Training-graph knobs (remat, frozen blocks) do not change the weights or the sampling
      # math: keep this sampler's graph and compiled functions, take the new weights.
      same_cfg = model.cfg.without_training_knobs() == self.cfg.without_training_knobs()
      if not same_cfg or jax.tree.structure(state) != jax.tree.structure(self.state):
        raise ValueError("update_model needs a model with the same structure; build a new "
                         "Sampler")
    self.state = self._place_state(state)

  def _place_state(self, state):
    if self.mesh is None:
      # One canonical placement: weights fresh from the training loop carry a NamedSharding
      # over a 1-device mesh, loaded ones a single-device sharding; without this the same
      # program compiled twice (a recompile per headline cell's first measurement).
      dev = jax.devices()[0]

      def canon(x):
        s = getattr(x, "sharding", None)
        return x if isinstance(s, SingleDeviceSharding) else jax.device_put(x, dev)
      return jax.tree.map(canon, state)

    # The weights by the same logical rules as training (FSDP over 'embed', tensor parallelism
    # over heads / mlp / vocab); weights already placed so are kept as they are.
    want = sharding.state_shardings(state, self.mesh, self.rules)
    return jax.tree.map(lambda x, s: x if getattr(x, "sharding", None) == s
                        else sharding.shard_state(x, s), state, want)

  def _put(self, x: np.ndarray):
    if self.mesh is None:
      return jnp.asarray(x)
    return jax.device_put(x, NamedSharding(self.mesh, P(self.batch_axes)))

  def _run(self, name, key, args, static, donate=()):
    """Call the AOT-compiled `name` for these argument shapes (compiled once per shape)."""
    full_key = (name, self.graphdef, self.mesh, self.batch_axes, tuple(sorted(static.items())),
                _signature(args))
    if full_key not in _COMPILE_CACHE:
      t0 = time.perf_counter()
      fn = functools.partial(getattr(_Fns(self.graphdef, self.cfg, self.mesh, self.batch_axes),
                                      name), **static)
      compiled = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
      _COMPILE_CACHE[full_key] = (compiled, time.perf_counter() - t0)
      common.record_compile(f"sampler {name}", _COMPILE_CACHE[full_key][1])
    compiled, secs = _COMPILE_CACHE[full_key]
    self.compile_seconds.setdefault(key, secs)
    return compiled(*args)

  # -- batching helpers
  def _check_prompts(self, prompts, what="prompt"):
    out = []
    V = self.cfg.vocab_size
    for i, p in enumerate(prompts):
      a = np.asarray(p, dtype=np.int64).reshape(-1)
      if a.size == 0:
        raise ValueError(f"{what} {i} is empty; every prompt needs at least one token")
      if a.min() < 0 or a.max() >= V:
        raise ValueError(f"{what} {i} has token ids outside [0, {V})")
      out.append(a.astype(np.int32))
    return out

  def _batches(self, lengths, progress, desc):
    """Indices sorted by length (longest first), cut into batches of batch_size."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
    show = self.progress if progress is None else progress
    if show and batches:
      from tqdm.auto import tqdm
      return tqdm(batches, desc=desc, leave=False)
    return batches

  def _left_pad(self, seqs, T):
    B = self.batch_size
    tokens = np.full((B, T), self.pad_id, np.int32)
    lens = np.ones((B,), np.int32)          # dummy rows: one pad token
    for r, s in enumerate(seqs):
      if len(s):
        tokens[r, T - len(s):] = s
      lens[r] = len(s)
    return tokens, lens

  def _shared_prefix_len(self, seqs, limit: int) -> int:
    """Length of the longest prefix common to all seqs, at most `limit`; 0 when sharing is off
    or it is shorter than _MIN_SHARED_PREFIX (not worth a separate pass)."""
    if not self.share_prefix:
      return 0
    p = common_prefix_len(seqs, limit)
    return p if p >= _MIN_SHARED_PREFIX else 0

  def _prefix_suffix(self, seqs, limit: int, what: str):
    """Split a batch into (prefix [Pb], p, suffix [B, Ts], lens [B], suffix lens [B])."""
    p = self._shared_prefix_len(seqs, limit)
    Pb = _pick_bucket(p, self.prompt_buckets, "shared prefix") if p else 0
    prefix = np.full((Pb,), self.pad_id, np.int32)
    if p:
      prefix[Pb - p:] = seqs[0][:p]
    Ts = _pick_bucket(max(len(s) for s in seqs) - p, self.prompt_buckets, what)
    suffix, slens = self._left_pad([s[p:] for s in seqs], Ts)
    # Dummy rows: a one-token suffix after the prefix.
    return jnp.asarray(prefix), np.int32(p), suffix, slens + p, slens

  def _prefill(self, prefix, p, suffix, lens, slens, active, sd, dyn, Pb, Ts, N, mode):
    """Prefill one batch into a cache of Pb + Ts + N slots. Rows come sorted longest first;
    with `prefill_rows` set, each group of that many rows runs at its own (shorter) suffix
    bucket, so short prompts are not computed at the longest one's padded length."""
    B, b = self.batch_size, self.prefill_rows
    if not b or b >= B or self.mesh is not None:
      args = tuple(map(self._put, (suffix, lens, active, sd)))
      return self._run("prefill", ("prefill", B, Pb, Ts, N, mode),
                       (self.state, prefix, p) + args + dyn,
                       dict(cache_len=Pb + Ts + N, mode=mode))
    cache = self._run("empty_cache", ("empty_cache", B, Pb + Ts + N), (),
                      dict(batch=B, cache_len=Pb + Ts + N))
    outs = []
    for r0 in range(0, B, b):
      rows = slice(r0, r0 + b)
      n = int(slens[rows].max())
      # Finer buckets than prompt_buckets for short groups (a few more compiled shapes, less
      # padding on chat-length prompts); never longer than the batch's own bucket.
      T = (min(_round_up(n, _ROWS_MULTIPLE), Ts) if n <= _ROWS_FINE_UPTO
           else _pick_bucket(n, self.prompt_buckets, "prompt"))
      args = tuple(map(jnp.asarray, (suffix[rows, Ts - T:], lens[rows], active[rows], sd[rows])))
      cache, *out = self._run(
          "prefill_rows", ("prefill_rows", b, Pb, T, Ts, N, mode),
          (self.state, cache, np.int32(r0), prefix, p) + args + dyn,
          dict(prompt_len=Ts, mode=mode), donate=(1,))
      outs.append(out)
    return (cache,) + tuple(jnp.concatenate(x) for x in zip(*outs))

  def _decode(self, layers, cache, tok, lp, done, p, lens, sd, dyn, max_new, Pb, Ts, N, mode):
    """Decode one prefilled batch to max_new tokens; returns host (tokens [B, N], log-probs
    [B, N], steps). With `compact_rows`, the while_loop stops every `decode_chunk` steps and,
    when the rows not yet done fit a smaller multiple of compact_rows, carries on with only
    those rows (plus done ones to fill the multiple): rows past their EOS stop costing
    compute. Each row's draws depend only on its seed and step, so its tokens do not change."""
    B, g = self.batch_size, self.compact_rows
    chunked = bool(g) and g < B and self.mesh is None
    toks = jnp.full((B, N), self.pad_id, jnp.int32).at[:, 0].set(tok)
    lps = jnp.zeros((B, N), jnp.float32).at[:, 0].set(lp)
    lens_d, sd_d = self._put(lens), self._put(sd)
    out_toks = np.full((B, N), self.pad_id, np.int32)
    out_lps = np.zeros((B, N), np.float32)
    rows, t = np.arange(B), 1
    static = dict(prefix_block=Pb, prompt_len=Ts, out_len=N, mode=mode)
    while True:
      t_end = min(t + self.decode_chunk, max_new) if chunked else max_new
      cache, tok, done, toks, lps, t_d = self._run(
          "decode", ("decode", len(rows), Pb, Ts, N, mode),
          (self.state, layers, cache, tok, done, toks, lps, np.int32(t), np.int32(t_end), p,
           lens_d, sd_d) + dyn, static, donate=(2, 5, 6))
      self.last_stats["decode_row_steps"] += len(rows) * (int(t_d) - t)
      t = int(t_d)
      if t >= max_new:
        break
      done_h = sharding.to_host(done)
      if done_h.all():
        break
      n = _round_up(int((~done_h).sum()), g)
      if n < len(rows):
        keep = np.concatenate([np.flatnonzero(~done_h), np.flatnonzero(done_h)])[:n]
        out_toks[rows], out_lps[rows] = sharding.to_host(toks), sharding.to_host(lps)
        cache, tok, done, toks, lps, lens_d, sd_d = self._run(
            "compact", ("compact", len(rows), n, Pb + Ts + N),
            (cache, tok, done, toks, lps, lens_d, sd_d, jnp.asarray(keep, jnp.int32)), {})
        rows = rows[keep]
    out_toks[rows], out_lps[rows] = sharding.to_host(toks), sharding.to_host(lps)
    return out_toks, out_lps, t

  # -- generation
  def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | None = None,
               seeds: Sequence[int] | int = 0, *, progress: bool | None = None) -> SampleOutput:
    """Generate for every prompt (lists of token ids). seeds: one per prompt, or an int s
    meaning s, s+1, ... by prompt index (pass a list to make a prompt's randomness independent
    of its index)."""
    params = params or SamplingParams()
    ps = self._check_prompts(prompts)
    n = len(ps)
    if isinstance(seeds, (int, np.integer)):
      seeds = [int(seeds) + i for i in range(n)]
    seeds = [int(s) % (1 << 32) for s in seeds]
    if len(seeds) != n:
      raise ValueError(f"got {len(seeds)} seeds for {n} prompts")
    mode = params.mode()
    N = _round_up(params.max_new_tokens, _NEW_TOKENS_MULTIPLE)
    dyn = (np.asarray(list(self.eos_ids) + [-1] * (_MAX_EOS - len(self.eos_ids)), np.int32),
           np.int32(self.pad_id), np.float32(params.temperature if not params.greedy else 1.0),
           np.int32(params.top_k), np.float32(params.top_p))
    tokens_out: list = [None] * n
    lps_out: list = [None] * n
    finished: list = [False] * n
    token_array = np.full((n, params.max_new_tokens), self.pad_id, np.int32)
    self.last_decode_steps = []   # tokens produced per batch (< max_new: early exit)
    # Wall time of the last call (compiles included if any happened in it).
    self.last_stats = stats = {"prefill_s": 0.0, "decode_s": 0.0, "prefill_tokens": 0,
                               "decode_row_steps": 0}
    B = self.batch_size
    layers = None      # per-layer weight copies for decode, made once per call
    for idx in self._batches([len(p) for p in ps], progress, "generate"):
      seqs = [ps[i] for i in idx]
      prefix, p, suffix, lens, slens = self._prefix_suffix(
          seqs, min(len(s) for s in seqs) - 1, "prompt")
      Pb, Ts = prefix.shape[0], suffix.shape[1]
      active = np.zeros((B,), bool)
      active[:len(idx)] = True
      sd = np.zeros((B,), np.uint32)
      sd[:len(idx)] = [seeds[i] for i in idx]
      t0 = time.perf_counter()
      cache, tok, lp, done = self._prefill(prefix, p, suffix, lens, slens, active, sd, dyn,
                                           Pb, Ts, N, mode)
      tok.block_until_ready()
      t1 = time.perf_counter()
      if layers is None:
        layers = self._run("unstack", ("unstack",), (self.state,), {})
      toks, lps, steps = self._decode(layers, cache, tok, lp, done, p, lens, sd, dyn,
                                      params.max_new_tokens, Pb, Ts, N, mode)
      t2 = time.perf_counter()
      self.last_decode_steps.append(steps)
      stats["prefill_s"] += t1 - t0
      stats["decode_s"] += t2 - t1
      stats["prefill_tokens"] += int(p) + int(np.sum(slens[:len(idx)]))  # computed, not padded
      for r, i in enumerate(idx):
        row = toks[r, :params.max_new_tokens]
        token_array[i] = row
        hit = np.isin(row, self.eos_ids) if self.eos_ids else np.zeros_like(row, bool)
        end = int(np.argmax(hit)) + 1 if hit.any() else len(row)
        tokens_out[i] = row[:end].tolist()
        lps_out[i] = lps[r, :end].copy()
        finished[i] = bool(hit.any())
    text = None
    if self.tokenizer is not None:
      text = [self.tokenizer.decode(t, skip_special_tokens=True) for t in tokens_out]
    return SampleOutput(tokens=tokens_out, logprobs=lps_out,
                        num_prompt_tokens=[len(p) for p in ps], finished=finished,
                        token_array=token_array, text=text)

  # -- teacher forcing
  def score(self, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]], *,
            progress: bool | None = None) -> list[np.ndarray]:
    """Per-token log p(continuation[j] | prompt + continuation[:j]) (float32 arrays, raw
    model distribution)."""
    if len(prompts) != len(continuations):
      raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    ps = self._check_prompts(prompts)
    cs = [np.asarray(c, np.int64).reshape(-1) for c in continuations]
    for i, c in enumerate(cs):
      if c.size and (c.min() < 0 or c.max() >= self.cfg.vocab_size):
        raise ValueError(f"continuation {i} has token ids outside [0, {self.cfg.vocab_size})")
    cs = [c.astype(np.int32) for c in cs]
    full = [np.concatenate([p, c]) for p, c in zip(ps, cs)]
    out: list = [None] * len(ps)
    B = self.batch_size
    for idx in self._batches([len(f) for f in full], progress, "score"):
      # The shared prefix stays inside every prompt, so the positions that predict the
      # continuation (last prompt token onwards) are all in the suffix block.
      prefix, p, suffix, lens, _ = self._prefix_suffix(
          [full[i] for i in idx], min(len(ps[i]) for i in idx) - 1, "prompt+continuation")
      Pb, T = prefix.shape[0], suffix.shape[1]
      cmax = max(max(len(cs[i]) for i in idx), 1)
      C = min(1 << (cmax - 1).bit_length(), T - 1)
      lp = sharding.to_host(self._run(
          "score", ("score", B, Pb, T, C),
          (self.state, prefix, p, self._put(suffix), self._put(lens)), dict(cont_len=C)))
      for r, i in enumerate(idx):
        c = len(cs[i])
        out[i] = lp[r, C - c:].copy() if c else np.zeros((0,), np.float32)
    return out

  def score_sum(self, prompts, continuations, **kw) -> np.ndarray:
    """Total log p(continuation | prompt) per pair: [N] float64."""
    return np.array([float(np.sum(s, dtype=np.float64))
                     for s in self.score(prompts, continuations, **kw)])

  def next_token_logprobs(self, prompts: Sequence[Sequence[int]], token_ids: Sequence[int], *,
                          progress: bool | None = None) -> np.ndarray:
    """log p(next token = token_ids[k] | prompt): [N, K] float32 (full-vocab normalisation)."""
    ps = self._check_prompts(prompts)
    cand = np.asarray(token_ids, np.int64).reshape(-1)
    if cand.size == 0 or cand.min() < 0 or cand.max() >= self.cfg.vocab_size:
      raise ValueError(f"token_ids must be non-empty ids in [0, {self.cfg.vocab_size})")
    cand = cand.astype(np.int32)
    out = np.zeros((len(ps), cand.size), np.float32)
    B = self.batch_size
    for idx in self._batches([len(p) for p in ps], progress, "next-token"):
      seqs = [ps[i] for i in idx]
      prefix, p, suffix, lens, _ = self._prefix_suffix(
          seqs, min(len(s) for s in seqs) - 1, "prompt")
      res = self._run("next_token", ("next", B, prefix.shape[0], suffix.shape[1], cand.size),
                      (self.state, prefix, p, self._put(suffix), self._put(lens),
                       jnp.asarray(cand)), {})
      out[idx] = sharding.to_host(res)[:len(idx)]
    return out
