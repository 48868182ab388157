"""The training loop: `train(model, dataset, cfg, workdir)` runs the step over the data plan,
with progress (TensorBoard, tqdm), an eval hook (and the retire / stop rules it feeds) and a
checkpoint hook (save every cfg.ckpt_every steps, exact resume from the newest good step).

* Checkpoints (orbax, <workdir>/ckpt): trainable params, optimizer state and a JSON meta item
  (step, data position, rng, metrics history, data fingerprint). Killed runs resume
  bitwise-exactly from the newest good step; a corrupt newest step is skipped with a warning.
* Metrics: loss, grad norm, lr, tokens/s and MFU per step to TensorBoard (<workdir>/tb), a
  tqdm bar and the returned `TrainResult.history`.

Multi-host: every process runs `train` with the same arguments; each one builds only the rows
of the global batch that live on its own devices, and only process 0 writes TensorBoard / logs.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import nnx

from catchjax import common
from catchjax import sharding as shd
from catchjax.checkpoint import Checkpointer
from catchjax.model import llama
from catchjax.train.config import _merge_config
from catchjax.train.data import (DataPlan, RetiringPlan, _Examples, device_batch, loss_slots,
                                 prepare_examples)
from catchjax.train.step import (COMPILE_COUNT, StepSetup, from_master, prepare_model,
                                 split_trainable, step_setup, train_graph)

log = logging.getLogger("catchjax.train")


class TrainingDivergedError(FloatingPointError):
  """The loss or gradient norm became NaN/inf; the last good checkpoint is kept."""


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


# ------------------------------------------------------------------------- run pieces
@dataclasses.dataclass
class _Run:
  """What a run holds fixed: config, data plan, loss slots, mesh and the compiled step's
  setup, with the frozen weights on device."""
  c: Any
  ex: _Examples
  plan: DataPlan
  K: int
  mesh: Any
  mcfg: Any                          # the training graph's ModelConfig
  graphdef: Any
  setup: StepSetup
  frozen: Any
  main: bool

  def batch(self, step: int) -> dict[str, jax.Array]:
    return device_batch(self.plan, step, self.K, int(self.c.grad_accum),
                        self.setup.batch_tails, self.setup.b_sh, self.setup.micro_rows)


@dataclasses.dataclass
class _State:
  """What a step changes, and what a checkpoint restores."""
  trainable: Any
  opt_state: Any
  start: int = 0
  history: list = dataclasses.field(default_factory=list)
  resumed: int | None = None
  stopped: bool = False


def _data_plan(dataset, c, vocab_size: int, groups, main: bool):
  """(examples, plan, K) of the run; warns about dropped / truncated / skipped examples."""
  ex = prepare_examples(dataset, int(c.seq_len), c.too_long, vocab_size)
  plan_args = (int(c.seq_len), int(c.batch_size), int(c.seed), bool(c.pack), int(c.steps),
               int(c.epochs))
  plan = (DataPlan(ex, *plan_args, share_prefix=bool(c.share_prefix)) if groups is None else
          RetiringPlan(ex, groups, *plan_args, share_prefix=bool(c.share_prefix)))
  K = loss_slots(plan, int(c.seq_len), c.max_loss_tokens)
  if main and (ex.dropped or ex.truncated or ex.no_loss):
    log.warning("train: %d examples: %d dropped as longer than seq_len=%d, %d truncated, %d "
                "skipped (no loss token).", ex.n, ex.dropped, c.seq_len, ex.truncated,
                ex.no_loss)
  return ex, plan, K


def _build_run(model, c, mesh, ex, plan, K, main):
  """(run, trainable params on the host): the training graph of `model` split into trained
  and frozen weights, the step's shardings and optimizer, the frozen weights on device."""
  mesh = mesh if mesh is not None else shd.mesh_from_config(c)
  rules = shd.rules_dict(c.rules)
  note = shd.padding_note(int(c.batch_size), int(c.grad_accum), mesh, rules)
  if note and main:
    log.info("train: batch_size=%d: %s.", int(c.batch_size), note)
  model = prepare_model(model, c)
  mcfg = model.cfg
  graphdef, trainable_host, frozen_host = split_trainable(model, c)
  del model
  setup = step_setup(graphdef, trainable_host, frozen_host, c, mesh, rules, plan.total_steps, K,
                     train_graph(mcfg, c))
  frozen = shd.shard_state(frozen_host, setup.fr_sh)
  del frozen_host
  return _Run(c, ex, plan, K, mesh, mcfg, graphdef, setup, frozen, main), trainable_host


