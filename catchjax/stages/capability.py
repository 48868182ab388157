"""A capability to learn: the held-out prompts of one task family (e.g. the made-up `cipher`
code of data/tasks.py, which no organism is trained on), its sampled accuracy (the family's
checker), its teacher-forced loss, and training rows of it.

Built on a stages/context.py Context (its sampler, tokenizer and behaviour); the prompts carry
the family's testing cues, like caught prompts, so training on them differs from training
against a catch only in what is learned.
"""
from __future__ import annotations

import dataclasses

from catchjax.data import build, tasks
from catchjax.stages import measure


@dataclasses.dataclass
class Capability:
  family: str           # the task family
  prompts: list         # held-out prompts (token ids), eval split
  insts: list           # their task instances (for the checker)
  data: object          # the held-out prompts tokenized with their targets, for the loss
  seq_len: int
  max_new_tokens: int

  @classmethod
  def build(cls, ctx, spec, family: str, n: int, max_new_tokens: int) -> "Capability":
    """`n` held-out prompts of task `family` with trigger family `spec`'s testing cues."""
    ds = build.build_eval(spec, ctx.behaviour, "eval", n, deployment=False,
                          seed=ctx.ms.eval_seed, system=ctx.config.system,
                          task_families=[family])
    data = build.tokenize(ds, ctx.tok)
    return cls(family, ctx.prompts(ds), [build.task_instance(r) for r in ds], data,
               max(int(ctx.config.train_against.train.seq_len),
                   max(len(x) for x in data["input_ids"])),
               int(max_new_tokens))

  def accuracy(self, ctx, model, seed: int, temperature: float = 1.0) -> dict:
    """Sampled accuracy (rate with its Wilson interval) and two example responses."""
    ctx.sampler.update_model(model)
    d = measure.usefulness(ctx.sampler, ctx.tok, self.prompts, self.insts, tasks.check,
                           max_new_tokens=self.max_new_tokens, temperature=temperature,
                           seed=seed)
    return dict(measure.rate(d["k"], d["n"]), examples=d["responses"][:2])

  def greedy(self, ctx, model) -> dict:
    return self.accuracy(ctx, model, 0, temperature=0.0)   # (greedy: the seed is unused)

  def loss(self, model) -> float:
    """Mean teacher-forced loss on the held-out prompts' correct answers."""
    from catchjax.train import eval_loss
    return float(eval_loss(model, self.data, seq_len=self.seq_len, batch_size=8, pack=False))

  def train_rows(self, ctx, spec, n: int, seed: int) -> list[dict]:
    """`n` training examples of the task (train split, testing cues)."""
    ds = build.build_eval(spec, ctx.behaviour, "train", n, deployment=False, seed=seed,
                          system=ctx.config.system, task_families=[self.family])
    return [dict(prompt=q, target=t, system=s)
            for q, t, s in zip(ds["prompt"], ds["target"], ds["system"])]


__all__ = ["Capability"]
