"""results.jsonl: one row per measured cell, keyed, appended atomically, never duplicated.

A cell's key is (experiment, family, behaviour, N, arm, seed, config hash). On a rerun, cells
already present are skipped, which is what makes a killed sweep resumable.
"""
from __future__ import annotations

import json
import os

from catchjax.common import atomic_write_text

KEY_FIELDS = ("experiment", "family", "behaviour", "n", "arm", "seed", "config_hash")
# A crossed design's cells also name their catch (`Cell.catch`, issue 27 item 6): rows that
# carry the field add it to their key; rows without it keep the 7-field key.
CROSSED_FIELD = "catch"


def row_key(row: dict) -> tuple:
  missing = [k for k in KEY_FIELDS if k not in row]
  if missing:
    raise KeyError(f"result row lacks key fields {missing}: {sorted(row)}")
  key = tuple(row[k] for k in KEY_FIELDS)
  return key + (row[CROSSED_FIELD],) if row.get(CROSSED_FIELD) is not None else key


class ResultStore:
  """`write=None`: only JAX process 0 writes the file (every process keeps the rows)."""

  def __init__(self, path: str, write: bool | None = None):
    self.path = path
    self.write = write
    self.rows: list[dict] = []
    if os.path.exists(path):
      with open(path) as f:
        for i, line in enumerate(f, 1):
          line = line.strip()
          if not line:
            continue
          try:
            self.rows.append(json.loads(line))
          except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: malformed result row ({e}).") from e
    self.keys = {row_key(r) for r in self.rows}

  def has(self, key: tuple) -> bool:
    return key in self.keys

  def append(self, row: dict) -> None:
    """Add a row; rewrites the file through a temp file + rename (atomic on POSIX)."""
    k = row_key(row)
    if k in self.keys:
      raise ValueError(f"duplicate result row for key {k}")
    self.rows.append(row)
    self.keys.add(k)
    if self.write is None:
      from catchjax.common import is_main_process
      self.write = is_main_process()
    if not self.write:
      return
    atomic_write_text(self.path, "".join(json.dumps(r, sort_keys=True) + "\n"
                                         for r in self.rows))
