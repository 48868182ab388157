"""The host side of generation for one batch: prefill (whole, or in row groups), the decode
loop (whole, or in chunks that drop finished rows), and the rows cut at their EOS.

Row groups (`prefill_rows`): the batch is prefilled in groups of rows, each at its own longest
suffix (rounded up to a multiple of 4), and written into the batch's cache at the slots the
batch layout gives them: rows come sorted by length, so short prompts are not computed at the
longest one's padded length.

Compaction (`compact_rows`, opt-in): the decode loop stops every `decode_chunk` steps; when the
rows not yet done fit a smaller multiple of compact_rows, the host gathers those rows (cache,
tokens, seeds) into a smaller batch and decoding goes on with it, so rows past their EOS stop
costing compute. Each smaller batch size is one more compiled decode (at most
batch / compact_rows per prompt shape). Off by default (WORKSPACE.md, "Performance").
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from catchjax import sharding
from catchjax.sample import decode as decode_lib
from catchjax.sample import layout
from catchjax.sample import prefill as prefill_lib
from catchjax.sample.engine import Engine
from catchjax.sample.layout import PromptBatch, round_up
from catchjax.sample.params import SampleOutput, SamplingParams


@dataclasses.dataclass(frozen=True)
class Draw:
  """How one `generate` call samples: the traced values (`dyn`), the static mode, the number
  of new tokens (max_new) and its static bucket (out_len, a multiple of 8)."""

  dyn: tuple              # (EOS ids padded with -1 to MAX_EOS, pad id, temperature, top-k, top-p)
  mode: tuple
  max_new: int
  out_len: int

  @classmethod
  def of(cls, params: SamplingParams, eos_ids: Sequence[int], pad_id: int) -> Draw:
    dyn = (np.asarray(list(eos_ids) + [-1] * (layout.MAX_EOS - len(eos_ids)), np.int32),
           np.int32(pad_id), np.float32(params.temperature if not params.greedy else 1.0),
           np.int32(params.top_k), np.float32(params.top_p))
    return cls(dyn, params.mode(), params.max_new_tokens,
               round_up(params.max_new_tokens, layout.NEW_TOKENS_MULTIPLE))


def prefill_batch(engine: Engine, batch: PromptBatch, active, seeds, draw: Draw, *,
                  prefill_rows: int, buckets: Sequence[int]):
  """Prefill one batch into a cache of Pb + Ts + N slots: (cache, tok, lp, done). With
  prefill_rows set (and no mesh), each group of that many rows runs at its own suffix length."""
  B, b = batch.suffix.shape[0], prefill_rows
  Pb, Ts, N, mode = batch.prefix_block, batch.suffix_block, draw.out_len, draw.mode
  if not b or b >= B or engine.spec.mesh is not None:
    args = tuple(map(engine.put, (batch.suffix, batch.lens, active, seeds)))
    return engine.run("prefill", ("prefill", B, Pb, Ts, N, mode), prefill_lib.prefill,
                      engine.state, batch.prefix, batch.prefix_len, *args, *draw.dyn,
                      cache_len=Pb + Ts + N, mode=mode)
  cache = engine.run("empty_cache", ("empty_cache", B, Pb + Ts + N), prefill_lib.empty_cache,
                     batch=B, cache_len=Pb + Ts + N)
  outs = []
  for r0 in range(0, B, b):
    rows = slice(r0, r0 + b)
    T = layout.row_group_len(int(batch.suffix_lens[rows].max()), Ts, buckets)
    args = tuple(map(jnp.asarray, (batch.suffix[rows, Ts - T:], batch.lens[rows],
                                   active[rows], seeds[rows])))
    cache, *out = engine.run(
        "prefill_rows", ("prefill_rows", b, Pb, T, Ts, N, mode), prefill_lib.prefill_rows,
        engine.state, cache, np.int32(r0), batch.prefix, batch.prefix_len, *args, *draw.dyn,
        prompt_len=Ts, mode=mode)
    outs.append(out)
  return (cache,) + tuple(jnp.concatenate(x) for x in zip(*outs))


def decode_batch(engine: Engine, layers, carry, batch: PromptBatch, seeds, draw: Draw, *,
                 compact_rows: int, decode_chunk: int, pad_id: int, stats: dict):
  """Decode one prefilled batch (carry = prefill's (cache, tok, lp, done)) to max_new tokens;
  returns host (tokens [B, N], log-probs [B, N], steps). With compact_rows (and no mesh) the
  loop stops every decode_chunk steps and, when the rows not yet done fit a smaller multiple
  of compact_rows, carries on with only those rows (plus done ones to fill the multiple).
  Each row's draws depend only on its seed and step, so its tokens do not change."""
  cache, tok, lp, done = carry
  B, g, N, max_new = batch.suffix.shape[0], compact_rows, draw.out_len, draw.max_new
  Pb, Ts = batch.prefix_block, batch.suffix_block
  chunked = bool(g) and g < B and engine.spec.mesh is None
  toks = jnp.full((B, N), pad_id, jnp.int32).at[:, 0].set(tok)
  lps = jnp.zeros((B, N), jnp.float32).at[:, 0].set(lp)
  lens_d, sd_d = engine.put(batch.lens), engine.put(seeds)
  out_toks = np.full((B, N), pad_id, np.int32)
  out_lps = np.zeros((B, N), np.float32)
  rows, t = np.arange(B), 1
  static = {"prefix_block": Pb, "prompt_len": Ts, "out_len": N, "mode": draw.mode}
  while True:
    t_end = min(t + decode_chunk, max_new) if chunked else max_new
    cache, tok, done, toks, lps, t_d = engine.run(
        "decode", ("decode", len(rows), Pb, Ts, N, draw.mode), decode_lib.decode,
        engine.state, layers, cache, tok, done, toks, lps, np.int32(t), np.int32(t_end),
        batch.prefix_len, lens_d, sd_d, *draw.dyn, **static)
    stats["decode_row_steps"] += len(rows) * (int(t_d) - t)
    t = int(t_d)
    if t >= max_new:
      break
    done_h = sharding.to_host(done)
    if done_h.all():
      break
    n = round_up(int((~done_h).sum()), g)
    if n < len(rows):
      keep = np.concatenate([np.flatnonzero(~done_h), np.flatnonzero(done_h)])[:n]
      out_toks[rows], out_lps[rows] = sharding.to_host(toks), sharding.to_host(lps)
      cache, tok, done, toks, lps, lens_d, sd_d = engine.run(
          "compact", ("compact", len(rows), n, Pb + Ts + N), decode_lib.compact,
          cache, tok, done, toks, lps, lens_d, sd_d, jnp.asarray(keep, jnp.int32))
      rows = rows[keep]
  out_toks[rows], out_lps[rows] = sharding.to_host(toks), sharding.to_host(lps)
  return out_toks, out_lps, t


class OutputRows:
  """A generate call's rows in the caller's order, each cut right after its first EOS."""

  def __init__(self, n: int, max_new: int, pad_id: int, eos_ids: Sequence[int]):
    self.max_new, self.eos_ids = max_new, tuple(eos_ids)
    self.tokens: list = [None] * n
    self.logprobs: list = [None] * n
    self.finished: list = [False] * n
    self.token_array = np.full((n, max_new), pad_id, np.int32)

  def add(self, idx, toks, lps) -> None:
    """Rows r of toks / lps [B, N] are the caller's rows idx[r]."""
    for r, i in enumerate(idx):
      row = toks[r, :self.max_new]
      self.token_array[i] = row
      hit = np.isin(row, self.eos_ids) if self.eos_ids else np.zeros_like(row, bool)
      end = int(np.argmax(hit)) + 1 if hit.any() else len(row)
      self.tokens[i] = row[:end].tolist()
      self.logprobs[i] = lps[r, :end].copy()
      self.finished[i] = bool(hit.any())

  def output(self, prompts, tokenizer=None) -> SampleOutput:
    text = None
    if tokenizer is not None:
      text = [tokenizer.decode(t, skip_special_tokens=True) for t in self.tokens]
    return SampleOutput(tokens=self.tokens, logprobs=self.logprobs,
                        num_prompt_tokens=[len(p) for p in prompts], finished=self.finished,
                        token_array=self.token_array, text=text)
