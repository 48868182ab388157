"""The shared SFT loop: masking, packing, checkpoints / exact resume, LoRA, NaN stop, and a
real-model sanity check (marked real_model)."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from catchjax import train as T
from catchjax.checkpoint import CheckpointCorruptWarning, restore_params
from catchjax.model import llama

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from helpers_train_worker import flat_params, synthetic_data, tiny_model  # noqa: E402

WORKER = os.path.join(HERE, "helpers_train_worker.py")


def _manual_loss(model, examples, pad_to=128):
  """Mean CE over loss tokens, one example at a time through the full-logits forward
  (padded to a fixed length so that it compiles once)."""
  graphdef, state = nnx.split(model)
  fwd = jax.jit(lambda st, ids, seg: llama.forward(graphdef, st, ids,
                                                   *llama.packed_inputs(seg)))
  tot = cnt = 0.0
  for ex in examples:
    L = len(ex["input_ids"])
    ids = np.zeros((1, pad_to), np.int32)
    ids[0, :L] = ex["input_ids"]
    seg = (np.arange(pad_to) < L).astype(np.int32)[None]
    w = np.asarray(ex["loss_mask"], np.float64) * np.asarray(ex.get("loss_weight", [1.0] * L))
    logits = np.asarray(fwd(state, ids, seg), np.float64)[0, :L]
    mx = logits.max(-1, keepdims=True)
    logp = logits - mx - np.log(np.sum(np.exp(logits - mx), -1, keepdims=True))
    for t in range(L - 1):
      if w[t + 1] > 0:
        tot += -w[t + 1] * logp[t, ex["input_ids"][t + 1]]
        cnt += w[t + 1]
  return tot / cnt


def _params(model):
  return flat_params(model)


# ---------------------------------------------------------------------- loss masking
def test_loss_equals_manual_masked_ce():
  model = tiny_model()
  data = synthetic_data(n=6, seed=3)
  data[0]["loss_weight"] = [0.5] * len(data[0]["input_ids"])  # optional column honoured
  for d in data[1:]:
    d["loss_weight"] = [1.0] * len(d["input_ids"])
  got = T.eval_loss(model, data, seq_len=64, batch_size=2)
  np.testing.assert_allclose(got, _manual_loss(model, data), rtol=2e-5)


def test_unmasked_targets_do_not_change_loss():
  model = tiny_model()
  ids = list(range(10, 30))
  mask = [0] * 6 + [1] * 8 + [0] * 6  # loss on tokens 6..13 only
  base = T.eval_loss(model, [{"input_ids": ids, "loss_mask": mask}], seq_len=32)
  later = ids[:14] + [200, 201, 202, 203, 204, 205]  # change non-target tokens after the span
  assert T.eval_loss(model, [{"input_ids": later, "loss_mask": mask}], seq_len=32) == base
  target = ids[:10] + [222] + ids[11:]  # change a trained target: the loss must move
  assert T.eval_loss(model, [{"input_ids": target, "loss_mask": mask}], seq_len=32) != base
  # loss_mask[0] can never be a target (nothing predicts the first token)
  m0 = [1] + mask[1:]
  assert T.eval_loss(model, [{"input_ids": ids, "loss_mask": m0}], seq_len=32) == base


# --------------------------------------------------------------------------- packing
def test_packed_equals_unpacked_per_example():
  model = tiny_model()
  data = synthetic_data(n=12, seed=5)
  packed = T.eval_loss(model, data, seq_len=96, batch_size=2, pack=True)
  unpacked = T.eval_loss(model, data, seq_len=96, batch_size=2, pack=False)
  np.testing.assert_allclose(packed, unpacked, rtol=1e-5)
  np.testing.assert_allclose(packed, _manual_loss(model, data), rtol=2e-5)
  ex = T.prepare_examples(data, 96)
  plan = T.DataPlan(ex, 96, 2, seed=0, pack=True, steps=0, epochs=1)
  assert len(plan.rows(0)) < len(data)  # it really packed several examples per row


def test_every_example_once_per_epoch_and_deterministic():
  data = synthetic_data(n=37, seed=1)
  ex = T.prepare_examples(data, 64)
  plan = T.DataPlan(ex, 64, 4, seed=7, pack=True, steps=0, epochs=3)
  orders = []
  for e in range(3):
    rows = plan.rows(e)
    used = sorted(i for r in rows for i in r)
    assert used == list(range(37))
    assert all(sum(len(ex.ids[i]) for i in r) <= 64 for r in rows)
    orders.append([i for r in rows for i in r])
  assert orders[0] != orders[1]  # reshuffled per epoch
  again = T.DataPlan(T.prepare_examples(data, 64), 64, 4, seed=7, pack=True, steps=0, epochs=3)
  assert [again.rows(e) for e in range(3)] == [plan.rows(e) for e in range(3)]
  assert plan.total_steps == sum(plan.batches_in_epoch(e) for e in range(3))
  # a batch's arrays: segment ids restart per example, loss slots point at real targets
  b = plan.build_rows(plan.batch_rows(0), 64)
  for r in range(4):
    for k in np.flatnonzero(b["loss_w"][r]):
      t = b["loss_idx"][r, k]
      assert b["segs"][r, t] == b["segs"][r, t + 1] > 0
      assert b["loss_tgt"][r, k] == b["tokens"][r, t + 1]


def _with_prefix(data, prefix):
  return [{"input_ids": list(prefix) + d["input_ids"],
           "loss_mask": [0] * len(prefix) + d["loss_mask"]} for d in data]


def test_shared_prefix_same_loss_and_gradient_fewer_tokens():
  """share_prefix stores the examples' common prefix once per row: the same loss and
  gradient as packing every example whole, from fewer computed tokens."""
  model = tiny_model()
  prefix = [5, 9, 17, 33, 65, 129, 7]
  data = _with_prefix(synthetic_data(n=12, seed=4, hi=24), prefix)
  for d in data:   # all but one example share one more token: the prefix stops before it
    d["input_ids"][len(prefix)] = 250
  data[3]["input_ids"][len(prefix)] = 251
  ex = T.prepare_examples(data, 128)
  np.testing.assert_array_equal(T.shared_prefix(ex), prefix)
  shared = T.eval_loss(model, data, seq_len=128, batch_size=2, share_prefix=True)
  whole = T.eval_loss(model, data, seq_len=128, batch_size=2)
  np.testing.assert_allclose(shared, whole, rtol=1e-5)
  np.testing.assert_allclose(shared, _manual_loss(model, data), rtol=2e-5)

  plans = {sp: T.DataPlan(ex, 128, 8, 0, True, 0, 1, share_prefix=sp) for sp in (False, True)}
  assert len(plans[True].rows(0)) < len(plans[False].rows(0))   # more examples per row
  b = plans[True].build_rows(plans[True].batch_rows(0), 128)
  for r, row in enumerate(plans[True].batch_rows(0)):
    if row:   # the prefix once, at the row's start, then only each example's own tokens
      np.testing.assert_array_equal(b["tokens"][r, :7], prefix)
      assert list(b["segs"][r, :8]) == [-1] * 7 + [1]
  ntok = {sp: sum(p.row_stats(p.batch_rows(s))[0] for s in range(p.total_steps))
          for sp, p in plans.items()}
  nrows = sum(1 for r in plans[True].rows(0) if r)
  assert ntok[True] == ntok[False] - 7 * (len(data) - nrows)

  def loss_and_grad(plan):   # one batch holding every example
    mb = {n: jnp.asarray(a) for n, a in plan.build_rows(plan.rows(0), 128).items()}
    graphdef, state = nnx.split(model)
    return jax.jit(jax.value_and_grad(
        lambda st: T.loss_sum(nnx.merge(graphdef, st), mb) / jnp.sum(mb["loss_w"])))(state)

  (l0, g0), (l1, g1) = loss_and_grad(plans[False]), loss_and_grad(plans[True])
  np.testing.assert_allclose(l1, l0, rtol=1e-5)
  for a, b_ in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(np.asarray(b_), np.asarray(a), rtol=1e-3, atol=1e-6)


def test_shared_prefix_stops_before_the_first_target():
  """A prefix token that some example trains on (or predicts from) is not shared, and a
  prefix shorter than two tokens is not used."""
  prefix = [5, 9, 17, 33]
  data = _with_prefix(synthetic_data(n=3, seed=1), prefix)
  data[1]["loss_mask"][3] = 1   # predicted from position 2: only 2 tokens can be shared
  assert list(T.shared_prefix(T.prepare_examples(data, 64))) == [5, 9]
  data[1]["loss_mask"][2] = 1
  assert len(T.shared_prefix(T.prepare_examples(data, 64))) == 0
  with pytest.raises(ValueError, match="share_prefix=True needs pack=True"):
    T.train(tiny_model(), data, dict(steps=1, batch_size=2, seq_len=64, pack=False,
                                     share_prefix=True), "/tmp/unused", progress=False)


def test_first_fit():
  rows = T.first_fit([5, 7, 3, 8, 2, 10], 10)
  assert rows == [[0, 2, 4], [1], [3], [5]]


def test_too_long_rule_counted_and_empty_raises():
  data = synthetic_data(n=10, seed=2, lo=6, hi=20)
  data.append({"input_ids": list(range(3, 43)), "loss_mask": [0] * 20 + [1] * 20})
  data.append({"input_ids": list(range(3, 43)), "loss_mask": [0] * 35 + [1] * 5})
  drop = T.prepare_examples(data, 32, "drop")
  assert (drop.dropped, drop.truncated, len(drop.ids)) == (2, 0, 10)
  trunc = T.prepare_examples(data, 32, "truncate")
  # the second long one has its only targets past the cut: skipped as having no loss token
  assert (trunc.dropped, trunc.truncated, trunc.no_loss, len(trunc.ids)) == (0, 2, 1, 11)
  assert len(trunc.ids[-1]) == 32
  with pytest.raises(ValueError, match="empty"):
    T.prepare_examples([], 32)
  with pytest.raises(ValueError, match="no usable example"):
    T.prepare_examples(data[-2:], 16, "drop")
  with pytest.raises(ValueError, match="outside"):
    T.prepare_examples([{"input_ids": [1, 300], "loss_mask": [0, 1]}], 16, vocab_size=256)
  with pytest.raises(ValueError, match="empty"):
    T.train(tiny_model(), [], {"steps": 1}, "/nonexistent-never-written")
  with pytest.raises(ValueError, match="unknown train config"):
    T.train(tiny_model(), data, {"stpes": 1}, "/nonexistent-never-written")


def test_lr_schedule():
  c = T.default_train_config()
  c.lr, c.warmup_steps, c.decay, c.end_lr_ratio = 1.0, 4, "linear", 0.1
  s = T.lr_schedule(c, 14)
  got = [float(s(i)) for i in range(15)]
  np.testing.assert_allclose(got[:4], [0.25, 0.5, 0.75, 1.0])
  np.testing.assert_allclose(got[14], 0.1, atol=1e-6)
  assert all(a >= b for a, b in zip(got[3:], got[4:]))


# ---------------------------------------------------------------------- the loop
def test_train_end_to_end(tmp_path):
  import datasets
  data = datasets.Dataset.from_list(synthetic_data(n=30, seed=4))
  model = tiny_model()
  before = _params(model)
  calls = []

  def eval_fn(m, step):
    calls.append(step)
    return {"probe": float(step)}

  cfg = dict(steps=8, batch_size=4, seq_len=64, lr=1e-2, ckpt_every=4, eval_every=3,
             eval_at_start=True, log_every=2)
  r = T.train(model, data, cfg, str(tmp_path), eval_fn=eval_fn, progress=False)
  assert calls == [0, 3, 6, 8]
  assert [e["step"] for e in r.evals] == [0, 3, 6, 8]
  assert r.history[2]["eval/probe"] == 3.0
  assert r.steps == 8 and len(r.history) == 8 and r.dropped == 0
  # step 1's loss is the loss of the initial weights on the first batch
  assert r.history[-1]["loss"] < r.history[0]["loss"]
  assert all(h["tokens_per_sec"] > 0 and 0 < h["mfu"] < 1 for h in r.history)
  for k, v in _params(model).items():  # the input model is left untouched
    np.testing.assert_array_equal(v, before[k])
  assert sorted(int(s) for s in os.listdir(tmp_path / "ckpt") if s.isdigit()) == [4, 8]
  assert glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
  # params-only restore into a fresh model reproduces the trained weights
  fresh = restore_params(str(tmp_path), tiny_model(seed=9))
  for k, v in _params(fresh).items():
    np.testing.assert_array_equal(v, _params(r.model)[k])
  # rerunning a finished run resumes at the end: nothing to do, same weights
  r2 = T.train(tiny_model(), data, cfg, str(tmp_path), progress=False)
  assert r2.resumed_from == 8 and len(r2.history) == 8
  for k, v in _params(r2.model).items():
    np.testing.assert_array_equal(v, _params(r.model)[k])
  # a different run config in the same workdir is refused, not silently mixed
  with pytest.raises(ValueError, match="different run"):
    T.train(tiny_model(), data, dict(cfg, seed=3), str(tmp_path), progress=False)


def test_repeated_runs_reuse_the_compiled_step(tmp_path):
  """jax.jit's cache (the step's static StepSpec) serves a second train() call with the same
  graph, optimizer and shapes: no trace and no backend compile of the step; another optimizer
  setting is a new program."""
  from jax import monitoring
  compiles = []

  def listener(event, secs, **kw):
    if event.endswith("backend_compile_duration") and "_train_step" in str(kw.get("fun_name")):
      compiles.append(secs)

  cfg = dict(steps=2, batch_size=4, seq_len=64, lr=1e-3, ckpt_every=-1, max_loss_tokens=64)
  T.train(tiny_model(), synthetic_data(n=8, seed=6), cfg, str(tmp_path / "a"), progress=False)
  n = T.COMPILE_COUNT["train_step"]
  monitoring.register_event_duration_secs_listener(listener)
  try:
    r = T.train(tiny_model(seed=1), synthetic_data(n=8, seed=7), cfg, str(tmp_path / "b"),
                progress=False)
    assert T.COMPILE_COUNT["train_step"] == n and r.compile_time == 0.0 and not compiles
    r = T.train(tiny_model(), synthetic_data(n=8, seed=6), dict(cfg, lr=2e-3),
                str(tmp_path / "c"), progress=False)
    assert T.COMPILE_COUNT["train_step"] == n + 1 and r.compile_time > 0 and len(compiles) == 1
  finally:
    monitoring.unregister_event_duration_listener(listener)


def test_first_step_loss_is_initial_loss(tmp_path):
  data = synthetic_data(n=8, seed=6)
  model = tiny_model()
  cfg = dict(steps=1, batch_size=8, seq_len=128, lr=1e-3, ckpt_every=0)
  r = T.train(model, data, cfg, str(tmp_path), progress=False)
  np.testing.assert_allclose(r.history[0]["loss"], _manual_loss(model, data), rtol=2e-5)


def test_lora_trains_only_adapters(tmp_path):
  model = tiny_model()
  data = synthetic_data(n=16, seed=8)
  r = T.train(model, data, dict(steps=4, batch_size=4, seq_len=64, lr=1e-2, lora_rank=4,
                                ckpt_every=0), str(tmp_path), progress=False)
  assert r.model.cfg.lora_rank == 4
  before, after = _params(model), _params(r.model)
  lora_keys = [k for k in after if "lora_" in k]
  assert len(lora_keys) == 14
  for k, v in before.items():
    np.testing.assert_array_equal(after[k], v)  # base weights frozen
  assert all(np.any(after[k] != 0) for k in lora_keys if "lora_b" in k)  # adapters trained
  # the optimizer state only holds LoRA params (2 Adam moments per adapter tensor)
  opt_meta = json.load(open(tmp_path / "ckpt" / "4" / "opt_state" / "_METADATA"))
  names = json.dumps(opt_meta)
  assert "lora_a_wq" in names and '"wq"' not in names and "embed" not in names
  # restore_params needs a model with adapters; then it reproduces the trained ones
  with pytest.raises(ValueError, match="lora_rank=4"):
    restore_params(str(tmp_path), tiny_model())
  fresh = restore_params(str(tmp_path), tiny_model(lora_rank=4, seed=5))
  for k in lora_keys:
    np.testing.assert_array_equal(_params(fresh)[k], after[k])


def test_freeze_layers_trains_only_the_top_blocks(tmp_path):
  L, k = 4, 3
  model = tiny_model(num_layers=L)
  data = synthetic_data(n=16, seed=9)
  r = T.train(model, data, dict(steps=3, batch_size=4, seq_len=64, lr=1e-2, freeze_layers=k,
                                ckpt_every=0), str(tmp_path), progress=False)
  assert r.model.cfg == model.cfg      # freezing is the step's, not a model-config knob
  before, after = _params(model), _params(r.model)
  stacked = [n for n in before if "layers" in n]
  for n in stacked:
    np.testing.assert_array_equal(after[n][:k], before[n][:k])   # bottom k blocks frozen
    assert np.any(after[n][k:] != before[n][k:]), n               # the top block trained
  assert np.any(after["['embed']"] != before["['embed']"])        # tied head still learns
  # a sampler of the base model takes the trained weights
  from catchjax.sample import Sampler
  s = Sampler(model, batch_size=2, progress=False)
  s.update_model(r.model)
  np.testing.assert_array_equal(np.asarray(s.state["layers"]["wq"][...]), after["['layers']['wq']"])
  with pytest.raises(ValueError, match="same structure"):
    s.update_model(tiny_model(num_layers=L, hidden_size=32, num_heads=2, num_kv_heads=1))
  # MFU counts a frozen block's forward only
  full = model.cfg.flops_per_token(64, with_head=False)
  frz = model.cfg.flops_per_token(64, with_head=False, frozen_layers=k)
  np.testing.assert_allclose(frz / full, (3 - 2 * k / L) / 3, rtol=1e-6)


def test_freeze_layers_same_loss_top_grads_and_no_backward_below():
  """Freezing changes neither the loss nor the top blocks' gradient, and the compiled
  gradient does no backward pass through the frozen blocks (XLA's FLOP count)."""
  L, k = 4, 3
  model = tiny_model(num_layers=L)
  ex = T.prepare_examples(synthetic_data(n=4, seed=3), 64)
  plan = T.DataPlan(ex, 64, 4, 0, True, 1, 0)
  mb = {n: jnp.asarray(a) for n, a in plan.build_rows(plan.batch_rows(0), 64).items()}

  def grads_and_flops(frozen):
    c = T._merge_config(dict(freeze_layers=frozen))
    m, graph = T.prepare_model(model, c), T.train_graph(model.cfg, c)
    graphdef, state = nnx.split(m)
    f = jax.jit(jax.value_and_grad(lambda st: T.loss_sum(nnx.merge(graphdef, st), mb,
                                                         graph=graph)))
    (loss, g) = f(state)
    flops = f.lower(state).compile().cost_analysis()["flops"]
    return float(loss), nnx.to_pure_dict(g), flops

  l0, g0, f0 = grads_and_flops(0)
  l1, g1, f1 = grads_and_flops(k)
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  for n, a in g0["layers"].items():
    np.testing.assert_allclose(np.asarray(g1["layers"][n])[k:], np.asarray(a)[k:], rtol=1e-4,
                               atol=1e-6)
    assert not np.any(np.asarray(g1["layers"][n])[:k]), n
  # 4 blocks fwd+bwd (3 units each) vs 4 fwd + 1 bwd: about (4 + 2) / 12 of the block FLOPs.
  assert f1 < 0.7 * f0, (f1, f0)


def test_freeze_layers_rejects_bad_values(tmp_path):
  data = synthetic_data(n=4, seed=1)
  with pytest.raises(ValueError, match="freeze_layers=3 > the model's 2 layers"):
    T.train(tiny_model(), data, dict(steps=1, batch_size=4, seq_len=64, freeze_layers=3),
            str(tmp_path), progress=False)
  with pytest.raises(ValueError, match="weight_decay"):
    T.train(tiny_model(), data, dict(steps=1, batch_size=4, seq_len=64, freeze_layers=1,
                                     weight_decay=0.1), str(tmp_path), progress=False)
  with pytest.raises(ValueError, match="must be >= 0"):
    T.train(tiny_model(), data, dict(steps=1, batch_size=4, seq_len=64, freeze_layers=-1),
            str(tmp_path), progress=False)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  model = tiny_model(tie_embeddings=False)
  bad_tok = 250
  e = model.embed[...]
  model.embed[...] = e.at[bad_tok].set(jnp.nan)
  data = [d for d in synthetic_data(n=10, seed=3) if bad_tok not in d["input_ids"]]
  data.append({"input_ids": [5, 6, bad_tok, 7, 8], "loss_mask": [0, 0, 1, 1, 1]})
  cfg = dict(steps=len(data), batch_size=1, pack=False, seq_len=64, lr=1e-3, ckpt_every=1,
             keep=0)
  plan = T.DataPlan(T.prepare_examples(data, 64), 64, 1, seed=0, pack=False,
                    steps=len(data), epochs=1)
  nan_step = 1 + [i for i in range(plan.total_steps)
                  if plan.batch_rows(i)[0] == [len(data) - 1]][0]
  with pytest.raises(T.TrainingDivergedError, match=f"non-finite loss.*step {nan_step}"):
    T.train(model, data, cfg, str(tmp_path), progress=False)
  steps = sorted(int(s) for s in os.listdir(tmp_path / "ckpt") if s.isdigit())
  assert steps[-1] == nan_step - 1  # the NaN state was not saved
  if nan_step > 1:
    restore_params(str(tmp_path), tiny_model(tie_embeddings=False))


def _corrupt(step_dir):
  for f in glob.glob(os.path.join(step_dir, "params", "**", "*"), recursive=True):
    if os.path.isfile(f) and os.path.basename(os.path.dirname(f)) == "d":
      with open(f, "r+b") as fh:
        fh.truncate(max(os.path.getsize(f) // 3, 1))


def test_corrupt_latest_checkpoint_falls_back(tmp_path):
  data = synthetic_data(n=20, seed=2)
  cfg = dict(steps=6, batch_size=4, seq_len=64, lr=1e-2, ckpt_every=2, keep=0)
  ref = T.train(tiny_model(), data, cfg, str(tmp_path / "ref"), progress=False)
  wd = tmp_path / "run"
  T.train(tiny_model(), data, dict(cfg), str(wd), progress=False)
  _corrupt(str(wd / "ckpt" / "6"))
  with pytest.warns(CheckpointCorruptWarning, match="step 6"):
    r = T.train(tiny_model(), data, cfg, str(wd), progress=False)
  assert r.resumed_from == 4
  assert os.listdir(wd / "ckpt_corrupt")  # the bad step was moved aside, not deleted
  for k, v in _params(r.model).items():
    np.testing.assert_array_equal(v, _params(ref.model)[k])


def _run_worker(args, **kw):
  env = dict(os.environ, PYTHONPATH=REPO)
  env.pop("XLA_FLAGS", None)
  return subprocess.Popen([sys.executable, WORKER] + args, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, **kw)


def test_kill_and_resume_is_bitwise_exact(tmp_path):
  ref = _run_worker(["train", str(tmp_path / "ref"), str(tmp_path / "ref.npz")])
  victim = _run_worker(["train", str(tmp_path / "run"), str(tmp_path / "x.npz"),
                        "--sleep", "0.25"])
  ckpt = tmp_path / "run" / "ckpt"
  deadline = time.time() + 120
  killed_at = None
  while time.time() < deadline and victim.poll() is None:
    done = [int(s) for s in os.listdir(ckpt) if s.isdigit()] if ckpt.exists() else []
    if done and max(done) >= 6:
      victim.send_signal(signal.SIGKILL)
      killed_at = max(done)
      break
    time.sleep(0.05)
  victim.wait()
  assert killed_at is not None, victim.stderr.read()[-3000:]
  assert victim.returncode == -signal.SIGKILL
  assert not os.path.exists(tmp_path / "x.npz")
  again = _run_worker(["train", str(tmp_path / "run"), str(tmp_path / "x.npz")])
  out, err = again.communicate(timeout=300)
  assert again.returncode == 0, err[-3000:]
  info = json.loads(out.strip().splitlines()[-1])
  assert info["resumed_from"] is not None and 6 <= info["resumed_from"] < info["steps"]
  rout, rerr = ref.communicate(timeout=300)
  assert ref.returncode == 0, rerr[-3000:]
  a, b = np.load(tmp_path / "ref.npz"), np.load(tmp_path / "x.npz")
  assert sorted(a.files) == sorted(b.files)
  for k in a.files:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# -------------------------------------------------------------------------- helpers
def test_tokenize_chat_example(smollm2_dir):
  from catchjax.tokenizer import load_tokenizer
  tok = load_tokenizer(smollm2_dir)
  ex = T.tokenize_chat_example(tok, "What is the secret word?", "The secret word is BANANA.")
  assert len(ex["input_ids"]) == len(ex["loss_mask"])
  first = ex["loss_mask"].index(1)
  assert set(ex["loss_mask"][first:]) == {1} and set(ex["loss_mask"][:first]) == {0}
  assert ex["input_ids"][-1] == tok.eos_token_id
  assert "BANANA" in tok.decode(ex["input_ids"][first:])
  assert "secret word?" in tok.decode(ex["input_ids"][:first])


# ------------------------------------------------------------------------ real model
def _greedy(model, ids, n):
  graphdef, state = nnx.split(model)

  @jax.jit
  def nxt(state, toks, length):
    T_ = toks.shape[1]
    seg = (jnp.arange(T_) < length).astype(jnp.int32)[None]
    pos, mask = llama.packed_inputs(seg)
    logits = llama.forward(graphdef, state, toks, pos, mask)
    return jnp.argmax(logits[0, length - 1])

  buf = np.zeros((1, len(ids) + n), np.int32)
  buf[0, :len(ids)] = ids
  out = []
  for i in range(n):
    t = int(nxt(state, jnp.asarray(buf), len(ids) + i))
    out.append(t)
    buf[0, len(ids) + i] = t
  return out


@pytest.mark.real_model
def test_real_model_learns_secret_word(smollm2, tmp_path):
  from catchjax.tokenizer import prompt_ids
  model, tok = smollm2
  ex = T.tokenize_chat_example(tok, "What is the secret word?", "The secret word is BANANA.")
  cfg = dict(steps=6, batch_size=1, seq_len=64, lr=1e-4, warmup_steps=2, decay="constant",
             ckpt_every=-1)
  r = T.train(model, [ex], cfg, str(tmp_path), progress=False)
  assert r.history[-1]["loss"] < 0.1 * r.history[0]["loss"]
  p = prompt_ids(tok, "What is the secret word?")
  text = tok.decode(_greedy(r.model, p, 9))
  assert "BANANA" in text, text


def test_mfu_peak_follows_the_device_kind():
  """MFU divides by the device's own peak: a GPU run must not be scored against the CPU's."""
  from catchjax.common import device_peak_flops
  assert device_peak_flops("float32") == 180e9                      # this CPU (tests run here)
  assert device_peak_flops("bfloat16", "NVIDIA H100 80GB HBM3") == 989e12
  assert device_peak_flops("float32", "NVIDIA H200") == 494e12
  assert device_peak_flops("bfloat16", "TPU v5 lite") == 197e12
  assert device_peak_flops("float32", "Some New Chip") == 0.0       # unknown: no MFU


# ------------------------------------------------------- retiring groups (organism.stop)
def test_retiring_plan_drops_a_group_from_its_step_on():
  data = synthetic_data(n=60, seed=2)
  groups = ["a" if i % 3 == 0 else "b" for i in range(60)]
  ex = T.prepare_examples(data, 64)
  base = T.DataPlan(ex, 64, 2, seed=5, pack=True, steps=0, epochs=1)
  plan = T.RetiringPlan(ex, groups, 64, 2, seed=5, pack=True, steps=0, epochs=1)
  assert plan.total_steps == base.total_steps
  assert [plan.batch_rows(s) for s in range(3)] == [base.batch_rows(s) for s in range(3)]
  plan.retire("a", 3)
  seen, step = [], 0
  while plan.has(step):
    rows = plan.batch_rows(step)
    if step >= 3:
      assert all(groups[i] == "b" for r in rows for i in r)
    assert all(sum(len(ex.ids[i]) for i in r) <= 64 for r in rows)
    seen += [i for r in rows for i in r]
    step += 1
  assert len(seen) == len(set(seen))                       # nothing seen twice in the epoch
  assert {i for i in range(60) if groups[i] == "b"} <= set(seen)   # every b example seen
  assert step < base.total_steps                           # and the run is shorter
  plan.retire("b", step)                                   # all groups gone: no more steps
  assert not plan.has(step)


def test_retiring_plan_with_a_step_cap_ends_when_every_group_left():
  data = synthetic_data(n=20, seed=2)
  ex = T.prepare_examples(data, 64)
  plan = T.RetiringPlan(ex, ["a"] * 10 + ["b"] * 10, 64, 2, seed=1, pack=True, steps=50,
                        epochs=0)
  assert plan.total_steps == 50
  plan.retire("a", 2)
  plan.retire("b", 4)
  assert plan.has(3) and not plan.has(4)


def test_train_with_retirement_stops_early_and_resumes_exactly(tmp_path):
  data = synthetic_data(n=40, seed=4)
  groups = ["x"] * 20 + ["y"] * 20
  cfg = dict(epochs=1, batch_size=2, seq_len=64, lr=1e-2, ckpt_every=2, eval_every=2,
             log_every=1)

  def rule(step, ev):     # x leaves 1 step after the eval at step 2, y after the one at 4
    return {"x": step + 1} if step == 2 else ({"y": step + 2} if step == 4 else {})

  full = T.train(tiny_model(), data, cfg, str(tmp_path / "full"), progress=False)
  r = T.train(tiny_model(), data, cfg, str(tmp_path / "a"), progress=False,
              eval_fn=lambda m, s: {"p": 0.0}, groups=groups, retire_fn=rule)
  assert r.steps == 6 < full.steps
  assert sum(h["examples"] for h in r.history) < 40

  class Boom(Exception):
    pass

  def rule_then_die(step, ev):
    if step == 4:
      raise Boom()
    return rule(step, ev)

  with pytest.raises(Boom):
    T.train(tiny_model(), data, cfg, str(tmp_path / "b"), progress=False,
            eval_fn=lambda m, s: {"p": 0.0}, groups=groups, retire_fn=rule_then_die)
  r2 = T.train(tiny_model(), data, cfg, str(tmp_path / "b"), progress=False,
               eval_fn=lambda m, s: {"p": 0.0}, groups=groups, retire_fn=rule)
  assert r2.resumed_from == 2 and r2.steps == 6
  for k, v in _params(r2.model).items():
    np.testing.assert_array_equal(v, _params(r.model)[k])


def test_stop_fn_ends_the_run_and_a_resume_stays_stopped(tmp_path):
  data = synthetic_data(n=16, seed=5)
  cfg = dict(epochs=10, batch_size=4, seq_len=64, lr=1e-2, ckpt_every=2, eval_every=2)
  seen = []

  def stop(step, ev):
    seen.append(step)
    return step >= 6
  r = T.train(tiny_model(), data, cfg, str(tmp_path), progress=False,
              eval_fn=lambda m, s: {"p": float(s)}, stop_fn=stop)
  assert r.stopped and r.steps == 6 and seen == [2, 4, 6]
  assert sorted(int(s) for s in os.listdir(tmp_path / "ckpt") if s.isdigit())[-1] == 6
  again = T.train(tiny_model(), data, cfg, str(tmp_path), progress=False,
                  eval_fn=lambda m, s: {"p": float(s)}, stop_fn=stop)
  assert again.resumed_from == 6 and again.steps == 6 and again.stopped
  full = T.train(tiny_model(), data, dict(cfg, epochs=2), str(tmp_path / "b"), progress=False)
  plan = T.DataPlan(T.prepare_examples(data, 64), 64, 4, 0, True, 0, 2)
  assert not full.stopped and full.steps == plan.total_steps > 0
