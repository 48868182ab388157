"""Subprocess worker for tests/test_distributed.py: a few `catchjax.train.train` steps of a
tiny model on a ('data', 'fsdp', 'tensor') mesh of 8 CPU devices, either in one process or as
one of 2 `jax.distributed` processes on localhost (4 fake devices each). Not a test module.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/helpers_dist_worker.py OUT
  JAX_COORDINATOR_ADDRESS=127.0.0.1:P JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=i \\
    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/helpers_dist_worker.py OUT

Writes OUT.p<process>.json (losses, resume point, what this process wrote) and, on process 0,
OUT.npz with the trained params gathered from all processes.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def main(out: str):
  from catchjax import sharding as shd
  multi = shd.maybe_initialize_distributed()   # the entry point's own code path
  import jax
  from jax.experimental import multihost_utils
  from catchjax import common, report, results
  from catchjax import train as T
  from helpers_train_worker import synthetic_data, tiny_model
  assert jax.device_count() == 8, jax.devices()
  pi = jax.process_index()
  info = {"multi": multi, "process_index": pi, "process_count": jax.process_count(),
          "local_devices": jax.local_device_count()}
  cfg = dict(steps=4, batch_size=8, seq_len=64, lr=3e-3, warmup_steps=1, ckpt_every=2, keep=2,
             seed=0)
  mesh = shd.make_mesh((2, 4, 1))
  wd = out + ".train"   # shared by the processes: orbax multi-host checkpoints
  from flax import nnx

  def gathered(model):
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    flat = {jax.tree_util.keystr(k): v
            for k, v in jax.tree_util.tree_flatten_with_path(pure)[0]}
    return {k: np.asarray(multihost_utils.process_allgather(v, tiled=True))
            for k, v in flat.items()}

  r = T.train(tiny_model(), synthetic_data(n=40), cfg, wd, mesh=mesh, progress=False)
  info["losses"] = [h["loss"] for h in r.history]
  info["wq_spec"] = str(r.model.layers.wq[...].sharding.spec)
  info["wq_local_shards"] = len(r.model.layers.wq[...].addressable_shards)
  full = gathered(r.model)
  # The same call again: every process restores the multi-host orbax checkpoint (step 4).
  r2 = T.train(tiny_model(), synthetic_data(n=40), cfg, wd, mesh=mesh, progress=False)
  info["resumed_from"] = r2.resumed_from
  again = gathered(r2.model)
  info["restore_max_diff"] = max(float(np.max(np.abs(again[k] - full[k]))) for k in full)
  # Sampling on the same 8-device mesh (multi-host when 2 processes): the trained weights
  # stay sharded, greedy tokens and teacher-forced scores come back on every process.
  import ml_collections
  from catchjax.sample import SamplingParams
  from catchjax.stages.sampling import make_sampler
  rng = np.random.default_rng(0)
  prompts = [rng.integers(3, 256, size=int(n)).tolist() for n in rng.integers(3, 9, size=6)]
  conts = [rng.integers(3, 256, size=3).tolist() for _ in prompts]
  sc = ml_collections.ConfigDict(dict(sampler=dict(mesh_shape=(2, 4, 1))))
  s = make_sampler(sc, r.model, 6, prompt_buckets=(16,), eos_ids=[], progress=False)
  info["sample_tokens"] = [list(map(int, t)) for t in
                           s.generate(prompts, SamplingParams(max_new_tokens=6)).tokens]
  info["sampled_tokens"] = [list(map(int, t)) for t in s.generate(
      prompts, SamplingParams(max_new_tokens=6, temperature=1.0), seeds=7).tokens]
  info["sample_scores"] = [float(x) for x in s.score_sum(prompts, conts)]
  # Writes: every process calls the writers on its own folder; only process 0 may write.
  d = f"{out}.writes.p{pi}"
  os.makedirs(d, exist_ok=True)
  with common.workdir_lock(d):
    store = results.ResultStore(os.path.join(d, "results.jsonl"))
    store.append(dict(experiment="dist", family="f", behaviour="b", n=1, arm="treatment",
                      seed=0, config_hash="h", deploy_rate=0.5, deploy_rate_before=1.0,
                      retained=0.5, n_train=1, deploy_n=8))
    report.write_report(store.rows, d, {"title": "dist"})
  info["wrote"] = sorted(os.listdir(d))
  info["rows_in_memory"] = len(store.rows)
  multihost_utils.sync_global_devices("done")
  if pi == 0:
    np.savez(out + ".npz", **full)
  with open(f"{out}.p{pi}.json", "w") as f:
    json.dump(info, f)
  print(json.dumps(info), flush=True)


if __name__ == "__main__":
  main(sys.argv[1])
