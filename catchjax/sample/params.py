"""What the caller asks for (`SamplingParams`) and gets back (`SampleOutput`)."""
from __future__ import annotations

import dataclasses

import numpy as np

MIN_TOPK_CAP = 8             # top-k candidates are fetched in powers of two >= this


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
      return (False, max(MIN_TOPK_CAP, 1 << (self.top_k - 1).bit_length()), False)
    return (False, 0, self.top_p < 1.0)


@dataclasses.dataclass
class SampleOutput:
  tokens: list[list[int]]          # new tokens, up to and including the first EOS
  logprobs: list[np.ndarray]       # raw model log p(token) (log-softmax at temperature 1)
  num_prompt_tokens: list[int]
  finished: list[bool]             # True if the row ended with an EOS
  token_array: np.ndarray          # [N, max_new_tokens] int32 as decoded: pad after EOS
  text: list[str] | None = None    # decoded new tokens (special tokens skipped), if tokenizer
