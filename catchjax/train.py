"""The one supervised fine-tuning loop every experiment shares.

    result = train(model, dataset, cfg, workdir, eval_fn=None)

* Data: rows of `input_ids` (list[int]) and `loss_mask` (list[int]; 1 where the token is a
  training target, i.e. its prediction from the previous position is trained; the first
  token of an example can never be a target). An optional `loss_weight` column (list[float])
  scales the per-token loss (e.g. a scratchpad at 0.1). Examples are packed greedily
  (first-fit) into rows of `seq_len` with segment ids, after a seeded shuffle per epoch, so
  the data order is a pure function of (dataset, config) and resumes exactly. With
  `share_prefix` the token prefix every example shares (the chat template's system turn: 14
  of the organism mix's ~54 tokens per example) is stored once per row and attended to by
  each of the row's examples, so a row holds more examples for the same loss.
* Step: one `jax.jit` with explicit in/out shardings and donated params / optimizer state.
  The LM head runs only at the loss positions: each row's loss positions are gathered into a
  fixed-size [batch, K] index array (K = the largest per-row count in the whole run, so shapes
  are static), which skips the ~20% of SmolLM2's FLOPs the head spends on prompt tokens.
  Loss = weighted mean cross-entropy over all loss tokens of the step (micro-batches of a
  gradient-accumulation scan share the same denominator, so accumulation is exact).
* Optimizer: AdamW (decoupled weight decay, not on norms / biases), warmup then cosine /
  linear / constant decay, global-norm clipping. LoRA (cfg.lora_rank > 0): only LoRAParam
  adapters are trained and have optimizer state; otherwise every nnx.Param is trained.
* Checkpoints (orbax, <workdir>/ckpt): trainable params, optimizer state and a JSON meta item
  (step, data position, rng, metrics history, data fingerprint). Killed runs resume
  bitwise-exactly from the newest good step; a corrupt newest step is skipped with a warning.
* Metrics: loss, grad norm, lr, tokens/s and MFU per step to TensorBoard (<workdir>/tb), a
  tqdm bar and the returned `TrainResult.history`.

Multi-host: call `sharding.maybe_initialize_distributed()` first thing in the entry point.
Every process then runs `train` with the same arguments; each one builds only the rows of
the global batch that live on its own devices, and only process 0 writes TensorBoard / logs.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import math
import os
import time
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from catchjax import sharding as shd
from catchjax.checkpoint import Checkpointer, restore_params  # noqa: F401  (re-export)
from catchjax.common import common_prefix_len
from catchjax.model import llama

log = logging.getLogger(__name__)

TOO_LONG_RULES = ("drop", "truncate")
DECAYS = ("cosine", "linear", "constant")


class TrainingDivergedError(FloatingPointError):
  """The loss or gradient norm became NaN/inf; the last good checkpoint is kept."""


# ------------------------------------------------------------------------------ config
def default_train_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Length of training: `steps` optimizer steps if > 0, else `epochs` passes over the data.
  c.steps = 0
  c.epochs = 1
  c.batch_size = 8            # packed rows per optimizer step (global, all hosts together)
  c.seq_len = 512             # tokens per row
  c.grad_accum = 1            # micro-batches per step (batch_size must divide evenly)
  c.pack = True               # False: one example per row
  c.share_prefix = False      # packed rows store the examples' common token prefix (e.g. the
                              # chat template's system turn) once; same loss, fewer tokens
  c.too_long = "drop"         # example longer than seq_len: 'drop' | 'truncate' (keep head)
  c.max_loss_tokens = 0       # K per row for the LM-head gather; 0 = exact max of the run
  c.ce_chunk = 0              # > 0: LM head + CE over K in rematerialised chunks (memory)
  # Optimizer.
  c.lr = 1e-4
  c.warmup_steps = 0
  c.decay = "cosine"          # cosine | linear | constant (after warmup)
  c.end_lr_ratio = 0.0        # final lr = lr * end_lr_ratio
  c.b1 = 0.9
  c.b2 = 0.999
  c.eps = 1e-8
  c.weight_decay = 0.0        # decoupled; never applied to norms or biases
  c.clip = 1.0                # global-norm clip; 0 = off
  # What is trained and how.
  c.lora_rank = 0             # > 0: LoRA adapters of this rank only (base frozen)
  c.lora_alpha = 16.0
  c.remat = "none"            # none | full | dots (model cfg.remat for the training graph)
  c.freeze_layers = 0         # > 0: the first k blocks run forward only (no gradient, no
                              # backward pass); a tied embedding still learns via the LM head
  c.seed = 0
  # Checkpoints, logging, eval.
  c.ckpt_every = 100          # steps between async saves (0 = only the final save, -1 = none)
  c.keep = 3                  # checkpoints kept (0 = all)
  c.async_ckpt = True
  c.log_every = 1             # TensorBoard scalar interval
  c.eval_every = 0            # call eval_fn every N steps (and at the end); 0 = only at end
  c.eval_at_start = False     # also call eval_fn before the first step
  c.peak_flops = 0.0          # peak FLOP/s of ONE device, for MFU; 0: by device kind and
                              # compute dtype (common.device_peak_flops; CPU: 180e9)
  # Mesh and sharding.
  c.mesh_shape = (1, -1, 1)   # ('data', 'fsdp', 'tensor'); -1 = all remaining devices
  c.mesh_axes = shd.MESH_AXES
  c.rules = shd.DEFAULT_RULES
  return c


def _merge_config(cfg) -> ml_collections.ConfigDict:
  base = default_train_config()
  if cfg is None:
    return base
  items = cfg.items() if hasattr(cfg, "items") else vars(cfg).items()
  unknown = [k for k, _ in items if k not in base]
  if unknown:
    raise ValueError(f"unknown train config field(s) {unknown}; known: {sorted(base.keys())}")
  with base.unlocked():
    for k, v in (cfg.items() if hasattr(cfg, "items") else vars(cfg).items()):
      base[k] = v
  c = base
  if c.too_long not in TOO_LONG_RULES:
    raise ValueError(f"too_long={c.too_long!r}; use one of {TOO_LONG_RULES}.")
  if c.decay not in DECAYS:
    raise ValueError(f"decay={c.decay!r}; use one of {DECAYS}.")
  if c.remat not in llama.REMAT_POLICIES:
    raise ValueError(f"remat={c.remat!r}; use one of {tuple(llama.REMAT_POLICIES)}.")
  if c.seq_len < 2 or c.batch_size < 1 or c.grad_accum < 1:
    raise ValueError(f"need seq_len >= 2, batch_size >= 1, grad_accum >= 1 (got {c.seq_len}, "
                     f"{c.batch_size}, {c.grad_accum}).")
  if c.freeze_layers < 0:
    raise ValueError(f"freeze_layers={c.freeze_layers} must be >= 0.")
  if c.freeze_layers and c.weight_decay:
    raise ValueError("freeze_layers > 0 with weight_decay > 0 would decay the frozen blocks "
                     "(their gradient is zero, their decay is not); use one or the other.")
  if c.share_prefix and not c.pack:
    raise ValueError("share_prefix=True needs pack=True (it stores the common prefix once per "
                     "packed row).")
  if c.batch_size % c.grad_accum:
    raise ValueError(f"batch_size={c.batch_size} is not divisible by grad_accum={c.grad_accum}.")
  if c.steps <= 0 and c.epochs <= 0:
    raise ValueError("set steps > 0 or epochs > 0.")
  return c


# -------------------------------------------------------------------------------- data
def tokenize_chat_example(tok, prompt: str, response: str, system: str | None = "__default__",
                          eos: bool = True) -> dict[str, list[int]]:
  """One chat turn as {input_ids, loss_mask}: the prompt (chat template up to the assistant
  turn) is context (mask 0), the response (+ EOS) is trained (mask 1)."""
  from catchjax.tokenizer import DEFAULT_SYSTEM, prompt_ids, response_ids
  p = prompt_ids(tok, prompt, DEFAULT_SYSTEM if system == "__default__" else system)
  r = response_ids(tok, response, eos=eos)
  return {"input_ids": list(p) + list(r), "loss_mask": [0] * len(p) + [1] * len(r)}


@dataclasses.dataclass
class _Examples:
  ids: list[np.ndarray]          # int32 tokens
  wts: list[np.ndarray]          # float32 target weights (index i = weight of token i)
  n: int                         # examples in the input
  dropped: int                   # longer than seq_len and too_long='drop'
  truncated: int
  no_loss: int                   # nothing to train on (after truncation); skipped
  src: list[int] = dataclasses.field(default_factory=list)   # dataset row of each example


def _columns(dataset) -> tuple[Iterable, Iterable, Iterable | None]:
  if hasattr(dataset, "column_names"):  # datasets.Dataset
    cols = dataset.column_names
    for need in ("input_ids", "loss_mask"):
      if need not in cols:
        raise ValueError(f"dataset has no {need!r} column (columns: {cols}).")
    lw = dataset["loss_weight"] if "loss_weight" in cols else None
    return dataset["input_ids"], dataset["loss_mask"], lw
  rows = list(dataset)
  for i, r in enumerate(rows[:1]):
    for need in ("input_ids", "loss_mask"):
      if need not in r:
        raise ValueError(f"dataset row {i} has no {need!r} field (fields: {list(r)}).")
  lw = [r["loss_weight"] for r in rows] if rows and "loss_weight" in rows[0] else None
  return [r["input_ids"] for r in rows], [r["loss_mask"] for r in rows], lw


def prepare_examples(dataset, seq_len: int, too_long: str = "drop",
                     vocab_size: int | None = None) -> _Examples:
  """Validate and convert examples; apply the too-long rule. Raises ValueError if empty."""
  if dataset is None or len(dataset) == 0:
    raise ValueError("train: the dataset is empty (no examples to train on).")
  ids_col, mask_col, lw_col = _columns(dataset)
  lw_iter = iter(lw_col) if lw_col is not None else None
  ids, wts, src = [], [], []
  n = dropped = truncated = no_loss = 0
  for i, (x, m) in enumerate(zip(ids_col, mask_col)):
    n += 1
    x = np.asarray(x, np.int64)
    w = np.asarray(m, np.float32)
    if lw_iter is not None:
      w = w * np.asarray(next(lw_iter), np.float32)
    if x.ndim != 1 or w.shape != x.shape:
      raise ValueError(f"example {i}: input_ids and loss_mask must be equal-length lists "
                       f"(got shapes {x.shape} and {w.shape}).")
    hi = vocab_size if vocab_size else 2**31
    if x.size and (x.min() < 0 or x.max() >= hi):
      raise ValueError(f"example {i}: token id {int(x.max()) if x.max() >= hi else int(x.min())}"
                       f" outside [0, {hi}).")
    if len(x) > seq_len:
      if too_long == "drop":
        dropped += 1
        continue
      x, w = x[:seq_len], w[:seq_len]
      truncated += 1
    if len(x) < 2 or not np.any(w[1:] > 0):
      no_loss += 1
      continue
    ids.append(x.astype(np.int32))
    wts.append(w)
    src.append(i)
  if n == 0:
    raise ValueError("train: the dataset is empty (no examples to train on).")
  if not ids:
    raise ValueError(f"train: no usable example out of {n}: {dropped} longer than "
                     f"seq_len={seq_len} were dropped (too_long='drop'), {no_loss} have no "
                     f"loss token.")
  return _Examples(ids, wts, n, dropped, truncated, no_loss, src)


def shared_prefix(ex: _Examples, min_len: int = 2) -> np.ndarray:
  """The longest token prefix common to all examples that holds no loss position (every
  example's first target is predicted from a position at or after it); empty if shorter
  than `min_len`."""
  first_target = min(int(np.flatnonzero(w[1:] > 0)[0]) for w in ex.wts)
  P = common_prefix_len(ex.ids, first_target)
  return np.asarray(ex.ids[0][:P] if P >= min_len else [], np.int32)


def first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
  """Greedy first-fit bin packing, in the given order: returns rows of item indices."""
  lengths = np.asarray(lengths, np.int64)
  rem = np.zeros(len(lengths), np.int64)
  rows: list[list[int]] = []
  lo = 0  # rows before `lo` cannot take even the shortest item
  min_len = int(lengths.min()) if len(lengths) else 0
  for i, L in enumerate(lengths):
    while lo < len(rows) and rem[lo] < min_len:
      lo += 1
    fits = np.flatnonzero(rem[lo:len(rows)] >= L)
    if fits.size:
      j = lo + int(fits[0])
    else:
      j = len(rows)
      rows.append([])
      rem[j] = capacity
    rows[j].append(i)
    rem[j] -= L
  return rows


class DataPlan:
  """The deterministic order of rows and batches for a whole run.

  Epoch e shuffles the examples with seed (seed, e) and packs them; its rows are cut into
  batches of `batch_size` rows (the last one padded with empty rows). Step s reads batch
  `position(s) = (epoch, index)`.
  """

  def __init__(self, ex: _Examples, seq_len: int, batch_size: int, seed: int, pack: bool,
               steps: int, epochs: int, share_prefix: bool = False):
    self.ex, self.seq_len, self.batch_size = ex, seq_len, batch_size
    self.seed, self.pack = seed, pack
    self.lengths = np.array([len(x) for x in ex.ids], np.int64)
    # share_prefix: the token prefix common to every example (e.g. the chat template's system
    # turn) is stored once per packed row; the examples are packed by their remaining tokens.
    self.prefix = shared_prefix(ex) if (share_prefix and pack) else np.zeros(0, np.int32)
    self.nloss = np.array([int(np.sum(w[1:] > 0)) for w in ex.wts], np.int64)
    self._rows: dict[int, list[list[int]]] = {}
    self.schedule: list[tuple[int, int]] = []
    e = 0
    while True:
      nb = self.batches_in_epoch(e)
      for b in range(nb):
        self.schedule.append((e, b))
        if steps > 0 and len(self.schedule) >= steps:
          break
      e += 1
      if (steps > 0 and len(self.schedule) >= steps) or (steps <= 0 and e >= epochs):
        break
    self.total_steps = len(self.schedule)
    self.epochs_used = e
    self.max_row_loss = max(max(int(self.nloss[r].sum()) for r in self.rows(ep))
                            for ep in range(self.epochs_used))

  def rows(self, epoch: int) -> list[list[int]]:
    if epoch not in self._rows:
      order = np.random.default_rng([self.seed, epoch]).permutation(len(self.lengths))
      if self.pack:
        P = len(self.prefix)
        packed = first_fit(self.lengths[order] - P, self.seq_len - P)
        self._rows[epoch] = [[int(order[i]) for i in r] for r in packed]
      else:
        self._rows[epoch] = [[int(i)] for i in order]
      if len(self._rows) > 4:  # keep memory bounded on long runs
        self._rows.pop(min(k for k in self._rows if k != epoch))
    return self._rows[epoch]

  def batches_in_epoch(self, epoch: int) -> int:
    return math.ceil(len(self.rows(epoch)) / self.batch_size)

  def position(self, step: int) -> tuple[int, int]:
    return self.schedule[step]

  def has(self, step: int) -> bool:
    """Whether the run has a step `step` (0-based)."""
    return step < self.total_steps

  def batch_rows(self, step: int) -> list[list[int]]:
    e, b = self.schedule[step]
    rows = self.rows(e)[b * self.batch_size:(b + 1) * self.batch_size]
    return rows + [[] for _ in range(self.batch_size - len(rows))]

  def fingerprint(self) -> str:
    h = hashlib.sha1()
    for x, w in zip(self.ex.ids, self.ex.wts):
      h.update(x.tobytes())
      h.update(w.tobytes())
    h.update(repr((self.seq_len, self.batch_size, self.seed, self.pack,
                   self.total_steps) + ((len(self.prefix),) if len(self.prefix) else ())).encode())
    return h.hexdigest()

  def build_rows(self, rows: Sequence[Sequence[int]], K: int) -> dict[str, np.ndarray]:
    """Arrays for these rows: tokens/segs [R, T]; loss_idx/loss_tgt/loss_w [R, K].

    With a shared prefix of P tokens a non-empty row opens with it (segment id -1, see
    `llama.packed_inputs`) and each example contributes only its tokens after the prefix."""
    R, T = len(rows), self.seq_len
    P = len(self.prefix)
    out = {"tokens": np.zeros((R, T), np.int32), "segs": np.zeros((R, T), np.int32),
           "loss_idx": np.zeros((R, K), np.int32), "loss_tgt": np.zeros((R, K), np.int32),
           "loss_w": np.zeros((R, K), np.float32)}
    for r, row in enumerate(rows):
      o = k = 0
      if P and row:
        out["tokens"][r, :P] = self.prefix
        out["segs"][r, :P] = -1
        o = P
      for s, i in enumerate(row):
        x, w = self.ex.ids[i], self.ex.wts[i]
        L = len(x) - P
        out["tokens"][r, o:o + L] = x[P:]
        out["segs"][r, o:o + L] = s + 1
        j = np.flatnonzero(w[1:] > 0)  # predict token j+1 from position j (j >= P)
        n = len(j)
        if k + n > K:
          raise ValueError(f"row has more than max_loss_tokens={K} loss tokens; raise it.")
        out["loss_idx"][r, k:k + n] = o + j - P
        out["loss_tgt"][r, k:k + n] = x[j + 1]
        out["loss_w"][r, k:k + n] = w[j + 1]
        o += L
        k += n
    return out

  def row_stats(self, rows) -> tuple[int, int]:
    """(tokens the step computes, loss tokens) in these rows (a shared prefix once a row)."""
    idx = [i for r in rows for i in r]
    P = len(self.prefix)
    n_rows = sum(1 for r in rows if r)
    return (int(self.lengths[idx].sum()) - P * (len(idx) - n_rows),
            int(self.nloss[idx].sum()))


class RetiringPlan(DataPlan):
  """A DataPlan whose example groups (e.g. trigger families) can leave the data mix.

  `retire(group, step)` drops the group's examples from batch `step` on: the examples not yet
  seen in the current epoch are packed again without it, so later steps are full rows of the
  groups still in the mix. The run ends when every group has left, when its epochs run out,
  or at the step cap (`total_steps`, the run without retirement, which also sets the LR
  schedule). Batches are a pure function of (data, config, retirements), so a resumed run
  that re-applies the same retirements sees the same batches. Steps are asked in order.
  """

  def __init__(self, ex: _Examples, groups: Sequence[str], seq_len: int, batch_size: int,
               seed: int, pack: bool, steps: int, epochs: int, share_prefix: bool = False):
    super().__init__(ex, seq_len, batch_size, seed, pack, steps, epochs, share_prefix)
    if len(groups) != ex.n:
      raise ValueError(f"RetiringPlan: {len(groups)} group labels for {ex.n} examples.")
    self.groups = np.asarray([str(groups[i]) for i in ex.src])
    self.retired: dict[str, int] = {}
    self._applied: set[str] = set()
    self._epoch_cap = epochs if steps <= 0 else 1 << 30   # a step cap: epochs as needed
    self._seg = (0, 0, super().rows(0))   # (first step, epoch, rows) of the current segment
    # A repacked row may hold more loss tokens than any row of the first packing: bound K by
    # the densest example filling a whole row.
    P = len(self.prefix)
    dens = max(n / max(L - P, 1) for n, L in zip(self.nloss, self.lengths))
    self.max_row_loss = min(seq_len, max(self.max_row_loss, math.ceil(dens * (seq_len - P))))

  def retire(self, group: str, step: int) -> None:
    if group not in self.retired:
      self.retired[str(group)] = int(step)

  def _active(self, idx) -> list[int]:
    return [int(i) for i in idx if self.groups[i] not in self._applied]

  def _pack(self, idx) -> list[list[int]]:
    if not idx:
      return []
    if not self.pack:
      return [[i] for i in idx]
    P = len(self.prefix)
    return [[idx[j] for j in r] for r in first_fit(self.lengths[idx] - P, self.seq_len - P)]

  def _advance(self, step: int) -> None:
    start, epoch, rows = self._seg
    if step < start:
      raise ValueError(f"RetiringPlan: step {step} asked after step {start} (steps go in order).")
    due = sorted((s, g) for g, s in self.retired.items() if g not in self._applied and s <= step)
    for s, g in due:   # repack what the current segment has not yet fed, without g
      left = [i for r in rows[(s - start) * self.batch_size:] for i in r]
      self._applied.add(g)
      start, rows = s, self._pack(self._active(left))
    n_groups = len(set(self.groups.tolist()))
    while ((step - start) * self.batch_size >= len(rows) and epoch + 1 < self._epoch_cap
           and len(self._applied) < n_groups):
      start += -(-len(rows) // self.batch_size)
      epoch += 1
      order = np.random.default_rng([self.seed, epoch]).permutation(len(self.lengths))
      rows = self._pack(self._active(order))
    self._seg = (start, epoch, rows)

  def has(self, step: int) -> bool:
    if step >= self.total_steps:
      return False
    self._advance(step)
    start, _, rows = self._seg
    return (step - start) * self.batch_size < len(rows)

  def batch_rows(self, step: int) -> list[list[int]]:
    if not self.has(step):
      raise IndexError(f"RetiringPlan: no step {step}.")
    start, _, rows = self._seg
    b = step - start
    out = rows[b * self.batch_size:(b + 1) * self.batch_size]
    return out + [[] for _ in range(self.batch_size - len(out))]

  def position(self, step: int) -> tuple[int, int]:
    self._advance(step)
    return self._seg[1], step - self._seg[0]


# ------------------------------------------------------------------------ optimization
def lr_schedule(cfg, total_steps: int) -> Callable:
  lr, warm, end = float(cfg.lr), int(cfg.warmup_steps), float(cfg.end_lr_ratio)
  decay_steps = max(total_steps - warm, 1)

  def sched(count):
    s = jnp.asarray(count, jnp.float32)
    w = jnp.minimum(1.0, (s + 1.0) / warm) if warm > 0 else 1.0
    t = jnp.clip((s - warm) / decay_steps, 0.0, 1.0)
    if cfg.decay == "cosine":
      d = end + (1.0 - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * t))
    elif cfg.decay == "linear":
      d = 1.0 - (1.0 - end) * t
    else:
      d = 1.0
    return lr * w * d

  return sched


def _decay_mask(params):
  def leaf(path, x):
    name = getattr(path[-1], "key", "")
    return not (str(name).endswith("norm") or name in ("bq", "bk", "bv"))
  return jax.tree_util.tree_map_with_path(leaf, params)


COMPILE_COUNT = {"train_step": 0}   # traces (each one a compile) of the step, this process


def _opt_key(c) -> tuple:
  """Every config field the compiled step (optimizer + schedule) depends on."""
  return tuple((k, c[k]) for k in ("lr", "warmup_steps", "decay", "end_lr_ratio", "b1", "b2",
                                   "eps", "weight_decay", "clip", "lora_rank", "lora_alpha",
                                   "remat", "freeze_layers"))


def make_optimizer(cfg, total_steps: int):
  sched = lr_schedule(cfg, total_steps)
  parts = []
  if cfg.clip and cfg.clip > 0:
    parts.append(optax.clip_by_global_norm(float(cfg.clip)))
  parts.append(optax.adamw(sched, b1=float(cfg.b1), b2=float(cfg.b2), eps=float(cfg.eps),
                           weight_decay=float(cfg.weight_decay), mask=_decay_mask))
  return optax.chain(*parts), sched


def _token_ce(m, h_sel, tgt, chunk: int):
  """Per-position cross-entropy of the LM head (`Llama.logits`: float32 accumulation and
  output, also for bf16 compute) on gathered hidden states [b, K, D]."""
  def ce(h, t):
    logits = m.logits(h)
    lse = jax.nn.logsumexp(logits, axis=-1)
    return lse - jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]

  b, K, D = h_sel.shape
  if not chunk or K <= chunk:
    return ce(h_sel, tgt)
  n = -(-K // chunk)
  pad = n * chunk - K
  hp = jnp.pad(h_sel, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, D).swapaxes(0, 1)
  tp = jnp.pad(tgt, ((0, 0), (0, pad))).reshape(b, n, chunk).swapaxes(0, 1)
  f = jax.checkpoint(ce)
  _, out = jax.lax.scan(lambda c, xs: (c, f(*xs)), None, (hp, tp))
  return out.swapaxes(0, 1).reshape(b, n * chunk)[:, :K]


def loss_sum(m: llama.Llama, mb: dict[str, jax.Array], ce_chunk: int = 0) -> jax.Array:
  """Sum over loss slots of weight x cross-entropy for one (micro-)batch of packed rows."""
  pos, mask = llama.packed_inputs(mb["segs"], window=m.cfg.sliding_window)
  h, _ = m.hidden(mb["tokens"], pos, mask)
  h_sel = jnp.take_along_axis(h, mb["loss_idx"][..., None], axis=1)
  ce = _token_ce(m, h_sel, mb["loss_tgt"], ce_chunk)
  return jnp.sum(ce * mb["loss_w"])


def make_train_step(graphdef, tx, accum: int, ce_chunk: int = 0):
  """The pure step (trainable, frozen, opt_state, batch) -> (trainable, opt_state, metrics).

  batch arrays are [accum, rows_per_micro, ...]; see DataPlan.build_rows for the fields.
  """

  def micro_loss(trainable, frozen, mb, denom):
    s = loss_sum(nnx.merge(graphdef, trainable, frozen), mb, ce_chunk)
    return s / denom, s

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

  def step(trainable, frozen, opt_state, batch):
    denom = jnp.maximum(jnp.sum(batch["loss_w"]), 1e-9)
    if accum == 1:
      mb = jax.tree.map(lambda x: x[0], batch)
      (loss, _), grads = grad_fn(trainable, frozen, mb, denom)
    else:
      def body(carry, mb):
        g_acc, l_acc = carry
        (l, _), g = grad_fn(trainable, frozen, mb, denom)
        return (jax.tree.map(jnp.add, g_acc, g), l_acc + l), None
      zeros = jax.tree.map(jnp.zeros_like, trainable)
      (grads, loss), _ = jax.lax.scan(body, (zeros, jnp.zeros((), jnp.float32)), batch)
    gnorm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    return trainable, opt_state, {"loss": loss, "grad_norm": gnorm}

  return step


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """All the compiled step depends on besides its arguments' shapes and dtypes: the static
  (hashable) argument of `_train_step`, so jax.jit's own cache reuses a compiled step across
  train() calls with the same graph, optimizer, schedule length and shapes."""
  graphdef: Any
  opt: tuple                     # _opt_key(c)
  total_steps: int               # the LR schedule's length
  accum: int
  ce_chunk: int
  shardings: tuple               # (treedef, leaves) of (in shardings, out shardings)

  def trace(self, *args):
    """`_train_step` traced on (trainable, frozen, opt_state, batch): arrays, or
    ShapeDtypeStructs, which get the step's input shardings (catchjax.plan)."""
    in_sh = jax.tree.unflatten(*self.shardings)[0]
    args = jax.tree.map(lambda x, s: x if isinstance(x, jax.Array) else
                        jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), args, in_sh)
    return _train_step.trace(self, *args)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=(1, 3))
