"""The pipeline layer: every experiment is a plan of cells run over the same stages.

A **cell** is one measured unit: (experiment, family, behaviour, N, arm, seed); its key adds
the config hash (catchjax/results.py KEY_FIELDS), and a crossed design's catch seed when set.
An experiment builds a plan (a list of cells, in the order it wants them run) and a function
from a cell to that cell's row fields; `Runner.run` does the rest, the same way for every
experiment:

* resume by key: a cell whose row is already in results.jsonl is skipped;
* one progress bar whose total is every cell planned so far, and whose ETA counts only the
  cells run in this invocation (a resumed run does not look faster than it is);
* timing: every row carries `cell_seconds`;
* one row stamp: the cell's key fields, config hash and commit;
* clean-up: the cell's scratch folder (`Runner.scratch`) is removed after its row is stored.

A **policy** extends a plan after a round (the headline's power rule): it calls `run` again
with the new cells, and the bar's total grows with them.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import time
from typing import Callable, Iterable

from catchjax import common
from catchjax.results import ResultStore, row_key


@dataclasses.dataclass(frozen=True)
class Cell:
  experiment: str
  family: str
  behaviour: str
  n: int
  arm: str
  seed: int
  catch: int | None = None   # crossed designs: the catch's seed apart from `seed` (training)

  def key(self, chash: str) -> tuple:
    key = (self.experiment, self.family, self.behaviour, int(self.n), self.arm,
           self.seed, chash)
    return key if self.catch is None else key + (int(self.catch),)

  def fields(self) -> dict:
    out = dict(experiment=self.experiment, family=self.family, behaviour=self.behaviour,
               n=int(self.n), arm=self.arm, seed=self.seed)
    return out if self.catch is None else dict(out, catch=int(self.catch))


class Runner:
  """Runs plans of cells for one (experiment, config) into `workdir`/results.jsonl."""

  def __init__(self, experiment: str, config, workdir: str, desc: str | None = None,
               progress: bool = True):
    self.experiment, self.workdir = experiment, workdir
    self.chash = common.config_hash(config)
    self.commit = common.git_commit()
    self.store = ResultStore(os.path.join(workdir, "results.jsonl"))
    self.t0 = time.time()
    self._planned: set = set()
    self._started = False
    self.bar = None
    if progress:
      from tqdm.auto import tqdm
      # smoothing=0: the rate is this invocation's cells over its time. tqdm's default moving
      # average would take in the burst of already-stored cells counted at plan time, and a
      # resumed run would show an ETA ~10x too short (seen on the :curves resume).
      self.bar = tqdm(total=0, desc=desc or f"{experiment} cells", unit="cell",
                      dynamic_ncols=True, smoothing=0)

  # -- rows
  def rows(self, **match) -> list[dict]:
    """This config's rows, optionally filtered by field values."""
    return [r for r in self.store.rows if r.get("config_hash") == self.chash
            and all(r.get(k) == v for k, v in match.items())]

  def done(self, cell: Cell) -> bool:
    return self.store.has(cell.key(self.chash))

  def todo(self, cells: Iterable[Cell], behaviour: str) -> list[Cell]:
    """The cells of `behaviour` not yet stored (open its organism only when there are any)."""
    return [c for c in cells if c.behaviour == behaviour and not self.done(c)]

  def row(self, cell: Cell) -> dict | None:
    """The stored row of `cell` (None when it has not run)."""
    key = cell.key(self.chash)
    return next((r for r in reversed(self.store.rows) if row_key(r) == key), None)

  def scratch(self, cell: Cell) -> str:
    """The cell's scratch folder (train-against checkpoints), removed after its row."""
    c = "" if cell.catch is None else f"-c{cell.catch}"
    return os.path.join(self.workdir, "runs", f"{self.chash}-{cell.family}-{cell.behaviour}-"
                        f"{cell.n}-{cell.arm}-s{cell.seed}{c}")

  # -- plans
  def plan(self, cells: Iterable[Cell]) -> list[Cell]:
    """Count `cells` into the bar's total (once each); the ones already stored count as done
    and are left out of the ETA's rate."""
    cells = list(cells)
    new = [c for c in cells if c not in self._planned]
    self._planned.update(new)
    if self.bar is not None and new:
      done = sum(1 for c in new if self.done(c))
      self.bar.total += len(new)
      self.bar.initial += done   # tqdm's rate excludes `initial`
      self.bar.update(done)
    return cells

  def _start_clock(self) -> None:
    """Before the first cell this invocation runs: restart the bar's clock and leave the
    cells stored so far out of its rate, so the ETA is the cells' own (the organism build or
    a resumed run's skipped cells do not count)."""
    if self.bar is not None and not self._started:
      self._started = True
      self.bar.initial = self.bar.n
      self.bar.start_t = self.bar.last_print_t = time.time()
      self.bar.last_print_n = self.bar.n

  def status(self, text: str) -> None:
    if self.bar is not None:
      self.bar.set_postfix_str(text)

  def run(self, cells: Iterable[Cell], fn: Callable[[Cell], dict | None],
          keep_scratch: bool = False) -> list[dict]:
    """Run every cell of the plan not yet stored: `fn(cell)` returns its row fields (None:
    the cell records nothing). Returns the rows stored by this call."""
    out = []
    for cell in self.plan(cells):
      if self.done(cell):
        continue
      self._start_clock()
      # Before each cell (the first included: an organism build and its report card may have
      # filled the map limit); sampler compiles relieve it too (sample/compiles.py).
      common.relieve_map_pressure()
      t = time.time()
      fields = fn(cell)
      if fields is not None:
        row = dict(cell.fields(), config_hash=self.chash, commit=self.commit)
        row.update(fields)
        row.setdefault("cell_seconds", time.time() - t)
        self.store.append(row)
        out.append(row)
      if not keep_scratch:
        shutil.rmtree(self.scratch(cell), ignore_errors=True)
      if self.bar is not None:
        self.bar.update(1)
    return out

  def close(self) -> float:
    """Close the bar; returns this invocation's wall seconds."""
    if self.bar is not None:
      self.bar.close()
    return time.time() - self.t0


__all__ = ["Cell", "Runner"]
