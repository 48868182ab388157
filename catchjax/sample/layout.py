"""Batch layout: prompts as [shared prefix | per-row left-padded suffix], length buckets, the
cache's slots and every slot's position.

A batch of prompts becomes [shared prefix | per-row suffix]: the longest prefix common to
every row (chat prompts share the whole system turn) is run once at batch 1 and broadcast into
every row's cache; the rest of each prompt is LEFT-padded to a length bucket Ts. (Without a
common prefix the whole prompt is the suffix.) The cache has S = Pb + Ts + N slots (Pb: prefix
bucket, N: max_new_tokens rounded up to a multiple of 8). Every real token keeps the position it
has in the unpadded prompt (the first prompt token is position 0); padding and slots not
written yet are masked out, so gaps in the cache are harmless and a row's numbers do not
depend on the batch it is in.

Host-side helpers (numpy) build the padded batch; `left_pad_inputs` and `cache_layout` are the
device-side positions and validity the programs use.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from catchjax.common import common_prefix_len

DEFAULT_PROMPT_BUCKETS = (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256,
                          320, 384, 448, 512)
PREFILL_ROWS = 32               # default `prefill_rows` (see Sampler)
ROWS_MULTIPLE, ROWS_FINE_UPTO = 4, 64   # `prefill_rows` groups: suffix length multiple of 4
NEW_TOKENS_MULTIPLE = 8      # max_new_tokens is rounded up to this for the static shapes
MIN_SHARED_PREFIX = 8        # shorter common prompt prefixes are not prefilled separately
MAX_EOS = 8                  # EOS ids are passed as a padded array of this length


def round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def pick_bucket(n: int, buckets: Sequence[int], what: str) -> int:
  for b in buckets:
    if b >= n:
      return b
  raise ValueError(f"{what} of length {n} exceeds the largest bucket {buckets[-1]}; "
                   f"pass larger prompt_buckets to Sampler.")


def auto_prefill_rows(batch_size: int) -> int:
  """The divisor of batch_size in [PREFILL_ROWS / 2, 2 * PREFILL_ROWS] closest to
  PREFILL_ROWS, smaller than the batch (e.g. 128 -> 32, 100 -> 25); 0 (one prefill per
  batch) when there is none."""
  lo, hi = PREFILL_ROWS // 2, 2 * PREFILL_ROWS
  ds = [d for d in range(lo, min(hi, batch_size - 1) + 1) if batch_size % d == 0]
  return min(ds, key=lambda d: (abs(d - PREFILL_ROWS), d)) if ds else 0


def row_group_len(n: int, Ts: int, buckets: Sequence[int]) -> int:
  """The suffix length a `prefill_rows` group whose longest suffix is n runs at: finer buckets
  than prompt_buckets for short groups (a few more compiled shapes, less padding on
  chat-length prompts), never longer than the batch's own bucket Ts."""
  if n <= ROWS_FINE_UPTO:
    return min(round_up(n, ROWS_MULTIPLE), Ts)
  return pick_bucket(n, buckets, "prompt")


# ------------------------------------------------------------------------ host side
def check_tokens(seqs, vocab_size: int, what: str = "prompt", allow_empty: bool = False):
  """int32 arrays of seqs; ValueError naming the first empty one (unless allowed) or the
  first with ids outside [0, vocab_size)."""
  out = []
  for i, s in enumerate(seqs):
    a = np.asarray(s, dtype=np.int64).reshape(-1)
    if a.size == 0 and not allow_empty:
      raise ValueError(f"{what} {i} is empty; every prompt needs at least one token")
    if a.size and (a.min() < 0 or a.max() >= vocab_size):
      raise ValueError(f"{what} {i} has token ids outside [0, {vocab_size})")
    out.append(a.astype(np.int32))
  return out


def sorted_batches(lengths, batch_size: int, show: bool, desc: str):
  """Indices sorted by length (longest first), cut into batches of batch_size (a tqdm bar
  over them when show)."""
  order = np.argsort(-np.asarray(lengths), kind="stable")
  batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
  if show and batches:
    from tqdm.auto import tqdm
    return tqdm(batches, desc=desc, leave=False)
  return batches


def left_pad(seqs, T: int, batch_size: int, pad_id: int):
  """(tokens [B, T] left-padded with pad_id, lengths [B]); dummy rows past the seqs hold one
  pad token."""
  tokens = np.full((batch_size, T), pad_id, np.int32)
  lens = np.ones((batch_size,), np.int32)
  for r, s in enumerate(seqs):
    if len(s):
      tokens[r, T - len(s):] = s
    lens[r] = len(s)
  return tokens, lens


@dataclasses.dataclass(frozen=True)
class PromptBatch:
  """One batch as [shared prefix | per-row left-padded suffix]."""

  prefix: jax.Array         # [Pb] the shared prefix, left-padded (Pb = 0: none)
  prefix_len: np.int32      # p: its real length
  suffix: np.ndarray        # [B, Ts] each row's rest, left-padded (dummy rows: one pad)
  lens: np.ndarray          # [B] prompt lengths p + suffix length
  suffix_lens: np.ndarray   # [B]

  @property
  def prefix_block(self) -> int:
    return self.prefix.shape[0]

  @property
  def suffix_block(self) -> int:
    return self.suffix.shape[1]


def split_prompts(seqs, limit: int, *, batch_size: int, pad_id: int, buckets: Sequence[int],
                  share_prefix: bool, what: str) -> PromptBatch:
  """The batch of seqs with their longest common prefix (at most `limit` tokens; none when
  share_prefix is off or it is shorter than MIN_SHARED_PREFIX, not worth a separate pass)."""
  p = common_prefix_len(seqs, limit) if share_prefix else 0
  p = p if p >= MIN_SHARED_PREFIX else 0
  Pb = pick_bucket(p, buckets, "shared prefix") if p else 0
  prefix = np.full((Pb,), pad_id, np.int32)
  if p:
    prefix[Pb - p:] = seqs[0][:p]
  Ts = pick_bucket(max(len(s) for s in seqs) - p, buckets, what)
  suffix, slens = left_pad([s[p:] for s in seqs], Ts, batch_size, pad_id)
  return PromptBatch(jnp.asarray(prefix), np.int32(p), suffix, slens + p, slens)


# ------------------------------------------------------------------------ device side
def left_pad_inputs(lens_B, T):
  """Per-row positions [B,T] (0 at the first real token) and validity [B,T] of a left-padded
  batch of length T."""
  pad = T - lens_B
  j = jnp.arange(T, dtype=jnp.int32)[None, :]
  valid = j >= pad[:, None]
  pos = jnp.where(valid, j - pad[:, None], 0)
  return pos, valid


def cache_layout(lens_B, prefix_len, Pb, Ts, S):
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