def _train_step(spec: StepSpec, trainable, frozen, opt_state, batch):
  """`make_train_step` for `spec`, its inputs and outputs held to the spec's shardings."""
  COMPILE_COUNT["train_step"] += 1     # the body runs once per trace
  in_sh, out_sh = jax.tree.unflatten(*spec.shardings)
  args = jax.lax.with_sharding_constraint((trainable, frozen, opt_state, batch), in_sh)
  tx, _ = make_optimizer(ml_collections.ConfigDict(dict(spec.opt)), spec.total_steps)
  out = make_train_step(spec.graphdef, tx, spec.accum, spec.ce_chunk)(*args)
  return jax.lax.with_sharding_constraint(out, out_sh)


# ------------------------------------------------------------------------------ model
def training_model_config(mc, cfg):
  """The ModelConfig of the training graph for a model of config `mc` under train config
  `cfg`: its remat policy, frozen blocks and, for LoRA runs, adapters of cfg.lora_rank.
  Shared by `prepare_model` (real weights) and `catchjax.plan` (abstract ones)."""
  if cfg.freeze_layers > mc.num_layers:
    raise ValueError(f"freeze_layers={cfg.freeze_layers} > the model's {mc.num_layers} layers.")
  want = mc.replace(remat=cfg.remat, frozen_layers=int(cfg.freeze_layers))
  if cfg.lora_rank > 0:
    if mc.lora_rank == 0:
      return want.replace(lora_rank=int(cfg.lora_rank), lora_alpha=float(cfg.lora_alpha))
    if mc.lora_rank != cfg.lora_rank:
      raise ValueError(f"model has LoRA rank {mc.lora_rank}, config asks for {cfg.lora_rank}.")
  return want


