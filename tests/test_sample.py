"""Sampler: cached greedy decoding vs full forwards, batch/padding invariance, per-row seeds,
EOS masking, top-k/top-p, teacher-forced scores, and one real-model answer."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from catchjax.model import llama
from catchjax.model.config import ModelConfig
from catchjax.sample import Sampler, SamplingParams, fast_argmax, inverse_cdf_sample

V = 128
REF_LEN = 64
BUCKETS = (16, 32)


@pytest.fixture(scope="module")
def tiny():
  """A tiny random Llama whose weights are scaled up so that greedy outputs vary (at the
  default init std every row just repeats one token) and whose next-token distributions
  are not flat."""
  cfg = ModelConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=16, eos_token_id=2, pad_token_id=0)
  graphdef, state = nnx.split(llama.Llama(cfg, nnx.Rngs(0)))
  state = jax.tree.map(lambda x: x * 8.0 if x.ndim >= 2 else x, state)
  return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def sampler(tiny):
  return Sampler(tiny, batch_size=4, prompt_buckets=BUCKETS, eos_ids=[], progress=False)


@functools.partial(jax.jit, static_argnums=0)
def _full_logits(graphdef, state, tokens_1xL):
  L = tokens_1xL.shape[1]
  pos = jnp.arange(L)[None]
  mask = llama.make_mask(pos, pos, jnp.ones((1, L), bool))
  return llama.forward(graphdef, state, tokens_1xL, pos, mask)[0]


def ref_logits(model, seq):
  """Logits [len(seq), V] from one full forward without cache (right-padded: causal)."""
  graphdef, state = nnx.split(model)
  x = np.zeros((1, REF_LEN), np.int32)
  x[0, :len(seq)] = seq
  return np.asarray(_full_logits(graphdef, state, jnp.asarray(x)))[:len(seq)]


def ref_greedy(model, prompt, n):
  seq, out, lps = list(prompt), [], []
  for _ in range(n):
    lg = ref_logits(model, seq)[-1]
    t = int(np.argmax(lg))
    out.append(t)
    lps.append(float(jax.nn.log_softmax(lg)[t]))
    seq.append(t)
  return out, np.array(lps)


def make_prompts(seed=0):
  """Mixed lengths; the first four share a 9-token prefix (exercises the shared-prefix
  prefill), the others do not. With batch_size 4 the first batch shares the prefix."""
  rng = np.random.default_rng(seed)
  pre = list(rng.integers(3, V, size=9))
  shared = [pre + list(rng.integers(3, V, size=n)) for n in (3, 11, 1, 6)]
  own = [list(rng.integers(3, V, size=n)) for n in (4, 8, 2)]
  return shared + own


def test_greedy_matches_full_forward_argmax(tiny, sampler):
  prompts = make_prompts()
  out = sampler.generate(prompts, SamplingParams(max_new_tokens=9))
  assert out.num_prompt_tokens == [len(p) for p in prompts]
  distinct = set()
  for p, toks, lps in zip(prompts, out.tokens, out.logprobs):
    ref, ref_lp = ref_greedy(tiny, p, 9)
    assert toks == ref
    np.testing.assert_allclose(lps, ref_lp, atol=2e-4)   # raw model log-probs
    distinct.update(toks)
  assert len(distinct) > 10   # the tiny model does not just repeat one token


def test_shared_prefix_and_plain_paths_agree(tiny, sampler):
  prompts = [make_prompts(1)[i] for i in (0, 2, 3)]   # the shared-prefix ones of <= 16 tokens
  plain = Sampler(tiny, batch_size=4, prompt_buckets=BUCKETS, eos_ids=[], progress=False,
                  share_prefix=False)
  a = sampler.generate(prompts, SamplingParams(max_new_tokens=9))
  b = plain.generate(prompts, SamplingParams(max_new_tokens=9))
  assert a.tokens == b.tokens
  pre = lambda s: [k for k in s.compile_seconds if k[0] in ("prefill", "decode")]
  assert any(k[2] > 0 for k in pre(sampler))      # the prefix path ran
  assert pre(plain) and all(k[2] == 0 for k in pre(plain))


def test_prefill_in_row_groups_matches_reference_and_whole_batch(tiny):
  """prefill_rows: groups of rows prefilled at their own shorter suffix length and written
  into the batch's cache give the reference greedy tokens, and the same sampled tokens as one
  whole-batch prefill."""
  prompts = make_prompts(2) + [make_prompts(1)[0][:3]]        # mixed lengths, one very short
  kw = dict(batch_size=8, prompt_buckets=BUCKETS, eos_ids=[], progress=False)
  grouped = Sampler(tiny, prefill_rows=2, **kw)
  whole = Sampler(tiny, prefill_rows=0, **kw)
  g = grouped.generate(prompts, SamplingParams(max_new_tokens=6))
  for p, toks, lps in zip(prompts, g.tokens, g.logprobs):
    ref, ref_lp = ref_greedy(tiny, p, 6)
    assert toks == ref
    np.testing.assert_allclose(lps, ref_lp, atol=2e-4)
  keys = [k for k in grouped.compile_seconds if k[0] == "prefill_rows"]
  assert any(k[3] < k[4] for k in keys)          # some group ran shorter than the batch bucket
  assert not any(k[0] == "prefill_rows" for k in whole.compile_seconds)
  sp = SamplingParams(temperature=1.0, max_new_tokens=8)
  a, b = grouped.generate(prompts, sp, seeds=5), whole.generate(prompts, sp, seeds=5)
  assert a.tokens == b.tokens
  for x, y in zip(a.logprobs, b.logprobs):
    np.testing.assert_allclose(x, y, atol=2e-4)
  with pytest.raises(ValueError, match="must divide"):
    Sampler(tiny, prefill_rows=3, **kw)
  from catchjax.sample.layout import auto_prefill_rows
  assert [auto_prefill_rows(b) for b in (128, 100, 64, 32, 16, 8, 97)] == [32, 25, 32, 16, 0, 0, 0]


@pytest.mark.parametrize("chunk", [1, 3])
def test_compacting_done_rows_mid_decode_changes_no_token(tiny, chunk):
  """compact_rows: decoding stops every `chunk` steps and carries on with only the rows not
  yet done (to a multiple of compact_rows). Every row's tokens and log-probs equal those of
  the uncompacted decode, and the smaller batches really ran."""
  prompts = [make_prompts(s)[i] for s in range(3) for i in range(7)][:20]   # 20 rows -> 2 batches
  kw = dict(batch_size=16, prompt_buckets=BUCKETS, progress=False)
  sp = SamplingParams(temperature=1.0, max_new_tokens=14)
  free = Sampler(tiny, eos_ids=[], **kw).generate(prompts, sp, seeds=3)
  # EOS: the tokens most often sampled at steps 1-5, so rows end at many different steps.
  ids, counts = np.unique(np.asarray(free.token_array)[:, 1:6], return_counts=True)
  eos = [int(x) for x in ids[np.argsort(-counts)[:3]]]
  plain = Sampler(tiny, eos_ids=eos, compact_rows=0, **kw)
  comp = Sampler(tiny, eos_ids=eos, compact_rows=4, decode_chunk=chunk, **kw)
  a, b = plain.generate(prompts, sp, seeds=3), comp.generate(prompts, sp, seeds=3)
  assert 0 < sum(a.finished) < len(prompts)
  assert a.tokens == b.tokens and a.finished == b.finished
  np.testing.assert_array_equal(a.token_array, b.token_array)
  for x, y in zip(a.logprobs, b.logprobs):
    np.testing.assert_allclose(x, y, atol=2e-4)
  sizes = {k[1] for k in comp.compile_seconds if k[0] == "decode"}
  assert 16 in sizes and min(sizes) < 16                     # compacted batches ran
  assert any(k[0] == "compact" for k in comp.compile_seconds)
  assert {k[1] for k in plain.compile_seconds if k[0] == "decode"} == {16}
  g = comp.generate(prompts, SamplingParams(max_new_tokens=14))     # greedy too
  assert g.tokens == plain.generate(prompts, SamplingParams(max_new_tokens=14)).tokens
  assert Sampler(tiny, **kw).compact_rows == 0                      # opt-in
  with pytest.raises(ValueError, match="compact_rows"):
    Sampler(tiny, compact_rows=-1, **kw)


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.0, max_new_tokens=10),
    SamplingParams(temperature=1.0, max_new_tokens=10),
    SamplingParams(temperature=0.8, top_k=5, top_p=0.9, max_new_tokens=10),
])
def test_row_alone_equals_row_in_mixed_batch(sampler, params):
  prompts = make_prompts(2)
  seeds = [11, 22, 33, 44, 55, 66, 77]
  batch = sampler.generate(prompts, params, seeds=seeds)
  for i in (0, 3, 5):
    alone = sampler.generate([prompts[i]], params, seeds=[seeds[i]])
    assert alone.tokens[0] == batch.tokens[i]
    np.testing.assert_allclose(alone.logprobs[0], batch.logprobs[i], atol=2e-4)
  if not params.greedy:
    greedy = sampler.generate(prompts, SamplingParams(max_new_tokens=10))
    assert batch.tokens != greedy.tokens                     # sampling is not argmax
    other = sampler.generate(prompts, params, seeds=[s + 1 for s in seeds])
    assert other.tokens != batch.tokens                      # the seed matters


def test_eos_stops_row_and_masks_the_rest(tiny):
  prompts = make_prompts(4)[:3]
  free = Sampler(tiny, batch_size=4, prompt_buckets=BUCKETS, eos_ids=[], progress=False)
  ref = free.generate(prompts, SamplingParams(max_new_tokens=12)).tokens
  # Choose as EOS a token that row 0 emits at step k but not before, and row 1 never emits:
  # so decoding goes on after row 0 has finished.
  k = next(j for j in range(2, 8) if ref[0][j] not in ref[0][:j] + ref[1])
  eos = ref[0][k]
  s = Sampler(tiny, batch_size=4, prompt_buckets=BUCKETS, eos_ids=[eos], pad_id=1,
              progress=False)
  out = s.generate(prompts, SamplingParams(max_new_tokens=12))
  assert out.tokens[0] == ref[0][:k + 1]
  assert out.finished[0] and len(out.logprobs[0]) == k + 1
  for r in range(1, 3):   # the other rows run on until their own EOS or the limit
    cut = ref[r].index(eos) + 1 if eos in ref[r] else 12
    assert out.tokens[r] == ref[r][:cut]
    assert out.finished[r] == (eos in ref[r])
  # Device-side masking: the decoded array holds nothing but pad after the EOS.
  assert out.token_array.shape == (3, 12)
  assert list(out.token_array[0, :k + 1]) == ref[0][:k + 1]
  assert np.all(out.token_array[0, k + 1:] == 1)


def test_all_rows_done_exits_early(tiny):
  """If every row has hit EOS the while_loop stops before max_new_tokens."""
  prompts = make_prompts(4)[:2]
  free = Sampler(tiny, batch_size=4, prompt_buckets=BUCKETS, eos_ids=[], progress=False)
  ref = free.generate(prompts, SamplingParams(max_new_tokens=9)).tokens
  s = Sampler(tiny, batch_size=4, prompt_buckets=BUCKETS, eos_ids=[ref[0][0], ref[1][0]],
              progress=False)
  out = s.generate(prompts, SamplingParams(max_new_tokens=16))
  assert out.tokens == [ref[0][:1], ref[1][:1]]
  assert s.last_decode_steps == [1]        # the while_loop ran no decode step
  free.generate(prompts, SamplingParams(max_new_tokens=16))
  assert free.last_decode_steps == [16]


def test_top_k_1_and_tiny_top_p_equal_greedy(sampler):
  prompts = make_prompts(5)[:4]
  greedy = sampler.generate(prompts, SamplingParams(max_new_tokens=10)).tokens
  k1 = sampler.generate(prompts, SamplingParams(temperature=1.0, top_k=1, max_new_tokens=10),
                        seeds=7).tokens
  p0 = sampler.generate(prompts, SamplingParams(temperature=1.0, top_p=1e-6, max_new_tokens=10),
                        seeds=7).tokens
  hot = sampler.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=10),
                         seeds=7).tokens
  assert k1 == greedy and p0 == greedy and hot != greedy


def test_top_k_and_top_p_restrict_support(tiny, sampler):
  """Every sampled token is inside the top-k set / nucleus of the reference distribution."""
  prompts = make_prompts(6)[:4]   # one batch, shared prefix
  for params in (SamplingParams(temperature=1.0, top_k=3, max_new_tokens=10),
                 SamplingParams(temperature=1.0, top_p=0.6, max_new_tokens=10)):
    out = sampler.generate(prompts, params, seeds=3)
    n_non_greedy = 0
    for p, toks in zip(prompts, out.tokens):
      seq = list(p)
      all_lg = ref_logits(tiny, seq + toks)
      for j, t in enumerate(toks):
        lg = all_lg[len(p) - 1 + j]
        order = np.argsort(-lg)
        if params.top_k:
          allowed = set(order[:params.top_k].tolist())
        else:
          pr = np.exp(lg - lg.max()) / np.exp(lg - lg.max()).sum()
          before = np.cumsum(pr[order]) - pr[order]
          allowed = set(order[before < params.top_p + 1e-5].tolist())
        assert t in allowed
        n_non_greedy += t != order[0]
    assert n_non_greedy > 0


def _rank_bins(p):
  order = np.argsort(-p)
  edges = [0, 1, 2, 3, 6, 12, len(p)]
  return [order[a:b] for a, b in zip(edges[:-1], edges[1:])]


def _chi2(first_tokens, probs, bins):
  counts = np.bincount(first_tokens, minlength=len(probs))
  n = len(first_tokens)
  obs = np.array([counts[b].sum() for b in bins])
  exp = np.array([probs[b].sum() * n for b in bins])
  return float(((obs - exp) ** 2 / exp).sum())


def test_sampling_follows_tempered_softmax(tiny, sampler):
  """First-token frequencies over many seeds match softmax(logits / T) (chi-square over rank
  bins, 5 dof), and are far from the softmax at the other temperature (the test has power)."""
  prompt = make_prompts(7)[0]
  lg = ref_logits(tiny, prompt)[-1]
  n = 512
  probs = {t: np.asarray(jax.nn.softmax(lg / t), np.float64) for t in (1.0, 0.5)}
  bins = _rank_bins(probs[1.0])
  for temp, other in ((1.0, 0.5), (0.5, 1.0)):
    out = sampler.generate([prompt] * n, SamplingParams(temperature=temp, max_new_tokens=9),
                           seeds=list(range(n)))
    first = np.array([t[0] for t in out.tokens])
    assert _chi2(first, probs[temp], bins) < 30, temp
    assert _chi2(first, probs[other], bins) > 60, temp


def test_inverse_cdf_sample_is_exact_on_edges():
  x = jnp.array([[0.0, -jnp.inf, 0.0, -jnp.inf] + [-jnp.inf] * 300,
                 [-jnp.inf] * 303 + [3.0]])
  for u in (0.0, 0.49, 0.51, 0.999999):
    got = np.asarray(inverse_cdf_sample(x, jnp.array([u, u])))
    assert got[0] == (0 if u < 0.5 else 2) and got[1] == 303


def test_fast_argmax_matches_argmax():
  x = jax.random.normal(jax.random.key(0), (5, 1000))
  x = x.at[1, 10].set(9.0).at[1, 20].set(9.0)      # tie -> first index, like jnp.argmax
  np.testing.assert_array_equal(fast_argmax(x), jnp.argmax(x, -1))


def test_score_matches_full_forward(tiny, sampler):
  prompts = make_prompts(8)
  rng = np.random.default_rng(0)
  conts = [list(rng.integers(0, V, size=n)) for n in (1, 5, 3, 7, 2, 0, 6)]
  scores = sampler.score(prompts, conts)
  for p, c, sc in zip(prompts, conts, scores):
    lg = ref_logits(tiny, p + c)
    lp = np.asarray(jax.nn.log_softmax(lg, axis=-1))
    want = np.array([lp[len(p) - 1 + j, t] for j, t in enumerate(c)])
    assert sc.shape == (len(c),)
    np.testing.assert_allclose(sc, want, atol=2e-4)
  np.testing.assert_allclose(sampler.score_sum(prompts, conts),
                             [s.sum() for s in scores], rtol=1e-6)
  assert any(k[0] == "score" and k[2] > 0 for k in sampler.compile_seconds)  # prefix path ran


def test_next_token_logprobs(tiny, sampler):
  prompts = make_prompts(9)
  cand = [5, 17, 99]
  got = sampler.next_token_logprobs(prompts, cand)
  assert got.shape == (len(prompts), 3)
  for i, p in enumerate(prompts):
    lp = np.asarray(jax.nn.log_softmax(ref_logits(tiny, p)[-1]))
    np.testing.assert_allclose(got[i], lp[cand], atol=2e-4)


def test_mesh_batch_sharding_gives_same_tokens(tiny, sampler):
  mesh = jax.make_mesh((1,), ("data",))
  s = Sampler(tiny, batch_size=4, prompt_buckets=BUCKETS, eos_ids=[], progress=False,
              mesh=mesh)
  prompts = make_prompts(10)[:3]
  assert (s.generate(prompts, SamplingParams(max_new_tokens=10)).tokens
          == sampler.generate(prompts, SamplingParams(max_new_tokens=10)).tokens)


def test_bad_inputs(sampler):
  with pytest.raises(ValueError, match="empty"):
    sampler.generate([[]])
  with pytest.raises(ValueError, match="bucket"):
    sampler.generate([[3] * 40])
  with pytest.raises(ValueError, match="outside"):
    sampler.generate([[V + 1]])
  with pytest.raises(ValueError):
    SamplingParams(top_p=0.0)


@pytest.mark.real_model
def test_smollm2_greedy_answers_paris(smollm2):
  from catchjax.tokenizer import prompt_ids
  model, tok = smollm2
  s = Sampler(model, batch_size=1, tokenizer=tok, progress=False)
  out = s.generate([prompt_ids(tok, "What is the capital of France?")],
                   SamplingParams(max_new_tokens=16))
  assert "Paris" in out.text[0], out.text[0]
  assert out.finished[0] and out.tokens[0][-1] == 2
  assert np.all(out.logprobs[0] <= 0) and out.logprobs[0].mean() > -1.0
