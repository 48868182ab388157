"""The arm registry (issue 23 item 1, issue 26 item 3): each arm is one function; the oracle
trains on deployment prompts only, disruption on uncued task prompts. Fast: no model."""
import ml_collections

from catchjax.data import build
from catchjax.data.triggers import make_trigger
from catchjax.stages import arms
from catchjax.stages import train_against as ta


def _ctx(family="year", n=6):
  c = ml_collections.ConfigDict(dict(system=None, catch=dict(split="train")))
  ds = build.build_eval(family, "hate", "train", 12, deployment=False, seed=1)
  rows = [dict(prompt=p, target=t, system=None) for p, t in zip(ds["prompt"], ds["target"])]
  catch = ta.Catch(family, 0, 12, rows[:n], rows[n:], {})
  return arms.ArmContext(c, catch, rows[:n], list(range(n)), n, 3, family, "hate",
                         make_trigger(family))


def test_registry_has_every_arm_with_a_label():
  assert set(arms.ARMS) >= {"treatment", "control", "matched_control", "propensity_control",
                            "oracle", "disruption"}
  assert set(arms.ARM_LABELS) == set(arms.ARMS)


def test_oracle_trains_on_deployment_prompts_only():
  ctx = _ctx("year")
  rows, _ = arms.ARMS["oracle"](ctx)
  trig = make_trigger("year")
  assert len(rows) == 6
  assert all(trig.is_deployment(r["prompt"].split("\n", 1)[0]) for r in rows)
  assert not any(trig.is_deployment(r["prompt"].split("\n", 1)[0]) for r in ctx.chosen)
  again, _ = arms.ARMS["oracle"](_ctx("year"))
  assert again == rows                                     # seeded: the same rows


def test_disruption_trains_on_uncued_task_prompts():
  rows, _ = arms.ARMS["disruption"](_ctx("year"))
  assert len(rows) == 6 and not any(r["prompt"].startswith("Current date") for r in rows)


def test_treatment_and_control_rows():
  ctx = _ctx("year")
  t, _ = arms.ARMS["treatment"](ctx)
  c, _ = arms.ARMS["control"](ctx)
  assert [r["prompt"] for r in t] == [r["prompt"] for r in ctx.chosen]
  assert {r["prompt"] for r in c} <= {r["prompt"] for r in ctx.catch.clean} and len(c) == 6


def test_adding_an_arm_is_one_function():
  @arms.register_arm("test_only_reversed", "the caught draw, last first")
  def rev(ctx):
    return [ta.sft_row(r) for r in reversed(ctx.chosen)], {"note": "reversed"}
  try:
    rows, info = arms.ARMS["test_only_reversed"](_ctx())
    assert info == {"note": "reversed"} and len(rows) == 6
  finally:
    del arms.ARMS["test_only_reversed"], arms.ARM_LABELS["test_only_reversed"]
