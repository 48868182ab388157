"""The compile plan (issue 24 item 3, catchjax/plan.py): every program of a run is compiled from
abstract inputs (nothing of model size allocated) and reports compile seconds, FLOPs and
per-device memory; a plan over the per-device limit is refused naming the program. The 8B
test runs under 8 fake CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8) in a
subprocess, since the device count is fixed when JAX starts."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "vocab_size": 128256, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "max_position_embeddings": 131072, "tie_word_embeddings": False, "rms_norm_eps": 1e-5,
    "hidden_act": "silu", "bos_token_id": 128000, "eos_token_id": 128001,
    "attention_bias": False, "mlp_bias": False}


def _config_only_dir(tmp_path, name, cfg: dict) -> str:
  d = tmp_path / name
  d.mkdir()
  (d / "config.json").write_text(json.dumps(cfg))
  return str(d)


def _tiny_llama_config() -> dict:
  from catchjax.model.config import ModelConfig
  return ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0, rms_eps=1e-5,
                     tie_embeddings=True, eos_token_id=2, bos_token_id=1).to_hf_dict()


def _env(devices: int | None):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1",
             CATCHJAX_NO_DISTRIBUTED="1")
  env.pop("XLA_FLAGS", None)
  if devices:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


_PLAN_8B = r"""
import json, resource, sys, time
import jax
assert jax.device_count() == 8, jax.devices()
from catchjax import plan, sharding
from catchjax.model.config import ModelConfig
cfg = ModelConfig.from_hf_dir(sys.argv[1], scan_unroll=1)   # a rolled layer loop
mesh = sharding.make_mesh((1, -1, 1))                          # fsdp over the 8 devices
tc = dict(batch_size=8, seq_len=256, steps=1)
kw = dict(sampler_batch=8, prompt_len=64, max_new_tokens=16)
t0 = time.time()
try:
  plan.compile_plan(cfg, tc, mesh, device_gb=1, **kw)
except plan.PlanError as e:
  refused = str(e)
else:
  raise AssertionError("device_gb=1 was not refused")
t1 = time.time()
p = plan.compile_plan(cfg, tc, mesh, device_gb=80, **kw)
print(plan.format_plan(p), file=sys.stderr)
print(json.dumps(dict(plan=p, refused=refused, refuse_s=t1 - t0, plan_s=time.time() - t1,
                      rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                      params=cfg.num_params())))