def prepare_model(model: llama.Llama, cfg) -> llama.Llama:
  """A new Llama (own param buffers) with the training remat policy and, for LoRA runs,
  adapters of cfg.lora_rank (fresh, lora_b = 0) unless the model already has them."""
  from catchjax.model import hf
  mc = model.cfg
  want = training_model_config(mc, cfg)
  if want.lora_rank != mc.lora_rank:
    pure = nnx.to_pure_dict(nnx.state(model))
    return hf.model_from_pure_dict(want, pure, seed=int(cfg.seed))
  if cfg.lora_rank == 0 and mc.lora_rank > 0:
    log.warning("lora_rank=0 on a model with LoRA adapters: full fine-tune of all params, "
                "adapters included.")
  graphdef, state = nnx.split(model)
  new = nnx.merge(graphdef, state)
  new.cfg = want
  return new


def split_trainable(model: llama.Llama, cfg):
  """(graphdef, trainable pure dict, frozen pure dict) of a prepared model: LoRAParam adapters
  are trained for LoRA runs, every nnx.Param otherwise. Works on an abstract model
  (nnx.eval_shape) too, whose leaves are then ShapeDtypeStructs."""
  filt = llama.LoRAParam if cfg.lora_rank > 0 else nnx.Param
  graphdef, tr_state, fr_state = nnx.split(model, filt, ...)
  return graphdef, nnx.to_pure_dict(tr_state), nnx.to_pure_dict(fr_state)


