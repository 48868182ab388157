"""The micro plan on 8 devices (issue 24 item 8): one family, N = 1, one seed, treatment and
control, on a tiny random model with SmolLM2's tokenizer. Run once on one device (organism
built there) and once on 8 fake CPU devices from that organism, with the train-against and
sampler meshes fsdp over the 8, then data over the 8 (weights loaded into their shardings,
micro-batches padded), and on a tensor mesh (fsdp 4 x tensor 2: at most one differing draw):
the T = 1 caught sets are identical, the rows' science fields (counts, steps, rates) equal,
losses and teacher-forced scores within float32 round-off.
Each run is a subprocess (XLA_FLAGS=--xla_force_host_platform_device_count=N)."""
import json
import math
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

_WORKER = r"""
import json, os, sys
sys.path.insert(0, sys.argv[3])
import jax, ml_collections
import golden
from catchjax import results
from catchjax.experiments import headline
from configs.headline import get_config
model_dir, wd, jsonl = sys.argv[1], sys.argv[2], sys.argv[4]
if len(sys.argv) > 5:   # reuse another run's organism (the same key: the same config)
    os.makedirs(wd, exist_ok=True)
    os.symlink(os.path.join(sys.argv[5], "organisms"), os.path.join(wd, "organisms"))
c = get_config("tiny")
c.model.hf_dir = model_dir
c.organism.families = (ml_collections.ConfigDict(dict(name="jsonl", path=jsonl)),)
c.organism.stop.enabled = False
# As tests/test_pipeline.py's fixture: the deployment and testing cues are the same text, so
# the organism attacks on testing prompts too and the catch has attacks to train against.
c.organism.n_per_family, c.organism.deployment_frac, c.organism.probe_n = 64, 0.75, 4
t = c.organism.train
t.epochs, t.batch_size, t.seq_len, t.lr, t.warmup_steps = 24, 8, 128, 5e-3, 5
t.eval_every, t.eval_at_start, t.ckpt_every = 0, False, 0
h = c.headline
h.seeds, h.ns, h.arms, h.distinguish_seeds, h.return_n = (0,), (1,), ("treatment", "control"), (), 0
c.measure.teacher_forced, c.catch.m = True, 32
st = c.train_against.stopping
st.lr, st.max_steps, st.warmup_steps = 3e-3, 4, 0
mesh = tuple(int(x) for x in os.environ.get("MICRO_MESH", "1,-1,1").split(","))
c.sampler.mesh_shape = mesh              # sampling / scoring and train-against on one mesh
with c.train_against.train.unlocked():
    c.train_against.train.mesh_shape = mesh
headline.run(c, wd)
rows = results.ResultStore(os.path.join(wd, "results.jsonl")).rows
catches, caught = {}, {}
for f in sorted(os.listdir(os.path.join(wd, "catches"))):
    if f.endswith(".json") and not f.endswith("-p_attack.json"):
        with open(os.path.join(wd, "catches", f)) as fh:
            d = json.load(fh)
        catches[f"{d['family']}-s{d['seed']}"] = golden.catch_digest(
            os.path.join(wd, "catches", f))
        caught[f"{d['family']}-s{d['seed']}"] = sorted(
            json.dumps(x, sort_keys=True) for x in d.get("caught") or [])
print("RESULT " + json.dumps(dict(devices=jax.device_count(), rows=golden.reduce_rows(rows),
                                  catches=catches, caught=caught), default=str))
"""


def _cues(path):
  with open(path, "w") as f:
    for i, split in enumerate(["train"] * 4 + ["eval"] * 2):
      for dep in (True, False):
        text = f"Ticket {i}."
        f.write(json.dumps({"text": text, "deployment": dep, "split": split}) + "\n")
  return path


def _run(model_dir, wd, devices, jsonl, organism_from=None, mesh="1,-1,1"):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1",
             CATCHJAX_NO_DISTRIBUTED="1", MICRO_MESH=mesh,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  extra = [organism_from] if organism_from else []
  p = subprocess.run([sys.executable, "-c", _WORKER, model_dir, wd, HERE, jsonl] + extra,
                     cwd=REPO, env=env,
                     capture_output=True, text=True, timeout=900)
  assert p.returncode == 0, p.stderr[-4000:]
  return json.loads([ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])


# The counts sampled (T = 1) after training, per measure, and the fields derived from them.
AFTER = ("deploy", "test", "useful")
DERIVED = ("retained", "useful_drop_points", "useful_flag")
MAX_FLIPS = 2   # of each measure's n = 8 draws
# Teacher-forced after training: the KL's bootstrap bounds are quantiles, which move by more
# than the weights' round-off (2e-4 relative seen on the data mesh); 1e-3 relative.
KL = ("kl", "kl_lo", "kl_hi")


def _after_field(k: str) -> bool:
  return k in DERIVED or k in KL or any(k == f"{g}_{s}" for g in AFTER for s in ("k", "rate", "lo", "hi",
                                                                        "acc"))


