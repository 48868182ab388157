"""Shared fixtures: tiny random HF folders and the real SmolLM2 folder (converted once)."""
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
  """The tests share the project's one persistent XLA cache (common.xla_cache_dir;
  CATCHJAX_XLA_CACHE=off turns it off)."""
  from catchjax import common
  common.enable_compile_cache(common.xla_cache_dir())
SMOLLM2_DIR = os.environ.get("CATCHJAX_MODEL_DIR",
                             os.path.join(REPO, "artifacts", "smollm2-135m-instruct"))


@pytest.fixture(scope="session")
def smollm2_dir():
  from catchjax.model.gguf import ensure_smollm2
  return ensure_smollm2(SMOLLM2_DIR)


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
  """(model, tokenizer) for the real SmolLM2-135M-Instruct, loaded once per session."""
  from catchjax.model import hf
  from catchjax.tokenizer import load_tokenizer
  return hf.load_hf(smollm2_dir), load_tokenizer(smollm2_dir)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, smollm2_dir):
  """A tiny random Llama HF folder (2 layers, width 64, GQA) that shares SmolLM2's tokenizer
  (vocab 49152), so pipeline tests can run on text."""
  from catchjax.model import hf
  from catchjax.model.config import ModelConfig
  d = str(tmp_path_factory.mktemp("tiny") / "llama")
  cfg = ModelConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0,
                    rms_eps=1e-5, tie_embeddings=True, eos_token_id=2, bos_token_id=1)
  hf.save_random_hf(cfg, d, seed=0, tokenizer_dir=smollm2_dir)
  return d
