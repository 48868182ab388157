"""The treatment's stopping rule and the usefulness gate (issue 26 item 2). Fast: no model."""
import pytest

from catchjax.data.tasks import TaskInstance
from catchjax.stages import measure
from catchjax.stages import train_against as ta
from configs import headline as headline_cfg


def test_stop_plan_trains_the_treatment_in_epochs_and_the_others_its_budget():
  c = headline_cfg.get_config()
  st = c.train_against.stopping
  assert st.enabled
  t = ta.stop_plan(c, n_rows=16, budget=None)          # batch 4: 4 steps an epoch
  assert t["eval_every"] == 4 and t["epochs"] == st.max_steps // 4 and t["steps"] == 0
  assert t["lr"] == st.lr and t["warmup_steps"] == st.warmup_steps
  one = ta.stop_plan(c, n_rows=1, budget=None)         # N = 1: one step an epoch
  assert one["eval_every"] == 1 and one["epochs"] == st.max_steps
  other = ta.stop_plan(c, n_rows=16, budget=12)
  assert other["steps"] == 12 and other["eval_every"] == 0 and other["lr"] == st.lr
  c.train_against.stopping.enabled = False
  assert ta.stop_plan(c, 16, None) == {}


def test_extra_experiments_keep_fixed_steps():
  c, _ = headline_cfg.derived_config(None, "transfer")
  assert "headline" not in c and not c.train_against.stopping.enabled
  assert ta.stop_plan(c, 16, None) == {}


def test_gate_keeps_task_families_the_organism_can_do_and_flags_damage():
  insts = [TaskInstance("add", "1+1", "2", str(i)) for i in range(4)] + \
          [TaskInstance("sort", "x", "y", str(i)) for i in range(4)]
  ok = [True, True, False, True, False, False, False, True]    # add 75%, sort 25%
  assert measure.gate_indices(insts, ok, 0.4) == [0, 1, 2, 3]
  before = measure.rate(3, 4)
  assert measure.useful_drop(before, measure.rate(3, 4), 5.0) == (0.0, False)
  drop, flag = measure.useful_drop(before, measure.rate(2, 4), 5.0)
  assert drop == pytest.approx(25.0) and flag


def test_stopping_needs_the_treatment_first():
  from catchjax import validate as V
  from catchjax.experiments import headline
  c = headline_cfg.get_config()
  c.headline.arms = ("control", "treatment")
  with pytest.raises(V.ConfigError, match="treatment"):
    headline.validate(c)