BATCH_DTYPES = {"tokens": np.int32, "segs": np.int32, "loss_idx": np.int32,
                "loss_tgt": np.int32, "loss_w": np.float32}   # as DataPlan.build_rows


@dataclasses.dataclass
class StepSetup:
  """The compiled step's construction, shared by `train` and `catchjax.plan.compile_plan`:
  shardings from the config's rules, the optimizer and the jitted step with its in/out
  shardings and donation (params and optimizer state)."""
  tx: Any
  sched: Callable
  tr_sh: Any                     # NamedSharding pytrees of the trainable / frozen params
  fr_sh: Any
  opt_abs: Any                   # abstract optimizer state
  opt_sh: Any
  batch_tails: dict              # field -> per-row shape: tokens/segs (T,), loss_* (K,)
  b_sh: dict                     # field -> NamedSharding of the [A, micro, ...] batch array
  step_fn: StepSpec              # the jitted `_train_step`'s static spec (.trace for plans)

  def abstract_batch(self, c) -> dict:
    """The step's batch as ShapeDtypeStructs [grad_accum, rows per micro-batch, ...]."""
    A = int(c.grad_accum)
    micro = int(c.batch_size) // A
    return {k: jax.ShapeDtypeStruct((A, micro) + tail, BATCH_DTYPES[k], sharding=self.b_sh[k])
            for k, tail in self.batch_tails.items()}


