"""Side-by-side benchmark: catchjax vs HF transformers + PyTorch on the same machine.

    python -m catchjax.bench                       # full CPU benchmark (minutes)
    python -m catchjax.bench --smoke               # seconds-long check that it still works
    python -m catchjax.bench --dtype=bfloat16      # accelerator run (bf16 compute)

Measures, for the same SmolLM2-135M weights (HF folder; `--random_init` uses the folder's
config with random weights, same speed):
  (a) train step: full fine-tune, AdamW, batch 8 x 128 tokens -> tokens/s and MFU against the
      fp32 (or bf16) matmul peak measured in the same run;
  (b) sampling: 256 chat prompts of eval shape (~40-80 tokens), 32 new tokens, temperature 1
      -> new tokens/s including prefill; HF `generate` at its best batch size;
  (c) teacher-forced scoring tokens/s;
  (d) peak resident memory of each side (each side runs in its own subprocess).
Every figure is a median over repeats with min and max. Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np


def _prompts(tok, n: int, seed: int = 0) -> list[list[int]]:
  from catchjax.data.tasks import make_tasks
  from catchjax.data.triggers import make_trigger
  from catchjax.tokenizer import prompt_ids
  rng = np.random.default_rng(seed)
  fams = [make_trigger(f) for f in ("token", "year", "tier", "headline", "collusion")]
  insts = make_tasks("eval", n, seed)
  out = []
  for i, inst in enumerate(insts):
    f = fams[i % len(fams)]
    out.append(prompt_ids(tok, f.wrap(inst.prompt, bool(i % 2), "eval", rng)))
  return out


def _stats(xs):
  return dict(median=float(np.median(xs)), min=float(np.min(xs)), max=float(np.max(xs)),
              n=len(xs))


def _peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def matmul_peak(dtype: str, sizes=(1024, 2048, 3072), reps: int = 5) -> float:
  """The best square-matmul FLOP/s over `sizes` and `reps` timed repeats, each size warmed up
  (compiled and run twice) first: a max, so one slow (contended) repeat cannot lower it."""
  import jax
  import jax.numpy as jnp
  f = jax.jit(lambda x: x @ x)
  best = 0.0
  for n in sizes:
    a = jnp.ones((n, n), dtype)
    for _ in range(2):
      f(a).block_until_ready()
    for _ in range(reps):
      t = time.perf_counter()
      f(a).block_until_ready()
      best = max(best, 2 * n ** 3 / (time.perf_counter() - t))
  return best


def _load_jax(args):
  from catchjax import common
  from catchjax.model import hf
  from catchjax.model.config import ModelConfig
  from flax import nnx
  if args.random_init:
    from catchjax.model.llama import Llama
    cfg = ModelConfig.from_hf_dir(args.model_dir, dtype=args.dtype,
                                  scan_unroll=common.resolve_scan_unroll(args.scan_unroll))
    return Llama(cfg, nnx.Rngs(0))
  return hf.load_hf(args.model_dir, dtype=args.dtype,
                    scan_unroll=common.resolve_scan_unroll(args.scan_unroll))


def run_jax(args) -> dict:
  import jax
  from catchjax import train as T
  from catchjax.sample import Sampler, SamplingParams
  from catchjax.tokenizer import load_tokenizer
  from catchjax import common
  out = {"device": str(jax.devices()[0].device_kind), "backend": jax.default_backend()}
  # The shared persistent XLA cache (common.xla_cache_dir), unless --cold_compile: compile
  # seconds from a warm cache are load times, so the JSON says which they are.
  out["xla_cache"] = None if args.cold_compile else common.enable_compile_cache(
      common.xla_cache_dir())
  sizes = (4096, 8192) if jax.default_backend() == "gpu" else (1024, 2048, 3072)
  peak = matmul_peak(args.dtype, sizes)
  model = _load_jax(args)
  tok = load_tokenizer(args.model_dir)
  # (a) train step
  rng = np.random.default_rng(0)
  B, L, steps = args.train_batch, args.train_len, args.train_steps + 1
  data = [{"input_ids": rng.integers(3, model.cfg.vocab_size, L).tolist(),
           "loss_mask": [0] + [1] * (L - 1)} for _ in range(B * steps)]
  wd = f"/tmp/catchjax_bench_{os.getpid()}"
  r = T.train(model, data, dict(steps=steps, batch_size=B, seq_len=L, lr=1e-5, pack=False,
                                ckpt_every=-1, peak_flops=peak / max(jax.device_count(), 1)),
              wd, progress=False)
  tps = [h["tokens_per_sec"] for h in r.history[1:]]
  # The peak again after training, the max of both: MFU is against the best this machine
  # showed in the run, so a peak measured in a slow moment cannot push it over 100%.
  peak_after = matmul_peak(args.dtype, sizes)
  out["matmul_peak_flops"] = best = max(peak, peak_after)
  out["matmul_peak_runs"] = [peak, peak_after]
  out["train"] = dict(tok_s=_stats(tps),
                      mfu=_stats([h["mfu"] * peak / best for h in r.history[1:]]),
                      compile_s=r.compile_time)
  # (b) sampling
  prompts = _prompts(tok, args.n_prompts)
  out["prompt_len_mean"] = float(np.mean([len(p) for p in prompts]))
  s = Sampler(model, batch_size=args.sample_batch, progress=False)
  sp = SamplingParams(temperature=1.0, max_new_tokens=args.new_tokens)
  s.generate(prompts, sp, seeds=10_000)   # compiles every shape the timed calls use
  out["sample_compile_s"] = float(sum(s.compile_seconds.values()))
  rates = []
  for rep in range(args.repeats):
    t = time.perf_counter()
    o = s.generate(prompts, sp, seeds=rep)
    rates.append(sum(len(x) for x in o.tokens) / (time.perf_counter() - t))
  out["sample"] = dict(new_tok_s=_stats(rates), batch=args.sample_batch)
  # (c) scoring
  conts = [p[-16:] for p in prompts]
  s.score(prompts[:args.sample_batch], conts[:args.sample_batch])
  rates = []
  for _ in range(args.repeats):
    t = time.perf_counter()
    s.score(prompts, conts)
    rates.append(sum(len(p) + len(c) for p, c in zip(prompts, conts)) /
                 (time.perf_counter() - t))
  out["score"] = dict(tok_s=_stats(rates))
  out["peak_rss_mb"] = _peak_rss_mb()
  import shutil
  shutil.rmtree(wd, ignore_errors=True)
  return out


def _torch_left_pad(seqs, pad_id):
  """Left-padded ids and attention mask (long tensors) for HF `generate` / forward."""
  import torch
  T = max(len(p) for p in seqs)
  ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
  att = torch.zeros((len(seqs), T), dtype=torch.long)
  for r, p in enumerate(seqs):
    ids[r, T - len(p):] = torch.tensor(p)
    att[r, T - len(p):] = 1
  return ids, att


def run_torch(args) -> dict:
  import torch
  from transformers import AutoConfig, AutoModelForCausalLM
  from catchjax.tokenizer import load_tokenizer
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  dt = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
  if args.random_init:
    m = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.model_dir),
                                         dtype=dt)
  else:
    m = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dt)
  m.to(dev)
  out = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
         "threads": torch.get_num_threads()}
  tok = load_tokenizer(args.model_dir)
  # (a) train
  opt = torch.optim.AdamW(m.parameters(), lr=1e-5)
  B, L = args.train_batch, args.train_len
  x = torch.randint(3, m.config.vocab_size, (B, L), device=dev)
  ts = []
  m.train()
  for i in range(args.train_steps + 1):
    t = time.perf_counter()
    loss = m(input_ids=x, labels=x).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if dev == "cuda":
      torch.cuda.synchronize()
    if i:
      ts.append(B * L / (time.perf_counter() - t))
  out["train"] = dict(tok_s=_stats(ts))
  m.eval()
  del opt
  # (b) generate at the best of a few batch sizes
  prompts = _prompts(tok, args.n_prompts)
  best = None
  for bs in args.hf_batches:
    rates = []
    for rep in range(max(1, args.repeats - 1)):
      t = time.perf_counter()
      n_new = 0
      for i in range(0, len(prompts), bs):
        ids, att = _torch_left_pad(prompts[i:i + bs], tok.pad_token_id)
        T = ids.shape[1]
        with torch.no_grad():
          g = m.generate(input_ids=ids.to(dev), attention_mask=att.to(dev), do_sample=True,
                         temperature=1.0, top_k=0, max_new_tokens=args.new_tokens,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        new = g[:, T:].cpu().numpy()
        for row in new:
          hit = np.nonzero(row == tok.eos_token_id)[0]
          n_new += (hit[0] + 1) if len(hit) else len(row)
      rates.append(n_new / (time.perf_counter() - t))
    st = _stats(rates)
    if best is None or st["median"] > best["new_tok_s"]["median"]:
      best = dict(new_tok_s=st, batch=bs)
  out["sample"] = best
  # (c) scoring: one forward over prompt + continuation
  rates = []
  for _ in range(args.repeats):
    t = time.perf_counter()
    n_tok = 0
    for i in range(0, len(prompts), 64):
      chunk = [p + p[-16:] for p in prompts[i:i + 64]]
      ids, att = _torch_left_pad(chunk, tok.pad_token_id)
      with torch.no_grad():
        lg = m(input_ids=ids.to(dev), attention_mask=att.to(dev)).logits
        torch.log_softmax(lg[:, -17:-1].float(), -1)
      n_tok += sum(len(p) for p in chunk)
    rates.append(n_tok / (time.perf_counter() - t))
  out["score"] = dict(tok_s=_stats(rates))
  out["peak_rss_mb"] = _peak_rss_mb()
  return out


def _fmt(d):
  return f"{d['median']:.0f} [{d['min']:.0f}, {d['max']:.0f}]"


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model_dir", default="artifacts/smollm2-135m-instruct")
  ap.add_argument("--random_init", action="store_true")
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--train_batch", type=int, default=8)
  ap.add_argument("--train_len", type=int, default=128)
  ap.add_argument("--train_steps", type=int, default=5)
  ap.add_argument("--n_prompts", type=int, default=256)
  ap.add_argument("--new_tokens", type=int, default=32)
  ap.add_argument("--sample_batch", type=int, default=128)
  ap.add_argument("--hf_batches", type=int, nargs="+", default=[32, 128])
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--only", choices=["jax", "torch"], default=None)
  ap.add_argument("--scan_unroll", type=int, default=-1,
                  help="layers per lax.scan iteration in the training / scoring pass (0: all, "
                       "-1: auto, 0 on CPU and 1 on GPU / TPU)")
  ap.add_argument("--smoke", action="store_true", help="seconds-long sizes (CI)")
  ap.add_argument("--cold_compile", action="store_true",
                  help="no persistent XLA cache (honest compile seconds)")
  ap.add_argument("--out", default="bench.json")
  args = ap.parse_args(argv)
  if args.smoke:
    args.train_steps, args.n_prompts, args.new_tokens = 1, 8, 4
    args.sample_batch, args.hf_batches, args.repeats = 8, [8], 1
  if args.only:
    res = run_jax(args) if args.only == "jax" else run_torch(args)
    print("BENCH_JSON " + json.dumps(res))
    return res
  results = {}
  for side in ("jax", "torch"):
    raw = list(argv if argv is not None else sys.argv[1:])
    fwd = []
    while raw:
      a = raw.pop(0)
      if a == "--out":
        raw.pop(0)
      elif not a.startswith("--out="):
        fwd.append(a)
    cmd = [sys.executable, "-m", "catchjax.bench", "--only", side] + fwd
    p = subprocess.run(cmd, capture_output=True, text=True)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("BENCH_JSON ")]
    if p.returncode or not line:
      raise RuntimeError(f"benchmark side {side} failed:\n{p.stderr[-3000:]}")
    results[side] = json.loads(line[-1][len("BENCH_JSON "):])
  j, t = results["jax"], results["torch"]
  ratios = dict(train=j["train"]["tok_s"]["median"] / t["train"]["tok_s"]["median"],
                sample=j["sample"]["new_tok_s"]["median"] / t["sample"]["new_tok_s"]["median"],
                score=j["score"]["tok_s"]["median"] / t["score"]["tok_s"]["median"])
  results["ratios"] = ratios
  results["args"] = vars(args)
  results["date"] = time.strftime("%Y-%m-%d %H:%M:%S")
  from catchjax.common import atomic_write_text, git_commit
  results["commit"] = git_commit()
  atomic_write_text(args.out, json.dumps(results, indent=2))
  print(f"device: catchjax {j['device']} ({j['backend']}), torch {t['device']}; "
        f"matmul peak {j['matmul_peak_flops'] / 1e9:.0f} GFLOP/s ({args.dtype})")
  print(f"{'':28s}{'catchjax':>26s}{'HF PyTorch':>26s}{'ratio':>8s}")
  print(f"{'train tok/s (8x128)':28s}{_fmt(j['train']['tok_s']):>26s}"
        f"{_fmt(t['train']['tok_s']):>26s}{ratios['train']:8.2f}")
  print(f"{'  MFU':28s}{_fmt({k: 100 * v for k, v in j['train']['mfu'].items() if k != 'n'} | {'n': 0}):>25s}%")
  print(f"{'sample new tok/s':28s}{_fmt(j['sample']['new_tok_s']):>26s}"
        f"{_fmt(t['sample']['new_tok_s']):>26s}{ratios['sample']:8.2f}")
  print(f"{'  batch':28s}{j['sample']['batch']:>26d}{t['sample']['batch']:>26d}")
  print(f"{'score tok/s':28s}{_fmt(j['score']['tok_s']):>26s}{_fmt(t['score']['tok_s']):>26s}"
        f"{ratios['score']:8.2f}")
  print(f"{'peak RSS MB':28s}{j['peak_rss_mb']:>26.0f}{t['peak_rss_mb']:>26.0f}")
  print(f"compile: train step {j['train']['compile_s']:.1f}s, sampler "
        f"{j['sample_compile_s']:.1f}s; JSON -> {args.out}")
  return results


if __name__ == "__main__":
  main()
