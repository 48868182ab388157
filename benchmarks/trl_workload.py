"""The organism workload with catchjax and with TRL's SFTTrainer, in one run (issue 28 item 4).

The first `--steps` optimizer steps of the default organism's training (configs/organism.py):
the same SFT examples (the organism's own mixture, tokenized once), AdamW at the recipe's lr,
betas, weight decay and clip, the same warm-up + cosine schedule over the whole epoch (stopped
after `--steps`, so the schedule is the build's, not a shortened one), batch 4 rows of 256
tokens. catchjax packs with its loss-slot layout and `share_prefix`; TRL packs with best-fit
decreasing, padding-free (flash-style position ids, no cross-example attention) and
completion-only loss. The fair unit is examples per second (the two pack different numbers of
examples into a row), over the steps after the first `--warm` (compile / first-step overhead
excluded; totals are reported too). Probes are off in both: this is the training engine.

  .venv/bin/pip install trl        # benchmark-only; not a project requirement
  python benchmarks/trl_workload.py --steps 60 --out benchmarks/cpu_2core_trl_workload.json

`--tiny` runs both on a tiny random Llama in seconds (the CI smoke and this script's test).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def organism_data(config, n_per_family: int | None = None):
  """The default organism's tokenized SFT rows, in the build's order."""
  from catchjax.data import build
  from catchjax.data.behaviors import behavior_spec
  from catchjax.stages import organism as org_stage
  from catchjax.tokenizer import load_tokenizer
  o = config.organism
  tok = load_tokenizer(config.model.hf_dir)
  ds = build.build_organism_sft(org_stage.family_specs(o.families),
                                behavior_spec(config.behaviours[0]),
                                n_per_family or o.n_per_family, deployment_frac=o.deployment_frac,
                                testing_slip_rate=o.testing_slip_rate, seed=o.seed,
                                system=config.system, scratchpad=False)
  return build.tokenize(ds, tok)


def run_catchjax(config, ds, steps: int, warm: int) -> dict:
  """catchjax's train loop on `ds` for `steps` steps of the organism's schedule."""
  from catchjax import train as train_lib
  from catchjax.stages import organism as org_stage
  base = org_stage.load_base(config)
  tcfg = dict(config.organism.train.to_dict(), eval_every=max(1, steps), eval_at_start=False,
              ckpt_every=0)
  with tempfile.TemporaryDirectory() as wd:
    t0 = time.perf_counter()
    # eval_fn must return a non-empty dict: the loop feeds stop_fn only on a real eval.
    res = train_lib.train(base, ds, tcfg, wd, eval_fn=lambda m, s: {"step": float(s)},
                          progress=False,
                          stop_fn=lambda step, ev: step >= steps)
    wall = time.perf_counter() - t0
  h = res.history
  if len(h) != steps:
    raise RuntimeError(f"catchjax ran {len(h)} steps, not {steps}")
  ex = [r["examples"] for r in h]
  dt = [r["step_time"] for r in h]
  return dict(steps=len(h), examples=int(sum(ex)), wall_s=wall, compile_s=res.compile_time,
              steady_examples_per_s=sum(ex[warm:]) / sum(dt[warm:]),
              total_examples_per_s=sum(ex) / wall,
              tokens_per_step=float(np.mean([r.get("tokens", np.nan) for r in h])),
              final_loss=float(h[-1]["loss"]))


def run_trl(config, ds, steps: int, warm: int, threads: int) -> dict:
  """TRL's SFTTrainer on the same tokenized rows, the same optimizer and schedule."""
  import datasets
  import torch
  import transformers
  from transformers import AutoModelForCausalLM
  from trl import SFTConfig, SFTTrainer
  torch.set_num_threads(threads)
  t = config.organism.train
  rows = datasets.Dataset.from_dict(dict(
      input_ids=list(ds["input_ids"]), completion_mask=list(ds["loss_mask"])))
  model = AutoModelForCausalLM.from_pretrained(config.model.hf_dir, dtype=torch.float32)
  step_t, seen = [], [0]

  class Clock(transformers.TrainerCallback):
    def on_step_begin(self, args, state, control, **kw):
      self.t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
      step_t.append(time.perf_counter() - self.t)
      if state.global_step >= steps:
        control.should_training_stop = True

  with tempfile.TemporaryDirectory() as wd:
    args = SFTConfig(
        output_dir=wd, max_length=int(t.seq_len), packing=True, padding_free=True,
        completion_only_loss=True, per_device_train_batch_size=int(t.batch_size),
        num_train_epochs=1, learning_rate=float(t.lr), warmup_steps=int(t.warmup_steps),
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs=dict(min_lr_rate=float(t.end_lr_ratio)),
        weight_decay=float(t.weight_decay), max_grad_norm=float(t.clip),
        adam_beta1=float(t.b1) if "b1" in t else 0.9, adam_beta2=float(t.b2) if "b2" in t else 0.999,
        logging_steps=max(1, steps), save_strategy="no", report_to=[], seed=int(t.seed),
        dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(), bf16=False,
        disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=rows, callbacks=[Clock()])
    inner = trainer.data_collator   # TRL's own padding-free collator (a custom one is refused)

    def collate(features):
      batch = inner(features)
      # Examples in this batch: every packed row holds several, each starting at position 0.
      seen.append(int((batch["position_ids"] == 0).sum()))
      return batch
    trainer.data_collator = collate
    t0 = time.perf_counter()
    out = trainer.train()
    wall = time.perf_counter() - t0
  ex = seen[1:1 + len(step_t)]
  return dict(steps=len(step_t), examples=int(sum(ex)), wall_s=wall,
              steady_examples_per_s=sum(ex[warm:]) / sum(step_t[warm:]),
              total_examples_per_s=sum(ex) / wall, final_loss=float(out.training_loss),
              versions=dict(trl=__import__("trl").__version__, torch=torch.__version__,
                            transformers=transformers.__version__))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--steps", type=int, default=60)
  ap.add_argument("--warm", type=int, default=5, help="first steps left out of the rate")
  ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
  ap.add_argument("--tiny", action="store_true", help="a tiny random model (seconds)")
  ap.add_argument("--order", default="catchjax,trl")
  ap.add_argument("--out", default="")
  a = ap.parse_args(argv)
  from configs.organism import get_config
  config = get_config("tiny" if a.tiny else None)
  if a.tiny:
    config.model.hf_dir = os.environ["CATCHJAX_TINY_HF_DIR"]
  ds = organism_data(config, 64 if a.tiny else None)
  out = dict(workload=dict(steps=a.steps, warm=a.warm, n_rows=len(ds), tiny=a.tiny,
                           batch_size=int(config.organism.train.batch_size),
                           seq_len=int(config.organism.train.seq_len)),
             date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
  for name in a.order.split(","):
    print(f"[trl_workload] {name} ...", flush=True)
    out[name] = (run_catchjax(config, ds, a.steps, a.warm) if name == "catchjax" else
                 run_trl(config, ds, a.steps, a.warm, a.threads))
    print(f"[trl_workload] {name}: {json.dumps(out[name])}", flush=True)
  if "catchjax" in out and "trl" in out:
    out["ratio_steady_examples_per_s"] = (out["catchjax"]["steady_examples_per_s"]
                                          / out["trl"]["steady_examples_per_s"])
    out["ratio_total_examples_per_s"] = (out["catchjax"]["total_examples_per_s"]
                                         / out["trl"]["total_examples_per_s"])
    print(f"[trl_workload] catchjax / TRL examples/s: steady "
          f"{out['ratio_steady_examples_per_s']:.2f}x, total {out['ratio_total_examples_per_s']:.2f}x")
  if a.out:
    with open(a.out, "w") as f:
      json.dump(out, f, indent=2)
  return out


if __name__ == "__main__":
  main()