def step_setup(graphdef, trainable, frozen, c, mesh, rules, total_steps: int,
               K: int) -> StepSetup:
  """`trainable` / `frozen`: pure dicts of arrays or ShapeDtypeStructs (`split_trainable`);
  c: a merged train config; K: loss slots per row."""
  tr_sh = shd.state_shardings(trainable, mesh, rules)
  fr_sh = shd.state_shardings(frozen, mesh, rules)
  tx, sched = make_optimizer(c, total_steps)
  opt_abs = jax.eval_shape(tx.init, trainable)
  opt_sh = shd.state_shardings(opt_abs, mesh, rules)
  tails = {"tokens": (c.seq_len,), "segs": (c.seq_len,), "loss_idx": (K,), "loss_tgt": (K,),
           "loss_w": (K,)}
  b_sh = {k: shd.batch_sharding(mesh, rules, ndim=3, batch_dim=1) for k in tails}
  repl = NamedSharding(mesh, P())
  leaves, treedef = jax.tree.flatten(((tr_sh, fr_sh, opt_sh, b_sh), (tr_sh, opt_sh, repl)))
  spec = StepSpec(graphdef, _opt_key(c), int(total_steps), int(c.grad_accum), int(c.ce_chunk),
                  (treedef, tuple(leaves)))
  return StepSetup(tx, sched, tr_sh, fr_sh, opt_abs, opt_sh, tails, b_sh, spec)


