"""Multi-host, simulated on this machine: 2 `jax.distributed` processes on localhost (4 fake
CPU devices each, CPU collectives over gloo) train a tiny model through `catchjax.train.train`
on one 8-device mesh, save and restore orbax checkpoints together, sample and score on that
mesh, and must match one process with 8 fake devices; only process 0 writes results and
reports."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
WORKER = os.path.join(HERE, "helpers_dist_worker.py")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices, **extra):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
            "CATCHJAX_NO_DISTRIBUTED"):
    env.pop(k, None)
  env.update(extra)
  return env


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
  single = str(tmp_path / "single")
  p = subprocess.run([sys.executable, WORKER, single], env=_env(8), capture_output=True,
                     text=True, timeout=900)
  assert p.returncode == 0, p.stderr[-4000:]
  ref = json.loads(open(single + ".p0.json").read())
  assert ref["multi"] is False and ref["process_count"] == 1

  multi = str(tmp_path / "multi")
  port = _free_port()
  procs, logs = [], []
  for i in range(2):
    log = open(tmp_path / f"p{i}.log", "w")
    logs.append(log)
    procs.append(subprocess.Popen(
        [sys.executable, WORKER, multi],
        env=_env(4, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                 JAX_PROCESS_ID=str(i)), stdout=log, stderr=subprocess.STDOUT))
  try:
    rcs = [p.wait(timeout=900) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
    for f in logs:
      f.close()
  assert rcs == [0, 0], "\n".join((tmp_path / f"p{i}.log").read_text()[-3000:] for i in (0, 1))
  got = [json.loads(open(f"{multi}.p{i}.json").read()) for i in (0, 1)]
  for i, g in enumerate(got):
    assert g["multi"] is True and g["process_count"] == 2 and g["process_index"] == i
    assert g["local_devices"] == 4
    # The same global loss on both processes, equal to the one-process run's.
    assert g["losses"] == pytest.approx(ref["losses"], rel=1e-5)
    assert g["wq_spec"] == ref["wq_spec"]
    assert g["wq_local_shards"] == 4 and ref["wq_local_shards"] == 8
    # Both processes restored the multi-host orbax checkpoint of the last step.
    assert g["resumed_from"] == 4 and g["restore_max_diff"] == 0.0
    assert g["rows_in_memory"] == 1
    # Multi-host sampling (issue 24 item 2): the same greedy tokens as one process, scores to
    # float32 round-off, on both processes.
    assert g["sample_tokens"] == ref["sample_tokens"]
    assert g["sampled_tokens"] == ref["sampled_tokens"]      # T = 1, the same seeds
    assert g["sample_scores"] == pytest.approx(ref["sample_scores"], rel=1e-5, abs=1e-4)
  # Only process 0 wrote results and reports (process 1 wrote nothing, lock included).
  assert {"results.jsonl", "report.md", "summary.csv"} <= set(got[0]["wrote"])
  assert got[1]["wrote"] == []
  a, b = np.load(single + ".npz"), np.load(multi + ".npz")
  assert set(a.files) == set(b.files)
  for k in a.files:
    assert a[k].shape == b[k].shape, k
    assert float(np.max(np.abs(a[k] - b[k]))) < 1e-4, k   # float32 reduction-order noise
