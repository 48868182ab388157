"""The organism's training-time probe scores every family and side in one call: its means
equal the per-family, per-side teacher-forced P(attack prefix) of measure.attack_prob_tf."""
import json

import numpy as np


def test_one_call_probe_equals_per_family_scoring(tmp_path):
  from flax import nnx
  from catchjax.model import llama
  from catchjax.model.config import ModelConfig
  from catchjax.sample import Sampler
  from catchjax.stages import measure
  from catchjax.stages.organism import _probe_fn
  cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                    num_heads=2, num_kv_heads=1, head_dim=16, eos_token_id=2, pad_token_id=0)
  model = llama.Llama(cfg, nnx.Rngs(0))
  rng = np.random.default_rng(0)

  def prompts(n):
    return [list(rng.integers(3, 64, size=int(rng.integers(4, 20)))) for _ in range(n)]
  sets = {"a": dict(deploy=prompts(5), test=prompts(3), prefix=[7, 8, 9]),
          "b": dict(deploy=prompts(4), test=prompts(6), prefix=[11, 12])}
  sampler = Sampler(model, batch_size=4, progress=False)
  curve, secs = {}, [0.0]
  path = str(tmp_path / "curve.json")
  got = _probe_fn(sampler, sets, curve, path, True, secs)(model, 25)
  assert set(got) == {"a/deploy", "a/test", "b/deploy", "b/test"}
  for name, s in sets.items():
    for side in ("deploy", "test"):
      want = float(measure.attack_prob_tf(sampler, s[side], s["prefix"]).mean())
      assert 0.0 < want < 1.0
      np.testing.assert_allclose(got[f"{name}/{side}"], want, rtol=1e-5)
  # the families' means differ (the split back is not a no-op) and the curve is on disk
  assert len({round(v, 8) for v in got.values()}) == 4
  assert json.load(open(path))[0]["step"] == 25 and secs[0] > 0


def test_report_card_time_line_says_where_the_time_went():
  """Issue 28 item 1: the card's first line splits the build's time into training (probes,
  with their share, and compile inside it) and the report card."""
  from catchjax.stages.organism import time_line
  t = dict(seconds=1000.0, probe_seconds=50.0, compile_seconds=8.0, steps=181,
           examples_seen=4102, n_train=6000, tokens_per_sec=110.0)
  line = time_line(t, 300.0)
  assert line.startswith("Time: 1,300 s in all. Training 1,000 s (181 steps, 4102 of 6000")
  assert "probes 50 s (5.0%)" in line and "compile 8 s" in line and "report card 300 s" in line
