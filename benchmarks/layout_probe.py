"""Train-step layout probe (session 5): a standalone SmolLM2-135M-shaped model, fp32, 8 x 128,
AdamW, to compare parameter layouts on XLA:CPU. Modes: stack_concat (the catchjax layout:
stacked [L, ...] weights, q/k/v and gate/up concatenated per step), stack_sep, stack_fused,
list_sep, list_fused (per-layer weights, fused storage). Add any second argument to print a
profiler breakdown by XLA op.

  PYTHONPATH=. python benchmarks/layout_probe.py list_fused [prof]
"""
import sys, time, numpy as np, jax, jax.numpy as jnp, optax
D, F, H, KV, hd, NL, V = 576, 1536, 9, 3, 64, 30, 49152
B, T = 8, 128
k = jax.random.PRNGKey(0)
def rnd(*s): 
  global k; k, sk = jax.random.split(k); return 0.02 * jax.random.normal(sk, s, jnp.float32)
mode = sys.argv[1]
def layer_params(stack):
  pre = (NL,) if stack else ()
  p = {"an": jnp.ones(pre + (D,)), "mn": jnp.ones(pre + (D,)), "wo": rnd(*pre, D, D), "wd": rnd(*pre, F, D)}
  if mode.endswith("fused"):
    p["wqkv"] = rnd(*pre, D, D + 2 * KV * hd); p["wgu"] = rnd(*pre, D, 2 * F)
  else:
    p.update(wq=rnd(*pre, D, D), wk=rnd(*pre, D, KV * hd), wv=rnd(*pre, D, KV * hd), wg=rnd(*pre, D, F), wu=rnd(*pre, D, F))
  return p
stacked = mode.startswith("stack")
params = {"embed": rnd(V, D), "fn": jnp.ones(D),
          "layers": layer_params(True) if stacked else [layer_params(False) for _ in range(NL)]}
def rms(x, w): return w * x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-5)
pos = jnp.arange(T)
inv = 1.0 / (10000 ** (jnp.arange(0, hd, 2) / hd)); f = pos[:, None] * inv; emb = jnp.concatenate([f, f], -1)
cos, sin = jnp.cos(emb)[:, None], jnp.sin(emb)[:, None]
def rope(x):
  h = hd // 2; return x * cos + jnp.concatenate([-x[..., h:], x[..., :h]], -1) * sin
bias = jnp.where(jnp.tril(jnp.ones((T, T), bool)), 0., -1e30)
def block(x, p):
  h = rms(x, p["an"])
  if "wqkv" in p:
    q, kk, v = jnp.split(h @ p["wqkv"], [D, D + KV * hd], -1)
  elif mode == "stack_concat":
    q, kk, v = jnp.split(h @ jnp.concatenate([p["wq"], p["wk"], p["wv"]], -1), [D, D + KV * hd], -1)
  else:
    q, kk, v = h @ p["wq"], h @ p["wk"], h @ p["wv"]
  q = rope(q.reshape(B, T, H, hd)).reshape(B, T, KV, H // KV, hd); kk = rope(kk.reshape(B, T, KV, hd)); v = v.reshape(B, T, KV, hd)
  s = jnp.einsum("btkgd,bskd->bkgts", q, kk) * hd ** -0.5 + bias
  o = jnp.einsum("bkgts,bskd->btkgd", jax.nn.softmax(s, -1), v).reshape(B, T, D)
  x = x + o @ p["wo"]
  h = rms(x, p["mn"])
  if "wgu" in p:
    gu = h @ p["wgu"]; g = jax.nn.silu(gu[..., :F]) * gu[..., F:]
  elif mode == "stack_concat":
    gu = h @ jnp.concatenate([p["wg"], p["wu"]], -1); g = jax.nn.silu(gu[..., :F]) * gu[..., F:]
  else:
    g = jax.nn.silu(h @ p["wg"]) * (h @ p["wu"])
  return x + g @ p["wd"]
def loss(params, ids):
  x = params["embed"][ids]
  if stacked:
    x, _ = jax.lax.scan(lambda x, p: (block(x, p), None), x, params["layers"], unroll=True)
  else:
    for p in params["layers"]: x = block(x, p)
  x = rms(x, params["fn"])[:, :-1]
  lg = x @ params["embed"].T
  return optax.softmax_cross_entropy_with_integer_labels(lg, ids[:, 1:]).mean()
tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-5))
opt = tx.init(params)
def step(params, opt, ids):
  l, g = jax.value_and_grad(loss)(params, ids)
  u, opt = tx.update(g, opt, params)
  return optax.apply_updates(params, u), opt, l
step = jax.jit(step, donate_argnums=(0, 1))
ids = jax.random.randint(k, (B, T), 3, V)
ts = []
for i in range(6):
  t = time.perf_counter(); params, opt, l = step(params, opt, ids); l.block_until_ready(); ts.append(time.perf_counter() - t)
print(mode, "tok/s", [round(B * T / x) for x in ts[1:]], "median", round(float(np.median([B * T / x for x in ts[1:]]))))
if len(sys.argv) > 2:
  import os, glob, gzip, json, collections, re
  d = "/tmp/prof3"; os.system(f"rm -rf {d}")
  o = jax.profiler.ProfileOptions(); o.python_tracer_level = 0; o.host_tracer_level = 2
  jax.profiler.start_trace(d, create_perfetto_trace=True, profiler_options=o)
  n = 3
  for i in range(n):
    params, opt, l = step(params, opt, ids); l.block_until_ready()
  jax.profiler.stop_trace()
  f = glob.glob(d + '/**/perfetto_trace.json.gz', recursive=True)[0]
  ev = json.load(gzip.open(f)); ev = ev['traceEvents'] if isinstance(ev, dict) else ev
  agg = collections.Counter(); cnt = collections.Counter()
  for e in ev:
    if e.get('ph') != 'X': continue
    kk = re.sub(r'[\.\d]+$', '', e['name']); agg[kk] += e['dur']; cnt[kk] += 1
  for kk, v in agg.most_common(30): print(f"{v/1e6/n:8.3f}s/step x{cnt[kk]//n:5d} {kk}")
