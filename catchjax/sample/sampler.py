"""`Sampler`: the front of the sampling engine (batching, generate, score, next-token)."""
from __future__ import annotations

import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from catchjax import sharding
from catchjax.model import llama
from catchjax.sample import decode as decode_lib
from catchjax.sample import layout, loop, scoring
from catchjax.sample.engine import Engine, batch_mesh
from catchjax.sample.params import SampleOutput, SamplingParams
from catchjax.sample.spec import ProgramSpec, cache_head_axes


class Sampler:
  """Batched generation and scoring for a `llama.Llama` (see `catchjax.sample`).

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
      rows, every `decode_chunk` steps (see `loop`). 0 (default): never; e.g. batch/8 for
      workloads where many rows end long before max_new_tokens. Not used with a mesh.
    decode_chunk: decode steps between the host's checks for done rows (with compact_rows).
    prefill_rows: prefill a batch in groups of this many rows (must divide batch_size), each
      at the suffix bucket of its own longest prompt, instead of every row at the batch's
      longest (rows are sorted by length, so this removes most padding). 0: one prefill per
      batch. None (default): the divisor of batch_size in [16, 64] closest to 32 (128 -> 32,
      100 -> 25), else 0. Not used with a mesh (one sharded prefill per batch there).

  Attributes: `engine` (the program spec, the placed weights `state`, `compile_seconds`
  {shape key: seconds this Sampler spent compiling that program; 0.0 when JAX's jit cache
  already held it}), `last_stats` (prefill_s, decode_s, prefill_tokens, decode_row_steps:
  batch rows x decode steps computed) and `last_decode_steps` (tokens produced per batch;
  fewer than max_new_tokens when every row hit EOS) of the last `generate`.
  """

  def __init__(self, model: llama.Llama, *,
               prompt_buckets: Sequence[int] = layout.DEFAULT_PROMPT_BUCKETS,
               batch_size: int = 64, mesh: Mesh | None = None,
               batch_axes: Sequence[str] = ("data", "fsdp"), rules=None,
               eos_ids: Sequence[int] | None = None, pad_id: int | None = None,
               tokenizer=None, progress: bool = True, share_prefix: bool = True,
               prefill_rows: int | None = None, compact_rows: int = 0,
               decode_chunk: int = 4):
    self.cfg = cfg = model.cfg
    self.prompt_buckets = tuple(sorted(int(b) for b in prompt_buckets))
    if not self.prompt_buckets or self.prompt_buckets[0] < 1:
      raise ValueError(f"prompt_buckets must be positive lengths, got {prompt_buckets}")
    self.batch_size = int(batch_size)
    axes = None
    if mesh is not None:
      mesh, axes = batch_mesh(mesh, batch_axes, self.batch_size)
    eos = tuple(int(e) for e in (cfg.eos_ids if eos_ids is None else eos_ids))
    if len(eos) > layout.MAX_EOS:
      raise ValueError(f"at most {layout.MAX_EOS} EOS ids, got {len(eos)}")
    self.eos_ids = eos
    if pad_id is None:
      pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else (eos[0] if eos else 0)
    self.pad_id = int(pad_id)
    self.tokenizer, self.progress, self.share_prefix = tokenizer, progress, share_prefix
    if prefill_rows is None:   # auto
      prefill_rows = layout.auto_prefill_rows(self.batch_size)
    if prefill_rows and (prefill_rows < 1 or self.batch_size % prefill_rows):
      raise ValueError(f"prefill_rows {prefill_rows} must divide batch_size {self.batch_size}")
    self.prefill_rows = int(prefill_rows or 0)
    if compact_rows < 0 or decode_chunk < 1:
      raise ValueError(f"compact_rows must be >= 0 and decode_chunk >= 1, got {compact_rows} "
                       f"and {decode_chunk}")
    self.compact_rows, self.decode_chunk = int(compact_rows), int(decode_chunk)
    graphdef, state = nnx.split(model)
    rules = sharding.rules_dict(rules)
    heads = cache_head_axes(mesh, rules, axes, cfg.num_kv_heads)
    self.engine = Engine(ProgramSpec(graphdef, cfg, mesh, axes, heads), state, rules)
    self.last_decode_steps: list[int] = []
    self.last_stats: dict[str, float] = {}

  # The engine's parts, as attributes of the Sampler.
  state = property(lambda self: self.engine.state)
  graphdef = property(lambda self: self.engine.spec.graphdef)
  mesh = property(lambda self: self.engine.spec.mesh)
  batch_axes = property(lambda self: self.engine.spec.batch_axes)
  rules = property(lambda self: self.engine.rules)
  compile_seconds = property(lambda self: self.engine.compile_seconds)

  def update_model(self, model: llama.Llama) -> None:
    """Use new weights (same architecture); compiled functions are kept."""
    graphdef, state = nnx.split(model)
    if graphdef != self.graphdef:
      if model.cfg != self.cfg or jax.tree.structure(state) != jax.tree.structure(self.state):
        raise ValueError("update_model needs a model with the same structure; build a new "
                         "Sampler")
    self.engine.state = self.engine.place(state)

  # -- batching
  def _batches(self, lengths, progress, desc):
    show = self.progress if progress is None else progress
    return layout.sorted_batches(lengths, self.batch_size, show, desc)

  def _split(self, seqs, limit: int, what: str) -> layout.PromptBatch:
    return layout.split_prompts(seqs, limit, batch_size=self.batch_size, pad_id=self.pad_id,
                                buckets=self.prompt_buckets, share_prefix=self.share_prefix,
                                what=what)

  # -- generation
  def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | None = None,
               seeds: Sequence[int] | int = 0, *, progress: bool | None = None) -> SampleOutput:
    """Generate for every prompt (lists of token ids). seeds: one per prompt, or an int s
    meaning s, s+1, ... by prompt index (pass a list to make a prompt's randomness independent
    of its index)."""
    params = params or SamplingParams()
    ps = layout.check_tokens(prompts, self.cfg.vocab_size)
    n = len(ps)
    if isinstance(seeds, (int, np.integer)):
      seeds = [int(seeds) + i for i in range(n)]
    seeds = [int(s) % (1 << 32) for s in seeds]
    if len(seeds) != n:
      raise ValueError(f"got {len(seeds)} seeds for {n} prompts")
    draw = loop.Draw.of(params, self.eos_ids, self.pad_id)
    rows = loop.OutputRows(n, params.max_new_tokens, self.pad_id, self.eos_ids)
    self.last_decode_steps = []   # tokens produced per batch (< max_new: early exit)
    # Wall time of the last call (compiles included if any happened in it).
    self.last_stats = stats = {"prefill_s": 0.0, "decode_s": 0.0, "prefill_tokens": 0,
                               "decode_row_steps": 0}
    layers = None      # per-layer weight copies for decode, made once per call
    for idx in self._batches([len(p) for p in ps], progress, "generate"):
      seqs = [ps[i] for i in idx]
      batch = self._split(seqs, min(len(s) for s in seqs) - 1, "prompt")
      active = np.zeros((self.batch_size,), bool)
      active[:len(idx)] = True
      sd = np.zeros((self.batch_size,), np.uint32)
      sd[:len(idx)] = [seeds[i] for i in idx]
      t0 = time.perf_counter()
      carry = loop.prefill_batch(self.engine, batch, active, sd, draw,
                                 prefill_rows=self.prefill_rows, buckets=self.prompt_buckets)
      carry[1].block_until_ready()
      t1 = time.perf_counter()
      if layers is None:
        layers = self.engine.run("unstack", ("unstack",), decode_lib.unstack, self.state)
      toks, lps, steps = loop.decode_batch(
          self.engine, layers, carry, batch, sd, draw, compact_rows=self.compact_rows,
          decode_chunk=self.decode_chunk, pad_id=self.pad_id, stats=stats)
      self.last_decode_steps.append(steps)
      stats["prefill_s"] += t1 - t0
      stats["decode_s"] += time.perf_counter() - t1
      # Tokens computed, not padded.
      stats["prefill_tokens"] += int(batch.prefix_len) + int(np.sum(batch.suffix_lens[:len(idx)]))
      rows.add(idx, toks, lps)
    return rows.output(ps, self.tokenizer)

  # -- teacher forcing
  def score(self, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]], *,
            progress: bool | None = None) -> list[np.ndarray]:
    """Per-token log p(continuation[j] | prompt + continuation[:j]) (float32 arrays, raw
    model distribution)."""
    if len(prompts) != len(continuations):
      raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    ps = layout.check_tokens(prompts, self.cfg.vocab_size)
    cs = layout.check_tokens(continuations, self.cfg.vocab_size, "continuation",
                             allow_empty=True)
    full = [np.concatenate([p, c]) for p, c in zip(ps, cs)]
    out: list = [None] * len(ps)
    for idx in self._batches([len(f) for f in full], progress, "score"):
      # The shared prefix stays inside every prompt, so the positions that predict the
      # continuation (last prompt token onwards) are all in the suffix block.
      batch = self._split([full[i] for i in idx], min(len(ps[i]) for i in idx) - 1,
                          "prompt+continuation")
      Pb, T = batch.prefix_block, batch.suffix_block
      cmax = max(max(len(cs[i]) for i in idx), 1)
      C = min(1 << (cmax - 1).bit_length(), T - 1)
      e = self.engine
      lp = sharding.to_host(e.run(
          "score", ("score", self.batch_size, Pb, T, C), scoring.score, e.state, batch.prefix,
          batch.prefix_len, e.put(batch.suffix), e.put(batch.lens), cont_len=C))
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
    ps = layout.check_tokens(prompts, self.cfg.vocab_size)
    cand = np.asarray(token_ids, np.int64).reshape(-1)
    if cand.size == 0 or cand.min() < 0 or cand.max() >= self.cfg.vocab_size:
      raise ValueError(f"token_ids must be non-empty ids in [0, {self.cfg.vocab_size})")
    cand = cand.astype(np.int32)
    out = np.zeros((len(ps), cand.size), np.float32)
    e = self.engine
    for idx in self._batches([len(p) for p in ps], progress, "next-token"):
      seqs = [ps[i] for i in idx]
      batch = self._split(seqs, min(len(s) for s in seqs) - 1, "prompt")
      key = ("next", self.batch_size, batch.prefix_block, batch.suffix_block, cand.size)
      res = e.run("next_token", key, scoring.next_token, e.state, batch.prefix,
                  batch.prefix_len, e.put(batch.suffix), e.put(batch.lens), jnp.asarray(cand))
      out[idx] = sharding.to_host(res)[:len(idx)]
    return out