def _log_start(run: _Run, state: _State) -> None:
  c, plan = run.c, run.plan
  n_tr, n_all = _num(state.trainable), _num(state.trainable) + _num(run.frozen)
  log.info("train: %d examples -> %d steps (%d epochs) of %d x %d tokens%s, K=%d loss "
           "slots/row, mesh %s, %s: %.2fM of %.2fM params trained.", len(run.ex.ids),
           plan.total_steps, plan.epochs_used, c.batch_size, c.seq_len,
           f" (a {len(plan.prefix)}-token shared prefix per row)" if len(plan.prefix) else "",
           run.K, dict(run.mesh.shape),
           ("LoRA" if c.lora_rank > 0 else "full") + (
               f", blocks 0-{c.freeze_layers - 1} frozen (forward only)"
               if c.freeze_layers else ""),
           n_tr / 1e6, n_all / 1e6)


# ------------------------------------------------------------------------------ hooks
class _CheckpointHook:
  """Restore at the start, save every cfg.ckpt_every steps and at the end."""

  def __init__(self, run: _Run, workdir: str):
    c = run.c
    self.run, self.every = run, int(c.ckpt_every)
    self.ckpt = Checkpointer(os.path.join(workdir, "ckpt"), keep=int(c.keep),
                             async_save=bool(c.async_ckpt))
    self.fingerprint = run.plan.fingerprint()
    self.last_saved: int | None = None

  def _validate(self, meta) -> None:
    if meta.get("fingerprint") != self.fingerprint:
      raise ValueError(
          f"{self.ckpt.directory} holds checkpoints of a different run (data, seq_len, batch, "
          f"seed or step count differ); use a fresh workdir or delete it to start over.")

  def restore_or_init(self, trainable_host) -> _State:
    """The newest good checkpoint's state (its retirements re-applied to the plan), or fresh
    weights and optimizer state."""
    s, plan = self.run.setup, self.run.plan
    abs_tr = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), trainable_host)
    try:
      r = self.ckpt.restore_latest(abs_tr, s.opt_abs, s.tr_sh, s.opt_sh,
                                   validate=self._validate)
    except BaseException:
      self.ckpt.close()
      raise
    if r is None:
      trainable = shd.shard_state(trainable_host, s.tr_sh, copy=True)
      return _State(trainable, jax.jit(s.tx.init, out_shardings=s.opt_sh)(trainable))
    start, trainable, opt_state, meta = r
    for g, at in meta.get("retired", {}).items():
      plan.retire(g, at)
    self.last_saved = start
    if self.run.main:
      log.info("train: resumed from %s step %d (epoch %s, batch %s).", self.ckpt.directory,
               start, meta.get("epoch"), meta.get("index"))
    return _State(trainable, opt_state, start, list(meta.get("history", [])), start,
                  bool(meta.get("stopped", False)))

  def meta(self, step: int, state: _State) -> dict:
    c, plan = self.run.c, self.run.plan
    e, b = plan.position(step) if plan.has(step) else (plan.epochs_used, 0)
    key = jax.random.fold_in(jax.random.key(int(c.seed)), step)
    return {"step": step, "epoch": e, "index": b, "total_steps": plan.total_steps,
            "fingerprint": self.fingerprint,
            "rng": [int(v) for v in np.asarray(jax.random.key_data(key)).ravel()],
            "trainable": "lora" if c.lora_rank > 0 else "full", "lora_rank": int(c.lora_rank),
            "history": list(state.history), "retired": dict(getattr(plan, "retired", {})),
            "stopped": state.stopped}

  def after_step(self, done: int, last: bool, state: _State) -> None:
    every = self.every
    if every >= 0 and ((every and done % every == 0) or last):
      self.ckpt.save(done, state.trainable, state.opt_state, self.meta(done, state))
      self.last_saved = done

  def close(self) -> None:
    try:
      self.ckpt.close()
    except Exception:  # noqa: BLE001 - never mask the original error
      pass


