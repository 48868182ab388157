"""Smoke test of the foundation: load SmolLM2 from the HF folder and sample a few prompts."""
import ml_collections

from configs.common import check_variant


VARIANTS = ("sampled",)   # --config=configs/smoke.py:<variant>; none: the default


def get_config(arg: str | None = None):
  check_variant(arg, VARIANTS, __file__)
  c = ml_collections.ConfigDict()
  c.experiment = "smoke"
  c.seed = 0
  c.model = ml_collections.ConfigDict(dict(
      hf_dir="artifacts/smollm2-135m-instruct", dtype="float32", param_dtype="float32"))
  c.prompts = [
      "What is the capital of France?",
      "What is 12 + 30?",
      "Write the word 'apple' in uppercase.",
      "Name a colour of the sky.",
  ]
  c.max_new_tokens = 24
  c.temperature = 0.0
  if arg == "sampled":
    c.temperature = 1.0
  return c
