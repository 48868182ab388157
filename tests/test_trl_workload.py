"""benchmarks/trl_workload.py (issue 28 item 4): the organism workload with catchjax and with
TRL's SFTTrainer on the same tokenized rows, on a tiny random Llama (the CI smoke)."""
import math
import os

import pytest


def test_trl_workload_smoke(tiny_dir, monkeypatch, tmp_path):
  pytest.importorskip("trl", reason="trl is in requirements-test.txt; `make test` installs it")
  import json
  import sys
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                  "benchmarks"))
  import trl_workload
  monkeypatch.setenv("CATCHJAX_TINY_HF_DIR", tiny_dir)
  out_path = tmp_path / "w.json"
  out = trl_workload.main(["--tiny", "--steps", "3", "--warm", "1", "--threads", "1",
                           "--out", str(out_path)])
  assert json.loads(out_path.read_text())["workload"]["steps"] == 3
  for name in ("catchjax", "trl"):
    r = out[name]
    assert r["steps"] == 3, (name, r)
    # Packed rows hold several examples each: more examples than rows (4 a step).
    assert r["examples"] > 3 * 4, (name, r)
    assert r["steady_examples_per_s"] > 0 and math.isfinite(r["final_loss"]), (name, r)
    assert r["final_loss"] > 5   # a random model over a 49k vocab: ~log(49152) = 10.8
  assert out["ratio_steady_examples_per_s"] > 0