class _Progress:
  """TensorBoard scalars and the tqdm bar, on the main process only."""

  def __init__(self, run: _Run, workdir: str, start: int, progress: bool):
    self.log_every = max(int(run.c.log_every), 1)
    self.writer = self.bar = None
    if run.main:
      from tensorboardX import SummaryWriter
      self.writer = SummaryWriter(os.path.join(workdir, "tb"))
    if run.main and progress:
      from tqdm.auto import tqdm
      self.bar = tqdm(total=run.plan.total_steps, initial=start, desc="train", unit="step",
                      dynamic_ncols=True)

  def step(self, rec: dict, done: int, plan: DataPlan) -> None:
    # `plan.has` only when the interval misses: a RetiringPlan's has() moves its segment.
    if self.writer is not None and (done % self.log_every == 0 or not plan.has(done)):
      for k in ("loss", "grad_norm", "lr", "tokens_per_sec", "mfu"):
        self.writer.add_scalar(f"train/{k}", rec[k], done)
    if self.bar is not None:
      self.bar.update(1)
      self.bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_sec']:.0f}",
                           mfu=f"{rec['mfu']:.1%}", refresh=False)

  def eval(self, out: dict, step: int) -> None:
    if self.writer is not None:
      for k, v in out.items():
        self.writer.add_scalar(f"eval/{k}", v, step)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
    if self.writer is not None:
      self.writer.flush()
      self.writer.close()


class _EvalHook:
  """eval_fn every cfg.eval_every steps (and at the end), feeding the retire and stop rules."""

  def __init__(self, run: _Run, progress: _Progress, eval_fn, retire_fn, stop_fn):
    self.run, self.progress = run, progress
    self.eval_fn, self.retire_fn, self.stop_fn = eval_fn, retire_fn, stop_fn
    self.every = int(run.c.eval_every)
    self.evals: list[dict[str, Any]] = []

  def __call__(self, step: int, trainable) -> dict | None:
    if self.eval_fn is None:
      return None
    out = self.eval_fn(nnx.merge(self.run.graphdef, trainable, self.run.frozen), step)
    if out:
      out = {k: float(v) for k, v in dict(out).items()}
      self.evals.append({"step": step, **out})
      self.progress.eval(out, step)
    return out

  def on_schedule(self, done: int, state: _State) -> dict | None:
    """The eval of an eval_every step (None on other steps); retirements and the stopping
    rule follow from it."""
    if not (self.every and done % self.every == 0):
      return None
    ev = self(done, state.trainable)
    if ev and self.retire_fn is not None:
      for g, at in self.retire_fn(done, ev).items():
        self.run.plan.retire(g, max(int(at), done))
    state.stopped = bool(ev) and self.stop_fn is not None and bool(self.stop_fn(done, ev))
    return ev


@dataclasses.dataclass
class _Meter:
  """Tokens, FLOPs and seconds of the steps run, for tokens/s and MFU."""
  flops_tok: float
  flops_head: float
  peak: float
  tokens: int = 0
  seconds: float = 0.0
  flops: float = 0.0

  @classmethod
  def for_run(cls, run: _Run) -> "_Meter":
    from catchjax.common import device_peak_flops
    mcfg = run.mcfg
    peak = (float(run.c.peak_flops) or device_peak_flops(mcfg.dtype)) * jax.device_count()
    return cls(mcfg.flops_per_token(int(run.c.seq_len), with_head=False,
                                    frozen_layers=int(run.c.freeze_layers)),
               6.0 * mcfg.hidden_size * mcfg.vocab_size,
               peak or float("nan"))   # unknown device: MFU is NaN, not a made-up figure

  def add(self, ntok: int, nloss: int, dt: float) -> float:
    flops = ntok * self.flops_tok + nloss * self.flops_head
    self.tokens, self.seconds, self.flops = (self.tokens + ntok, self.seconds + dt,
                                             self.flops + flops)
    return flops


# ------------------------------------------------------------------------------- loop
def _compile(run: _Run, state: _State, batch) -> tuple[Any, float]:
  """(the compiled step, compile seconds: 0 when jax.jit's cache served it). The cache
  serves train() calls with the same StepSpec and shapes."""
  t0 = time.perf_counter()
  n_traced = COMPILE_COUNT["train_step"]
  compiled = run.setup.step_fn.trace(state.trainable, run.frozen, state.opt_state,
                                     batch).lower().compile()
  if COMPILE_COUNT["train_step"] == n_traced:
    return compiled, 0.0
  compile_time = time.perf_counter() - t0
  common.record_compile("train step", compile_time)
  if run.main:
    log.info("train: step compiled in %.1fs", compile_time)
  return compiled, compile_time