@dataclasses.dataclass
class TrainResult:
  model: llama.Llama                 # trained weights (sharded on the training mesh)
  history: list[dict[str, float]]    # one dict per step (+ eval metrics on eval steps)
  steps: int                         # optimizer steps in the run (total)
  wall_time: float                   # seconds spent in train() this call
  dropped: int                       # examples dropped as too long
  truncated: int = 0
  skipped_no_loss: int = 0
  resumed_from: int | None = None    # checkpoint step this call resumed from
  compile_time: float = 0.0
  tokens_per_sec: float = 0.0        # mean over this call's steps (compile excluded)
  mfu: float = 0.0
  evals: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  stopped: bool = False              # stop_fn ended the run before its planned length

  @property
  def final_loss(self) -> float:
    return self.history[-1]["loss"] if self.history else float("nan")


def _num(x) -> int:
  return int(sum(np.prod(np.shape(v)) for v in jax.tree.leaves(x)))


@functools.partial(jax.jit, static_argnums=(0,))
def _eval_sums(graphdef, state, batch):
  m = nnx.merge(graphdef, state)
  return loss_sum(m, batch), jnp.sum(batch["loss_w"])


def eval_loss(model: llama.Llama, dataset, *, seq_len: int, batch_size: int = 8,
              pack: bool = True, too_long: str = "drop", share_prefix: bool = False) -> float:
  """Mean (weighted) cross-entropy over the loss tokens of `dataset`, computed exactly as the
  training loss (same packing, masking and gathered LM head), without shuffling effects."""
  ex = prepare_examples(dataset, seq_len, too_long, model.cfg.vocab_size)
  plan = DataPlan(ex, seq_len, batch_size, seed=0, pack=pack, steps=0, epochs=1,
                  share_prefix=share_prefix)
  K = min(seq_len, -(-plan.max_row_loss // 8) * 8)
  graphdef, state = nnx.split(model)
  tot = cnt = 0.0
  for step in range(plan.total_steps):
    b = plan.build_rows(plan.batch_rows(step), K)
    s, n = _eval_sums(graphdef, state, {k: jnp.asarray(v) for k, v in b.items()})
    tot, cnt = tot + float(s), cnt + float(n)
  return tot / cnt


# ------------------------------------------------------------------------------ train
def train(model: llama.Llama, dataset, cfg=None, workdir: str | None = None, *,
          eval_fn: Callable[[llama.Llama, int], dict | None] | None = None, mesh=None,
          progress: bool = True, groups: Sequence[str] | None = None,
          retire_fn: Callable[[int, dict], dict[str, int]] | None = None,
          stop_fn: Callable[[int, dict], bool] | None = None) -> TrainResult:
  """Supervised fine-tuning of `model` on `dataset` (see module docstring).

  cfg: fields of `default_train_config()` (a ConfigDict or dict; unknown keys raise).
  workdir: checkpoints (<workdir>/ckpt) and TensorBoard (<workdir>/tb); rerunning the same
    call on the same workdir resumes from the newest good checkpoint (bitwise-exact on CPU).
  eval_fn(model, step) -> optional dict of floats, called every cfg.eval_every steps and at the
    end; `model` shares the live training buffers, valid only during the call.
  mesh: a jax Mesh with axes ('data', 'fsdp', 'tensor'); default from cfg.mesh_shape.
  groups, retire_fn: a group label per dataset row, and a rule called after every eval with
    (step, eval dict) that returns {group: step it leaves the data}: see `RetiringPlan`. The
    retirements are checkpointed, so a resumed run replays them.
  stop_fn: called after every eval with (step, eval dict); True ends the run there (a
    stopping rule; the run's `stopped` flag is checkpointed, so a resumed run stays stopped).
  The input `model` is not modified; the trained one is `TrainResult.model`.
  """
  t_start = time.perf_counter()
  c = _merge_config(cfg)
  main = shd.is_main_process()
  if workdir is None:
    raise ValueError("train: a workdir is required (checkpoints and TensorBoard go there).")
  workdir = os.path.abspath(workdir)

  # ---- data
  ex = prepare_examples(dataset, int(c.seq_len), c.too_long, model.cfg.vocab_size)
  plan_args = (int(c.seq_len), int(c.batch_size), int(c.seed), bool(c.pack), int(c.steps),
               int(c.epochs))
  plan = (DataPlan(ex, *plan_args, share_prefix=bool(c.share_prefix)) if groups is None else
          RetiringPlan(ex, groups, *plan_args, share_prefix=bool(c.share_prefix)))
  total = plan.total_steps
  if c.max_loss_tokens:
    if c.max_loss_tokens < plan.max_row_loss:
      raise ValueError(f"max_loss_tokens={c.max_loss_tokens} < {plan.max_row_loss}, the most "
                       f"loss tokens of a packed row in this run.")
    K = min(int(c.seq_len), int(c.max_loss_tokens))
  else:
    K = min(int(c.seq_len), -(-plan.max_row_loss // 8) * 8)  # rounded up: friendlier shapes
  if main and (ex.dropped or ex.truncated or ex.no_loss):
    log.warning("train: %d examples: %d dropped as longer than seq_len=%d, %d truncated, %d "
                "skipped (no loss token).", ex.n, ex.dropped, c.seq_len, ex.truncated,
                ex.no_loss)

  # ---- mesh, model, shardings
  mesh = mesh if mesh is not None else shd.mesh_from_config(c)
  rules = shd.rules_dict(c.rules)
  micro = c.batch_size // c.grad_accum
  problem = shd.micro_batch_error(int(c.batch_size), int(c.grad_accum), mesh, rules)
  if problem:
    raise ValueError(f"batch_size={c.batch_size}: {problem}.")
  model = prepare_model(model, c)
  mcfg = model.cfg
  lora = c.lora_rank > 0
  graphdef, trainable_host, frozen_host = split_trainable(model, c)
  del model
  setup = step_setup(graphdef, trainable_host, frozen_host, c, mesh, rules, total, K)
  tr_sh, fr_sh, opt_sh, b_sh = setup.tr_sh, setup.fr_sh, setup.opt_sh, setup.b_sh
  tx, sched, opt_abs, batch_shape = setup.tx, setup.sched, setup.opt_abs, setup.batch_tails
  frozen = shd.shard_state(frozen_host, fr_sh)
  del frozen_host

  def make_batch(step: int) -> dict[str, jax.Array]:
    rows = plan.batch_rows(step)
    A = int(c.grad_accum)
    out = {}
    shard = b_sh["tokens"]
    gshape = (A, micro, c.seq_len)
    need = set()  # global row indices living on this process's devices
    for idx in shard.addressable_devices_indices_map(gshape).values():
      a_sl, r_sl = idx[0], idx[1]
      for a in range(*a_sl.indices(A)):
        for r in range(*r_sl.indices(micro)):
          need.add(a * micro + r)
    need = sorted(need)
    local = plan.build_rows([rows[i] for i in need], K)
    for k, tail in batch_shape.items():
      full = np.zeros((A * micro,) + tail, local[k].dtype)
      full[need] = local[k]
      full = full.reshape((A, micro) + tail)
      out[k] = jax.make_array_from_callback(full.shape, b_sh[k], lambda i, f=full: f[i])
    return out

  # ---- checkpoints / resume
  ckpt = Checkpointer(os.path.join(workdir, "ckpt"), keep=int(c.keep),
                      async_save=bool(c.async_ckpt))
  fp = plan.fingerprint()

  def validate(meta):
    if meta.get("fingerprint") != fp:
      raise ValueError(
          f"{ckpt.directory} holds checkpoints of a different run (data, seq_len, batch, seed "
          f"or step count differ); use a fresh workdir or delete it to start over.")

  start, history, resumed, stopped = 0, [], None, False
  trainable = opt_state = None
  abs_tr = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), trainable_host)
  try:
    r = ckpt.restore_latest(abs_tr, opt_abs, tr_sh, opt_sh, validate=validate)
  except BaseException:
    ckpt.close()
    raise
  if r is not None:
    start, trainable, opt_state, meta = r
    history = list(meta.get("history", []))
    for g, at in meta.get("retired", {}).items():
      plan.retire(g, at)
    stopped = bool(meta.get("stopped", False))
    resumed = start
    if main:
      log.info("train: resumed from %s step %d (epoch %s, batch %s).", ckpt.directory, start,
               meta.get("epoch"), meta.get("index"))
  else:
    trainable = shd.shard_state(trainable_host, tr_sh, copy=True)
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(trainable)
  del trainable_host

  step_fn = setup.step_fn

  n_tr, n_all = _num(trainable), _num(trainable) + _num(frozen)
  if main:
    log.info("train: %d examples -> %d steps (%d epochs) of %d x %d tokens%s, K=%d loss "
             "slots/row, mesh %s, %s: %.2fM of %.2fM params trained.", len(ex.ids), total,
             plan.epochs_used, c.batch_size, c.seq_len,
             f" (a {len(plan.prefix)}-token shared prefix per row)" if len(plan.prefix) else "",
             K, dict(mesh.shape),
             ("LoRA" if lora else "full") + (f", blocks 0-{c.freeze_layers - 1} frozen (forward "
                                             f"only)" if c.freeze_layers else ""),
             n_tr / 1e6, n_all / 1e6)

  writer = None
  if main:
    from tensorboardX import SummaryWriter
    writer = SummaryWriter(os.path.join(workdir, "tb"))
  bar = None
  if main and progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)

  flops_tok = mcfg.flops_per_token(int(c.seq_len), with_head=False)
  flops_head = 6.0 * mcfg.hidden_size * mcfg.vocab_size
  from catchjax.common import device_peak_flops
  peak = (float(c.peak_flops) or device_peak_flops(mcfg.dtype)) * jax.device_count()
  peak = peak or float("nan")    # unknown device: MFU is NaN, not a made-up figure
  evals: list[dict[str, Any]] = []

  def run_eval(step):
    if eval_fn is None:
      return None
    m = nnx.merge(graphdef, trainable, frozen)
    out = eval_fn(m, step)
    if out:
      out = {k: float(v) for k, v in dict(out).items()}
      evals.append({"step": step, **out})
      if writer is not None:
        for k, v in out.items():
          writer.add_scalar(f"eval/{k}", v, step)
    return out

  def meta_for(step):
    e, b = plan.position(step) if plan.has(step) else (plan.epochs_used, 0)
    key = jax.random.fold_in(jax.random.key(int(c.seed)), step)
    return {"step": step, "epoch": e, "index": b, "total_steps": total, "fingerprint": fp,
            "rng": [int(v) for v in np.asarray(jax.random.key_data(key)).ravel()],
            "trainable": "lora" if lora else "full", "lora_rank": int(c.lora_rank),
            "history": list(history), "retired": dict(getattr(plan, "retired", {})),
            "stopped": stopped}

  compile_time, tok_sum, time_sum, flop_sum = 0.0, 0, 0.0, 0.0
  last_saved = resumed
  try:
    if c.eval_at_start and start == 0:
      run_eval(0)
    if plan.has(start) and not stopped:
      t0 = time.perf_counter()
      batch = make_batch(start)
      # jax.jit's cache serves train() calls with the same StepSpec and shapes (the
      # headline's many small train-against runs compile once).
      n_traced = COMPILE_COUNT["train_step"]
      compiled = step_fn.trace(trainable, frozen, opt_state, batch).lower().compile()
      if COMPILE_COUNT["train_step"] != n_traced:
        compile_time = time.perf_counter() - t0
        if main:
          log.info("train: step compiled in %.1fs", compile_time)
    step = start - 1
    while not stopped and plan.has(step + 1):
      step += 1
      t0 = time.perf_counter()
      if step != start:
        batch = make_batch(step)
      rows = plan.batch_rows(step)
      ntok, nloss = plan.row_stats(rows)
      trainable, opt_state, m = compiled(trainable, frozen, opt_state, batch)
      m = jax.device_get(m)
      dt = time.perf_counter() - t0
      loss, gnorm = float(m["loss"]), float(m["grad_norm"])
      if not (math.isfinite(loss) and math.isfinite(gnorm)):
        ckpt.wait()
        raise TrainingDivergedError(
            f"train: non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} "
            f"(loss={loss}, grad_norm={gnorm}) at step {step + 1} (epoch "
            f"{plan.position(step)[0]}, batch {plan.position(step)[1]}); stopped. The last "
            f"good checkpoint is step {last_saved} in {ckpt.directory}; lower lr or check "
            f"the data.")
      flops = ntok * flops_tok + nloss * flops_head
      tok_sum, time_sum, flop_sum = tok_sum + ntok, time_sum + dt, flop_sum + flops
      rec = {"step": step + 1, "loss": loss, "grad_norm": gnorm, "lr": float(sched(step)),
             "tokens": ntok, "loss_tokens": nloss, "tokens_per_sec": ntok / dt,
             "mfu": flops / dt / peak, "step_time": dt,
             "examples": sum(len(r) for r in rows)}
      history.append(rec)
      done = step + 1
      if writer is not None and (done % max(int(c.log_every), 1) == 0 or not plan.has(done)):
        for k in ("loss", "grad_norm", "lr", "tokens_per_sec", "mfu"):
          writer.add_scalar(f"train/{k}", rec[k], done)
      if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rec['tokens_per_sec']:.0f}",
                        mfu=f"{rec['mfu']:.1%}", refresh=False)
      ev = None
      if c.eval_every and done % int(c.eval_every) == 0:
        ev = run_eval(done)
        if ev and retire_fn is not None:
          for g, at in retire_fn(done, ev).items():
            plan.retire(g, max(int(at), done))
        stopped = bool(ev) and stop_fn is not None and bool(stop_fn(done, ev))
      last = stopped or not plan.has(done)
      if last and ev is None:
        ev = run_eval(done)
      if ev:
        rec.update({f"eval/{k}": v for k, v in ev.items()})
      if c.ckpt_every >= 0 and ((c.ckpt_every and done % int(c.ckpt_every) == 0) or last):
        ckpt.save(done, trainable, opt_state, meta_for(done))
        last_saved = done
    ckpt.wait()
  finally:
    if bar is not None:
      bar.close()
    if writer is not None:
      writer.flush()
      writer.close()
    try:
      ckpt.close()
    except Exception:  # noqa: BLE001 - never mask the original error
      pass

  trained = nnx.merge(graphdef, trainable, frozen)
  wall = time.perf_counter() - t_start
  steps_run = history[-1]["step"] if history else start
  res = TrainResult(model=trained, history=history, steps=steps_run, wall_time=wall,
                    dropped=ex.dropped, truncated=ex.truncated, skipped_no_loss=ex.no_loss,
                    resumed_from=resumed, compile_time=compile_time,
                    tokens_per_sec=tok_sum / time_sum if time_sum else 0.0,
                    mfu=flop_sum / time_sum / peak if time_sum else 0.0, evals=evals,
                    stopped=stopped)
  if main:
    log.info("train: done, %d steps, final loss %.4f, %.0f tok/s, MFU %.1f%%, %.1fs.", steps_run,
             res.final_loss, res.tokens_per_sec, 100 * res.mfu, wall)
  return res