"""


def test_llama3_8b_plan_on_8_fake_devices(tmp_path):
  """Llama-3-8B from its config.json alone, fsdp over 8 fake CPU devices, batch 8 x 256: each
  program reports memory and FLOPs, the train step's FLOPs are within 2x of 6 * params *
  tokens, its per-device arguments are the sharded fp32 params + Adam moments, device_gb=1 is
  refused naming the train step and device_gb=80 passes; nothing of model size was allocated
  (32 GB of fp32 weights) and it all takes well under two minutes."""
  d = _config_only_dir(tmp_path, "llama3-8b", LLAMA3_8B)
  p = subprocess.run([sys.executable, "-c", textwrap.dedent(_PLAN_8B), d], cwd=REPO,
                     env=_env(8), capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-4000:]
  out = json.loads(p.stdout.strip().splitlines()[-1])
  plan, n = out["plan"], out["params"]
  assert 8.0e9 < n < 8.1e9
  progs = {e["name"]: e for e in plan["programs"]}
  assert list(progs) == ["train step", "sampler prefill", "sampler decode"]
  for e in progs.values():
    for k in ("argument_bytes", "output_bytes", "temp_bytes", "code_bytes", "peak_bytes",
              "flops", "compile_seconds"):
      assert k in e and e[k] >= 0, (e["name"], k)
    assert e["flops"] > 0 and e["xla_flops_per_device"] > 0
    assert 0 < e["peak_bytes"] <= 80 * 2**30
  tr = progs["train step"]
  six_nt = 6 * n * 8 * 256
  assert six_nt / 2 < tr["flops"] < 2 * six_nt, (tr["flops"], six_nt)
  # XLA counts the rolled layer loop's body once: far below the loop-aware count.
  assert tr["xla_flops_per_device"] * 8 < tr["flops"] / 4
  # fp32 params + Adam mu and nu, sharded over 8 devices; donated, so aliased by the outputs.
  want = 3 * 4 * n / 8
  assert abs(tr["argument_bytes"] - want) / want < 0.02, (tr["argument_bytes"], want)
  assert tr["alias_bytes"] > 0.9 * tr["output_bytes"]
  assert tr["peak_bytes"] > 2**30
  # The experiments sample on one device: the full fp32 weights are its arguments.
  assert progs["sampler decode"]["argument_bytes"] > 4 * n
  assert progs["sampler prefill"]["held_bytes"] > 0
  msg = out["refused"]
  assert "the train step needs" in msg and "1.00 GiB limit (device_gb=1)" in msg, msg
  assert "GiB per device" in msg and "mesh {'data': 1, 'fsdp': 8, 'tensor': 1}" in msg, msg
  assert out["rss_gib"] < 8, out["rss_gib"]
  assert out["refuse_s"] + out["plan_s"] < 120, (out["refuse_s"], out["plan_s"])


def test_full_headline_plan_fits_a_16_gb_chip_for_an_8b_model(tmp_path):
  """`configs/headline.py:full` (issue 24 item 7) for Llama-3-8B from config.json alone, on 8
  fake devices, with --config.dry_run_device_gb=16 (a TPU v5e chip): bf16 weights, LoRA 64,
  the layer loop rolled (the target is not this host), the sampler on the 8-device mesh: every
  program fits under 16 GiB per device and the plan prints; nothing of model size allocated."""
  d = _config_only_dir(tmp_path, "llama3-8b", LLAMA3_8B)
  wd = tmp_path / "wd"
  p = _main(["--config=configs/headline.py:full", "--config.dry_run=True",
             "--config.dry_run_device_gb=16", f"--config.model.hf_dir={d}", f"--workdir={wd}"],
            devices=8, timeout=900)
  assert p.returncode == 0, p.stderr[-4000:]
  out = p.stdout
  assert "8.03B params" in out and "per-device limit 16.00 GiB" in out, out
  rows = {ln.split()[0] + " " + ln.split()[1]: ln.split() for ln in out.splitlines()
          if ln.strip().startswith(("organism train", "train-against", "sampler "))}
  assert set(rows) == {"organism train", "train-against step", "sampler prefill",
                       "sampler decode"}, rows
  for name, cols in rows.items():
    peak = float(cols[-1])
    assert 0.5 < peak <= 16.0, (name, peak)
  # The sampler's weights are sharded over the 8 devices: bf16 8B / 8 ~ 1.9 GiB of arguments
  # per device (prefill), not the 15 GiB of a one-device sampler.
  assert float(rows["sampler prefill"][-7]) < 4.0, rows["sampler prefill"]
  assert not (wd / "organisms").exists()


def _main(args, devices=None, timeout=300):
  return subprocess.run([sys.executable, "-m", "catchjax.main"] + args, cwd=REPO,
                        env=_env(devices), capture_output=True, text=True, timeout=timeout)


def test_headline_dry_run_from_config_json_alone(tmp_path):
  """`headline.py:tiny --config.dry_run=True` on a folder holding only config.json (no weights,
  no tokenizer): validates, prints the plan of the four programs, exit 0, builds nothing."""
  d = _config_only_dir(tmp_path, "tiny-llama", _tiny_llama_config())
  wd = tmp_path / "wd"
  p = _main(["--config=configs/headline.py:tiny", "--config.dry_run=True",
             f"--config.model.hf_dir={d}", f"--workdir={wd}"])
  assert p.returncode == 0, p.stderr[-4000:]
  assert "[headline] dry run" in p.stdout and "compile plan:" in p.stdout, p.stdout
  for name in ("organism train step", "train-against step", "sampler prefill",
               "sampler decode"):
    assert name in p.stdout, (name, p.stdout)
  assert "per-device limit unknown" in p.stdout
  assert not (wd / "organisms").exists() and not (wd / "catches").exists()
  assert not (wd / "xla_cache").exists()     # a plan keeps no compiled programs
  assert not (wd / "results.jsonl").exists()
  # Without dry_run the same folder is refused: a real run needs weights.
  p = _main(["--config=configs/headline.py:tiny", f"--config.model.hf_dir={d}",
             f"--workdir={tmp_path / 'wd2'}"])
  assert p.returncode == 2 and "has no model.safetensors" in p.stderr, p.stderr[-2000:]


def test_dry_run_refusals(tmp_path):
  """A plan over config.dry_run_device_gb is one config-error line naming the program; an
  experiment without a dry run refuses dry_run=True instead of running in full."""
  d = _config_only_dir(tmp_path, "tiny-llama", _tiny_llama_config())
  p = _main(["--config=configs/organism.py:tiny", "--config.dry_run=True",
             "--config.dry_run_device_gb=0.01", f"--config.model.hf_dir={d}",
             f"--workdir={tmp_path / 'wd'}"])
  err = p.stderr.strip().splitlines()
  assert p.returncode == 2, p.stderr[-3000:]
  assert "Traceback" not in p.stderr
  assert err[-1].startswith("catchjax: config error: config.dry_run_device_gb=0.01: "), err[-1]
  assert "the organism train step needs" in err[-1] and "0.01 GiB limit" in err[-1]
  assert not (tmp_path / "wd" / "organisms").exists()
  p = _main(["--config=configs/cot.py:tiny", "--config.dry_run=True",
             f"--config.model.hf_dir={d}", f"--workdir={tmp_path / 'wd3'}"])
  assert p.returncode == 2 and "the cot experiment has no dry run" in p.stderr, p.stderr
  assert not (tmp_path / "wd3").exists()


def test_shapes_only_validation_is_for_compile_plans_only(tmp_path):
  """config.json alone passes check_model_dir only with shapes_only, which check_common sets
  for the organism / headline dry runs (their plan reads nothing else), not for a real run or
  the extra experiments' dry runs (their plans hash the weights)."""
  import configs.headline as H
  import configs.transfer as TR
  from catchjax import validate as V
  d = _config_only_dir(tmp_path, "tiny-llama", _tiny_llama_config())
  assert V.check_model_dir("f", d, shapes_only=True).num_layers == 2
  with pytest.raises(V.ConfigError, match="has no model.safetensors"):
    V.check_model_dir("f", d)
  c = H.get_config("tiny")
  c.model.hf_dir = d
  with pytest.raises(V.ConfigError, match="has no model.safetensors"):
    V.check_common(c)
  c.dry_run = True
  V.check_common(c)
  c.dry_run_device_gb = -1.0
  with pytest.raises(V.ConfigError, match="config.dry_run_device_gb must be a number >= 0"):
    V.check_common(c)
  t = TR.get_config("tiny")
  t.model.hf_dir, t.dry_run = d, True
  with pytest.raises(V.ConfigError, match="has no model.safetensors"):
    V.check_common(t)


def test_jaxpr_flops_counts_loops():
  """The loop-aware count: a rolled scan's body times its length (XLA's cost_analysis counts
  it once), equal to the unrolled program's; a matmul is 2 * m * k * n."""
  import jax
  import jax.numpy as jnp
  from catchjax.plan import jaxpr_flops
  x = jax.ShapeDtypeStruct((16, 32), jnp.float32)
  w = jax.ShapeDtypeStruct((5, 32, 32), jnp.float32)

  def f(x, w, unroll):
    return jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w, unroll=unroll)[0].sum()

  rolled = jaxpr_flops(jax.make_jaxpr(lambda x, w: f(x, w, 1))(x, w))
  unrolled = jaxpr_flops(jax.make_jaxpr(lambda x, w: f(x, w, True))(x, w))
  assert rolled == unrolled == 5 * 2 * 16 * 32 * 32
  grad = jaxpr_flops(jax.make_jaxpr(jax.grad(lambda x, w: f(x, w, 1), argnums=1))(x, w))
  assert grad == 3 * rolled    # forward + the two backward matmuls per layer
