"""Compile-time plumbing of issue 24 item 5: the layer loop's unroll chosen by platform (auto:
unrolled on CPU, a rolled scan on GPU / TPU, any explicit value kept, validated), one shared
persistent XLA cache folder, and compile seconds recorded per program for the report header."""
import pytest

from catchjax import common


def test_scan_unroll_auto_is_unrolled_on_cpu_and_rolled_on_accelerators():
  assert common.resolve_scan_unroll(-1, "cpu") == 0
  assert common.resolve_scan_unroll(-1, "gpu") == 1
  assert common.resolve_scan_unroll(-1, "tpu") == 1
  assert common.resolve_scan_unroll(None, "tpu") == 1
  assert common.resolve_scan_unroll(4, "gpu") == 4 and common.resolve_scan_unroll(0, "tpu") == 0
  assert common.resolve_scan_unroll(-1) == 0          # this host is a CPU
  from configs.headline import get_config
  assert get_config().model.scan_unroll == -1         # the default is auto


def test_scan_unroll_is_validated(tiny_dir):
  from catchjax.validate import ConfigError, check_common
  from configs.headline import get_config
  c = get_config("tiny")
  c.model.hf_dir = tiny_dir
  check_common(c)
  c.model.scan_unroll = -2
  with pytest.raises(ConfigError, match="scan_unroll"):
    check_common(c)


def test_one_shared_xla_cache_folder(monkeypatch, tmp_path):
  monkeypatch.delenv("CATCHJAX_XLA_CACHE", raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  assert common.xla_cache_dir() == str(tmp_path / "catchjax" / "xla")
  monkeypatch.setenv("CATCHJAX_XLA_CACHE", "off")
  assert common.xla_cache_dir() is None
  monkeypatch.setenv("CATCHJAX_XLA_CACHE", str(tmp_path / "x"))
  assert common.xla_cache_dir() == str(tmp_path / "x")


def test_compile_seconds_are_recorded_per_program(monkeypatch):
  monkeypatch.setattr(common, "COMPILE_SECONDS", {})
  common.record_compile("train step", 2.0)
  common.record_compile("train step", 1.5)
  common.record_compile("sampler decode", 0.25)
  s = common.compile_summary()
  assert s["total_seconds"] == 3.8 and s["programs"]["train step"] == dict(compiles=2,
                                                                           seconds=3.5)
  assert common.compile_line().startswith("3.8 s (sampler decode 1 x / 0.2 s")


def test_the_sampler_records_its_compiles(monkeypatch):
  """One entry per compile JAX really does (its jit cache emptied first), none on a call that
  JAX's cache serves."""
  import jax
  import numpy as np
  from flax import nnx
  from catchjax import sample as S
  from catchjax.model import llama
  from catchjax.model.config import ModelConfig
  monkeypatch.setattr(common, "COMPILE_SECONDS", {})
  jax.clear_caches()
  cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                    num_heads=2, num_kv_heads=1, head_dim=16, eos_token_id=2, pad_token_id=0)
  s = S.Sampler(llama.Llama(cfg, nnx.Rngs(0)), batch_size=2, prompt_buckets=(8,), eos_ids=[],
                progress=False)
  n0 = S.compile_count()
  s.generate([np.array([3, 4, 5])], S.SamplingParams(max_new_tokens=2))
  progs = common.compile_summary()["programs"]
  assert set(progs) == {"sampler prefill", "sampler unstack", "sampler decode"}, progs
  assert all(v["compiles"] == 1 for v in progs.values()), progs
  assert S.compile_count() == n0 + 3
  assert sorted(k[0] for k in s.compile_seconds) == ["decode", "prefill", "unstack"]
  assert all(v > 0 for v in s.compile_seconds.values()), s.compile_seconds
  s.generate([np.array([6, 7])], S.SamplingParams(max_new_tokens=2))     # same shapes
  assert common.compile_summary()["programs"] == progs and S.compile_count() == n0 + 3