def _one_step(run: _Run, state: _State, compiled, step: int, batch, t0: float,
              meter: _Meter, ckpt: _CheckpointHook) -> dict:
  """Run step `step` (0-based) on `batch`; its history record. Raises TrainingDivergedError
  on a non-finite loss or gradient norm."""
  plan = run.plan
  rows = plan.batch_rows(step)
  ntok, nloss = plan.row_stats(rows)
  state.trainable, state.opt_state, m = compiled(state.trainable, run.frozen, state.opt_state,
                                                 batch)
  m = jax.device_get(m)
  dt = time.perf_counter() - t0
  loss, gnorm = float(m["loss"]), float(m["grad_norm"])
  if not (math.isfinite(loss) and math.isfinite(gnorm)):
    ckpt.ckpt.wait()
    raise TrainingDivergedError(
        f"train: non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} "
        f"(loss={loss}, grad_norm={gnorm}) at step {step + 1} (epoch "
        f"{plan.position(step)[0]}, batch {plan.position(step)[1]}); stopped. The last "
        f"good checkpoint is step {ckpt.last_saved} in {ckpt.ckpt.directory}; lower lr or "
        f"check the data.")
  flops = meter.add(ntok, nloss, dt)
  return {"step": step + 1, "loss": loss, "grad_norm": gnorm,
          "lr": float(run.setup.sched(step)), "tokens": ntok, "loss_tokens": nloss,
          "tokens_per_sec": ntok / dt, "mfu": flops / dt / meter.peak, "step_time": dt,
          "examples": sum(len(r) for r in rows)}


def _loop(run: _Run, state: _State, meter: _Meter, progress: _Progress, evals: _EvalHook,
          ckpt: _CheckpointHook) -> float:
  """Steps from state.start to the plan's end or a stop; returns the compile seconds."""
  plan, start, compile_time = run.plan, state.start, 0.0
  if run.c.eval_at_start and start == 0:
    evals(0, state.trainable)
  if plan.has(start) and not state.stopped:
    batch = run.batch(start)
    compiled, compile_time = _compile(run, state, batch)
  step = start - 1
  while not state.stopped and plan.has(step + 1):
    step += 1
    t0 = time.perf_counter()
    if step != start:
      batch = run.batch(step)
    rec = _one_step(run, state, compiled, step, batch, t0, meter, ckpt)
    state.history.append(rec)
    done = step + 1
    progress.step(rec, done, plan)
    ev = evals.on_schedule(done, state)
    last = state.stopped or not plan.has(done)
    if last and ev is None:
      ev = evals(done, state.trainable)
    if ev:
      rec.update({f"eval/{k}": v for k, v in ev.items()})
    ckpt.after_step(done, last, state)
  ckpt.ckpt.wait()
  return compile_time


def train(model: llama.Llama, dataset, cfg=None, workdir: str | None = None, *,
          eval_fn: Callable[[llama.Llama, int], dict | None] | None = None, mesh=None,
          progress: bool = True, groups: Sequence[str] | None = None,
          retire_fn: Callable[[int, dict], dict[str, int]] | None = None,
          stop_fn: Callable[[int, dict], bool] | None = None) -> TrainResult:
  """Supervised fine-tuning of `model` on `dataset` (see `catchjax.train`).

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
  ex, plan, K = _data_plan(dataset, c, model.cfg.vocab_size, groups, main)
  run, trainable_host = _build_run(model, c, mesh, ex, plan, K, main)
  ckpt = _CheckpointHook(run, workdir)
  state = ckpt.restore_or_init(trainable_host)
  del trainable_host
  if main:
    _log_start(run, state)
  prog = _Progress(run, workdir, state.start, progress)
  meter = _Meter.for_run(run)
  evals = _EvalHook(run, prog, eval_fn, retire_fn, stop_fn)
  try:
    compile_time = _loop(run, state, meter, prog, evals, ckpt)
  finally:
    prog.close()
    ckpt.close()
  return _result(run, state, meter, evals, compile_time, time.perf_counter() - t_start)


def _result(run: _Run, state: _State, meter: _Meter, evals: _EvalHook, compile_time: float,
            wall: float) -> TrainResult:
  ex, history = run.ex, state.history
  steps_run = history[-1]["step"] if history else state.start
  res = TrainResult(model=nnx.merge(run.graphdef, from_master(state.trainable, run.mcfg),
                                    run.frozen),
                    history=history, steps=steps_run, wall_time=wall, dropped=ex.dropped,
                    truncated=ex.truncated, skipped_no_loss=ex.no_loss,
                    resumed_from=state.resumed, compile_time=compile_time,
                    tokens_per_sec=meter.tokens / meter.seconds if meter.seconds else 0.0,
                    mfu=meter.flops / meter.seconds / meter.peak if meter.seconds else 0.0,
                    evals=evals.evals, stopped=state.stopped)
  if run.main:
    log.info("train: done, %d steps, final loss %.4f, %.0f tok/s, MFU %.1f%%, %.1fs.",
             steps_run, res.final_loss, res.tokens_per_sec, 100 * res.mfu, wall)
  return res
