"""The train config: its fields with defaults, and their validation."""
from __future__ import annotations

import ml_collections

from catchjax import sharding as shd
from catchjax.model import llama

TOO_LONG_RULES = ("drop", "truncate")
DECAYS = ("cosine", "linear", "constant")


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
  # Master weights: the trained weights and the optimizer state are held in this dtype
  # whatever the model's storage dtype (param_dtype=bfloat16: fp32 master weights and AdamW
  # moments; the forward casts weights to the compute dtype at use). The trained model comes
  # back in its own param_dtype. "param": keep them in param_dtype (bf16 AdamW state).
  c.master_dtype = "float32"
  c.lora_rank = 0             # > 0: LoRA adapters of this rank only (base frozen)
  c.lora_alpha = 16.0
  c.remat = "none"            # none | full | dots (the training graph's remat policy)
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
                              # compute dtype (common.device_peak_flops)
  # Mesh and sharding.
  c.mesh_shape = (1, -1, 1)   # ('data', 'fsdp', 'tensor'); -1 = all remaining devices
  c.mesh_axes = shd.MESH_AXES
  c.rules = shd.DEFAULT_RULES
  return c


def _merge_config(cfg) -> ml_collections.ConfigDict:
  """`default_train_config()` overridden by `cfg` (a ConfigDict, dict or object), validated."""
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
  _validate(base)
  return base


def _validate(c) -> None:
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
  if c.master_dtype not in ("param", "float32", "bfloat16", "float16"):
    raise ValueError(f"master_dtype={c.master_dtype!r}; 'float32' (master weights) or 'param' "
                     f"(the model's own param_dtype).")
  if c.batch_size % c.grad_accum:
    raise ValueError(f"batch_size={c.batch_size} is not divisible by grad_accum={c.grad_accum}.")
  if c.steps <= 0 and c.epochs <= 0:
    raise ValueError("set steps > 0 or epochs > 0.")
