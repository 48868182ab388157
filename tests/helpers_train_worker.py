"""Subprocess worker for tests/test_train.py (kill-and-resume) and tests/test_sharding.py
(8 fake CPU devices). Not a test module itself.

  python tests/helpers_train_worker.py train WORKDIR OUT.npz [--sleep S] [--steps N]
  python tests/helpers_train_worker.py shard OUT.json      (needs XLA_FLAGS device count 8)
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def tiny_cfg(**kw):
  from catchjax.model.config import ModelConfig
  base = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
              num_kv_heads=2, head_dim=16, eos_token_id=2, bos_token_id=1)
  base.update(kw)
  return ModelConfig(**base)


def tiny_model(seed: int = 0, **kw):
  from flax import nnx
  from catchjax.model import llama
  return llama.Llama(tiny_cfg(**kw), nnx.Rngs(seed))


def synthetic_data(n: int = 48, seed: int = 0, vocab: int = 256, lo: int = 6, hi: int = 40):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    L = int(rng.integers(lo, hi))
    p = int(rng.integers(1, L - 1))
    out.append({"input_ids": rng.integers(3, vocab, L).tolist(),
                "loss_mask": [0] * p + [1] * (L - p)})
  return out


def flat_params(model) -> dict[str, np.ndarray]:
  from flax import nnx
  import jax
  pure = nnx.to_pure_dict(nnx.state(model))
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(pure)[0]}


def cmd_train(a):
  from catchjax import train as T
  sleep = a.sleep

  def eval_fn(model, step):  # slows the run down so that the test can kill it mid-way
    if sleep:
      time.sleep(sleep)
    return None

  cfg = dict(steps=a.steps, batch_size=4, seq_len=64, lr=3e-3, warmup_steps=2,
             weight_decay=0.01, ckpt_every=2, keep=3, eval_every=1, seed=1, grad_accum=a.accum)
  r = T.train(tiny_model(), synthetic_data(), cfg, a.workdir, eval_fn=eval_fn, progress=False)
  np.savez(a.out, **flat_params(r.model))
  print(json.dumps({"resumed_from": r.resumed_from, "steps": r.steps,
                    "final_loss": r.final_loss}), flush=True)


def cmd_shard(a):
  import jax
  from catchjax import sharding as shd
  from catchjax import train as T
  assert jax.device_count() == 8, jax.devices()
  data = synthetic_data(n=40)
  base = dict(steps=3, batch_size=8, seq_len=64, lr=3e-3, warmup_steps=1, ckpt_every=0,
              keep=1, seed=0)
  runs = {
      "single": (shd.make_mesh((1, 1, 1), devices=jax.devices()[:1]), {}),
      "fsdp8": (shd.make_mesh((1, 8, 1)), {}),
      "d2f2t2": (shd.make_mesh((2, 2, 2)), {}),
      "d2f2t2_accum2": (shd.make_mesh((2, 2, 2)), {"grad_accum": 2}),
  }
  out = {}
  ref = None
  for name, (mesh, extra) in runs.items():
    r = T.train(tiny_model(), data, dict(base, **extra), f"{a.out}.{name}", mesh=mesh,
                progress=False)
    p = flat_params(r.model)
    wq = r.model.layers.wq[...]
    info = {"losses": [h["loss"] for h in r.history], "wq_spec": str(wq.sharding.spec),
            "wq_shards": len(wq.sharding.device_set)}
    if ref is None:
      ref = p
    else:
      info["max_param_diff"] = max(float(np.max(np.abs(p[k] - ref[k]))) for k in ref)
    out[name] = info
  with open(a.out, "w") as f:
    json.dump(out, f)
  print(json.dumps(out), flush=True)


def main(argv=None):
  ap = argparse.ArgumentParser()
  sub = ap.add_subparsers(dest="cmd", required=True)
  t = sub.add_parser("train")
  t.add_argument("workdir")
  t.add_argument("out")
  t.add_argument("--sleep", type=float, default=0.0)
  t.add_argument("--steps", type=int, default=16)
  t.add_argument("--accum", type=int, default=1)
  s = sub.add_parser("shard")
  s.add_argument("out")
  a = ap.parse_args(argv)
  {"train": cmd_train, "shard": cmd_shard}[a.cmd](a)


if __name__ == "__main__":
  sys.exit(main())
