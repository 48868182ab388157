"""The one supervised fine-tuning loop every experiment shares.

    result = train(model, dataset, cfg, workdir, eval_fn=None)

Three pieces, one module each:
* `data`: examples from the dataset, their packing into rows of `seq_len` (first-fit after a
  seeded shuffle per epoch; optionally a shared prefix stored once per row), loss masks and
  the order of batches (`DataPlan`, `RetiringPlan`), a pure function of (dataset, config).
* `step`: the loss (gathered LM head, weighted mean cross-entropy, exact gradient
  accumulation), the optimizer (AdamW, warmup + decay, clipping), what trains (full, LoRA,
  frozen bottom blocks, remat) and the jitted step whose static `StepSpec` lets jax.jit's
  own cache serve repeated runs; `eval_loss` computes the same loss without training.
* `loop`: `train`, the short loop over the plan with progress, eval (retire / stop) and
  checkpoint (save, exact resume) hooks.
`config` holds the train config's fields and validation.

Multi-host: call `sharding.maybe_initialize_distributed()` first thing in the entry point.
Every process then runs `train` with the same arguments.
"""
from catchjax.checkpoint import restore_params
from catchjax.train.config import DECAYS, TOO_LONG_RULES, _merge_config, default_train_config
from catchjax.train.data import (BATCH_DTYPES, DataPlan, RetiringPlan, _Examples, batch_tails,
                                 device_batch, first_fit, loss_slots, prepare_examples,
                                 shared_prefix, tokenize_chat_example)
from catchjax.train.loop import TrainingDivergedError, TrainResult, train
from catchjax.train.step import (COMPILE_COUNT, StepSetup, StepSpec, _opt_key, _token_ce,
                                 eval_loss, from_master, to_master, loss_sum, lr_schedule, make_optimizer,
                                 make_train_step, prepare_model, split_trainable, step_setup,
                                 train_graph, training_model_config)

__all__ = [
    "BATCH_DTYPES", "COMPILE_COUNT", "DECAYS", "DataPlan", "RetiringPlan", "StepSetup",
    "StepSpec", "TOO_LONG_RULES", "TrainResult", "TrainingDivergedError", "_Examples",
    "_merge_config", "_opt_key", "_token_ce", "batch_tails", "default_train_config",
    "device_batch", "eval_loss", "from_master", "to_master", "first_fit", "loss_slots", "loss_sum", "lr_schedule",
    "make_optimizer", "make_train_step", "prepare_examples", "prepare_model", "restore_params",
    "shared_prefix", "split_trainable", "step_setup", "tokenize_chat_example", "train",
    "train_graph", "training_model_config",
]
