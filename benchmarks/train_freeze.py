"""Train-step speed of the organism's shape (4 packed rows x 256 tokens, full fine-tune,
AdamW) with the first k blocks frozen (`train.freeze_layers`), or with LoRA adapters only
(`--lora_rank`), on the real SmolLM2 weights.

    .venv/bin/python benchmarks/train_freeze.py --freeze 0 20 24 --out benchmarks/x.json
    .venv/bin/python benchmarks/train_freeze.py --freeze 0 --lora_rank 0 16   # LoRA vs full

Every k runs in its own `train` call on the same random-token rows; tok/s is the median over
the steps after the first (compile excluded), with min and max.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--model_dir", default="artifacts/smollm2-135m-instruct")
  ap.add_argument("--freeze", type=int, nargs="+", default=[0, 20, 24])
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--seq_len", type=int, default=256)
  ap.add_argument("--steps", type=int, default=6)
  ap.add_argument("--lora_rank", type=int, nargs="+", default=[0])
  ap.add_argument("--out", default="")
  a = ap.parse_args()
  import jax
  from catchjax import train as T
  from catchjax.common import git_commit
  from catchjax.model import hf
  model = hf.load_hf(a.model_dir)
  rng = np.random.default_rng(0)
  # Organism-like rows: ~54-token examples whose last ~12 tokens carry the loss.
  data = []
  for _ in range(a.batch * (a.steps + 1) * (a.seq_len // 54)):
    L = int(rng.integers(40, 70))
    data.append({"input_ids": rng.integers(3, model.cfg.vocab_size, L).tolist(),
                 "loss_mask": [0] * (L - 12) + [1] * 12})
  out = {"device": jax.devices()[0].device_kind, "commit": git_commit(), "runs": {}}
  for k in a.freeze:
    for rank in a.lora_rank:
      wd = tempfile.mkdtemp(prefix="freeze_bench_")
      r = T.train(model, data, dict(steps=a.steps + 1, batch_size=a.batch, seq_len=a.seq_len,
                                    lr=1e-5, ckpt_every=-1, freeze_layers=k, lora_rank=rank),
                  wd, progress=False)
      shutil.rmtree(wd, ignore_errors=True)
      tps = [h["tokens_per_sec"] for h in r.history[1:]]
      name = f"freeze{k}" + (f"_lora{rank}" if rank else "")
      out["runs"][name] = dict(tok_s_median=float(np.median(tps)), tok_s_min=float(min(tps)),
                               tok_s_max=float(max(tps)), compile_s=r.compile_time,
                               mfu_median=float(np.median([h["mfu"] for h in r.history[1:]])))
      print(f"{name:16s}: {np.median(tps):6.1f} tok/s [{min(tps):.1f}, {max(tps):.1f}], "
            f"compile {r.compile_time:.1f}s", flush=True)
  if a.out:
    with open(a.out, "w") as f:
      json.dump(out, f, indent=2)


if __name__ == "__main__":
  main()