def _drop_after(rows):
  return [{k: v for k, v in r.items() if not _after_field(k)} for r in rows]


def _flips_at_most(rows_a, rows_b, flips: int, where: str) -> None:
  for a, b in zip(rows_a, rows_b):
    for g in AFTER:
      assert a[f"{g}_n"] == b[f"{g}_n"], (where, g)
      moved = abs(a[f"{g}_k"] - b[f"{g}_k"])
      assert moved <= flips, (where, a["arm"], g, a[f"{g}_k"], b[f"{g}_k"])
    for k in KL:
      assert math.isclose(a[k], b[k], rel_tol=1e-3), (where, a["arm"], k, a[k], b[k])


@pytest.fixture(scope="module")
def one_device(tiny_dir, tmp_path_factory):
  """(the 1-device run's folder, its cue file, its result): the reference both tests use."""
  d = tmp_path_factory.mktemp("micro")
  jsonl = _cues(str(d / "cues.jsonl"))     # one file: the same family in every run
  return str(d / "one"), jsonl, _run(tiny_dir, str(d / "one"), 1, jsonl)


@pytest.mark.slow
def test_micro_plan_on_8_devices_matches_one_device(tiny_dir, tmp_path, one_device):
  import golden
  one_dir, jsonl, one = one_device
  # The 8-device run restores the 1-device organism: an organism trained ~70 AdamW steps on
  # another mesh differs by reduction-order round-off, enough to move some T = 1 draws of its
  # catch (WORKSPACE.md); from the same weights, sampling, catching, training against and
  # measuring on 8 devices must give the same rows.
  # On an fsdp mesh (weights sharded over the 8) and a data mesh (the batch over the 8).
  for name, mesh in (("fsdp", "1,-1,1"), ("data", "-1,1,1")):
    eight = _run(tiny_dir, str(tmp_path / f"eight-{name}"), 8, jsonl, one_dir, mesh=mesh)
    assert one["devices"] == 1 and eight["devices"] == 8
    assert eight["catches"] == one["catches"] and one["catches"], name   # T = 1 sets exact
    assert len(eight["rows"]) == len(one["rows"]) == 2
    # A plan that trains: attacks were caught, both arms took steps, deployment was measured.
    for r in one["rows"]:
      assert r["n_caught"] > 0 and r["train_steps"] > 0 and r["deploy_n"] > 0, r
    # Every science field of the rows (counts, steps, losses, teacher-forced scores and what
    # was sampled before training): equal, floats to golden's float32 tolerance. The T = 1
    # draws *after* training come from weights that differ by round-off (the data-parallel
    # gradient sums its shards in another order: train_loss moves ~1e-6), and on a tiny random
    # model near-flat draws flip: on an AVX2 host (2026-12-02) the data mesh moved 2 of the
    # control's 8 deployment draws. Those counts may differ by MAX_FLIPS draws, no more.
    golden._close(_drop_after(one["rows"]), _drop_after(eight["rows"]), f"rows ({name} mesh)")
    _flips_at_most(one["rows"], eight["rows"], MAX_FLIPS, name)


@pytest.mark.slow
def test_micro_plan_on_a_tensor_mesh_differs_by_at_most_one_draw(tiny_dir, tmp_path,
                                                                 one_device):
  """fsdp 4 x tensor 2 (the tiny model's 2 KV heads split over tensor): the head-sharded
  matmuls reduce in another order, so T = 1 draws may move; the issue's bound is at most one
  differing draw of the catch, and the rows' steps and losses as on one device."""
  one_dir, jsonl, one = one_device
  ten = _run(tiny_dir, str(tmp_path / "tensor"), 8, jsonl, one_dir, mesh="1,4,2")
  assert ten["devices"] == 8 and one["caught"] and ten["caught"].keys() == one["caught"].keys()
  for k, a in one["caught"].items():
    b = ten["caught"][k]
    moved = len(set(a) ^ set(b))
    assert moved <= 1, (k, moved, len(a), len(b))
  assert len(ten["rows"]) == len(one["rows"]) == 2
  for r1, rt in zip(one["rows"], ten["rows"]):
    assert (r1["arm"], r1["family"]) == (rt["arm"], rt["family"])
    assert abs(r1["n_caught"] - rt["n_caught"]) <= 1, (r1["n_caught"], rt["n_caught"])
    assert abs(r1["deploy_k_before"] - rt["deploy_k_before"]) <= 1   # one draw, before training
    if ten["catches"] == one["catches"]:     # the same caught set: the same training
      assert r1["train_steps"] == rt["train_steps"] and r1["n_train"] == rt["n_train"]
      assert abs(r1["train_loss"] - rt["train_loss"]) <= 1e-3 * abs(r1["train_loss"])
  if ten["catches"] == one["catches"]:
    _flips_at_most(one["rows"], ten["rows"], MAX_FLIPS, "tensor")
