"""The data plan: examples from a dataset, their packing into rows and the order of batches.

Rows of `input_ids` (list[int]) and `loss_mask` (list[int]; 1 where the token is a training
target, i.e. its prediction from the previous position is trained; the first token of an
example can never be a target). An optional `loss_weight` column (list[float]) scales the
per-token loss (e.g. a scratchpad at 0.1). Examples are packed greedily (first-fit) into rows
of `seq_len` with segment ids, after a seeded shuffle per epoch, so the data order is a pure
function of (dataset, config) and resumes exactly. With `share_prefix` the token prefix every
example shares (the chat template's system turn) is stored once per row and attended to by
each of the row's examples, so a row holds more examples for the same loss.

The LM head runs only at the loss positions: each row's loss positions are gathered into a
fixed-size [batch, K] index array (K = the largest per-row count in the whole run, so shapes
are static; `loss_slots`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Iterable, Sequence

import jax
import numpy as np

from catchjax.common import common_prefix_len

BATCH_DTYPES = {"tokens": np.int32, "segs": np.int32, "loss_idx": np.int32,
                "loss_tgt": np.int32, "loss_w": np.float32}   # as DataPlan.build_rows


def tokenize_chat_example(tok, prompt: str, response: str, system: str | None = "__default__",
                          eos: bool = True) -> dict[str, list[int]]:
  """One chat turn as {input_ids, loss_mask}: the prompt (chat template up to the assistant
  turn) is context (mask 0), the response (+ EOS) is trained (mask 1)."""
  from catchjax.tokenizer import DEFAULT_SYSTEM, prompt_ids, response_ids
  p = prompt_ids(tok, prompt, DEFAULT_SYSTEM if system == "__default__" else system)
  r = response_ids(tok, response, eos=eos)
  return {"input_ids": list(p) + list(r), "loss_mask": [0] * len(p) + [1] * len(r)}


# ---------------------------------------------------------------------------- examples
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


def _check_example(i: int, x: np.ndarray, w: np.ndarray, vocab_size: int | None) -> None:
  if x.ndim != 1 or w.shape != x.shape:
    raise ValueError(f"example {i}: input_ids and loss_mask must be equal-length lists "
                     f"(got shapes {x.shape} and {w.shape}).")
  hi = vocab_size if vocab_size else 2**31
  if x.size and (x.min() < 0 or x.max() >= hi):
    raise ValueError(f"example {i}: token id {int(x.max()) if x.max() >= hi else int(x.min())}"
                     f" outside [0, {hi}).")


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
    _check_example(i, x, w, vocab_size)
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


# -------------------------------------------------------------------------------- plans
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
    self.schedule, self.epochs_used = self._schedule(steps, epochs)
    self.total_steps = len(self.schedule)
    self.max_row_loss = max(max(int(self.nloss[r].sum()) for r in self.rows(ep))
                            for ep in range(self.epochs_used))

  def _schedule(self, steps: int, epochs: int) -> tuple[list[tuple[int, int]], int]:
    """((epoch, batch) of every step, epochs used): `steps` steps if > 0, else `epochs`."""
    schedule: list[tuple[int, int]] = []
    e = 0
    while True:
      nb = self.batches_in_epoch(e)
      for b in range(nb):
        schedule.append((e, b))
        if steps > 0 and len(schedule) >= steps:
          break
      e += 1
      if (steps > 0 and len(schedule) >= steps) or (steps <= 0 and e >= epochs):
        return schedule, e

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
    out = {"tokens": np.zeros((R, T), np.int32), "segs": np.zeros((R, T), np.int32),
           "loss_idx": np.zeros((R, K), np.int32), "loss_tgt": np.zeros((R, K), np.int32),
           "loss_w": np.zeros((R, K), np.float32)}
    for r, row in enumerate(rows):
      self._fill_row(out, r, row, K)
    return out

  def _fill_row(self, out: dict[str, np.ndarray], r: int, row: Sequence[int], K: int) -> None:
    P = len(self.prefix)
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


# ------------------------------------------------------------------------------ batches
def loss_slots(plan: DataPlan, seq_len: int, max_loss_tokens: int = 0) -> int:
  """K, the loss slots per row: `max_loss_tokens` if set (it must hold the run's densest
  row), else the densest row's count rounded up to a multiple of 8 (friendlier shapes)."""
  if max_loss_tokens:
    if max_loss_tokens < plan.max_row_loss:
      raise ValueError(f"max_loss_tokens={max_loss_tokens} < {plan.max_row_loss}, the most "
                       f"loss tokens of a packed row in this run.")
    return min(int(seq_len), int(max_loss_tokens))
  return min(int(seq_len), -(-plan.max_row_loss // 8) * 8)


def batch_tails(seq_len: int, K: int) -> dict[str, tuple[int]]:
  """The per-row shape of every batch field: tokens/segs (T,), loss_* (K,)."""
  return {"tokens": (seq_len,), "segs": (seq_len,), "loss_idx": (K,), "loss_tgt": (K,),
          "loss_w": (K,)}


def _local_rows(sharding, accum: int, micro: int, seq_len: int) -> list[int]:
  """The global row indices (a * micro + r) of a [accum, micro, T] batch that live on this
  process's devices."""
  need = set()
  for idx in sharding.addressable_devices_indices_map((accum, micro, seq_len)).values():
    a_sl, r_sl = idx[0], idx[1]
    for a in range(*a_sl.indices(accum)):
      for r in range(*r_sl.indices(micro)):
        need.add(a * micro + r)
  return sorted(need)


def device_batch(plan: DataPlan, step: int, K: int, accum: int, tails: dict,
                 shardings: dict, micro_rows: int | None = None) -> dict[str, jax.Array]:
  """Step `step`'s batch as global arrays [accum, micro_rows, ...] with the given shardings;
  this process builds only the rows that live on its own devices (zeros elsewhere).
  micro_rows > batch_size / accum: each micro-batch ends in empty (zero-weight) rows
  (`sharding.padded_micro`)."""
  rows = plan.batch_rows(step)
  real = plan.batch_size // accum
  micro = real if micro_rows is None else int(micro_rows)
  if micro != real:   # each micro-batch's rows, then its empty padding rows
    rows = [r for a in range(accum)
            for r in rows[a * real:(a + 1) * real] + [[]] * (micro - real)]
  need = _local_rows(shardings["tokens"], accum, micro, plan.seq_len)
  local = plan.build_rows([rows[i] for i in need], K)
  out = {}
  for k, tail in tails.items():
    full = np.zeros((accum * micro,) + tail, local[k].dtype)
    full[need] = local[k]
    full = full.reshape((accum, micro) + tail)
    out[k] = jax.make_array_from_callback(full.shape, shardings[k], lambda i, f=full: f[i])
  return out
