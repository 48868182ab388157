"""Smoke experiment: load the real model through the HF-folder loader and sample a handful of
prompts with the jitted batched sampler (progress bar), printing and saving the answers."""
from __future__ import annotations

import json
import os
import time

from catchjax import common
from catchjax.model import hf
from catchjax.sample import SamplingParams
from catchjax.stages.sampling import make_sampler
from catchjax.tokenizer import load_tokenizer, prompt_ids


def validate(config):
  """Reject bad input before any compute, naming the field."""
  from catchjax import validate as V
  V.check_model_dir("config.model.hf_dir", config.model.hf_dir)
  V.positive_int("config.max_new_tokens", config.max_new_tokens)


def run(config, workdir: str):
  validate(config)
  t0 = time.time()
  model = hf.load_hf(config.model.hf_dir, dtype=config.model.dtype,
                     param_dtype=config.model.param_dtype)
  tok = load_tokenizer(config.model.hf_dir)
  print(f"loaded {config.model.hf_dir}: {hf.describe(model)} in {time.time() - t0:.1f}s")
  prompts = list(config.prompts)
  sampler = make_sampler(config, model)
  params = SamplingParams(temperature=config.temperature, max_new_tokens=config.max_new_tokens)
  t1 = time.time()
  out = sampler.generate([prompt_ids(tok, p) for p in prompts], params, seeds=config.seed)
  dt = time.time() - t1
  rows = []
  for p, toks in zip(prompts, out.tokens):
    text = tok.decode(toks, skip_special_tokens=True)
    rows.append({"prompt": p, "response": text})
    print(f"> {p}\n  {text}")
  n_new = sum(len(t) for t in out.tokens)
  print(f"{n_new} new tokens in {dt:.1f}s (includes compilation)")
  if common.is_main_process():
    common.atomic_write_text(os.path.join(workdir, "samples.json"), json.dumps(rows, indent=2))
  return rows
