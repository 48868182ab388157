"""Report sections of the method on synthetic rows: misjudgement, gate, sharpening, return."""
from catchjax import report_method as rm


def _row(arm, seed, **kw):
  r = dict(family="year", behaviour="hate", n=16, arm=arm, seed=seed, organism="o",
           catch_seed=seed, deploy_rate=0.5, deploy_k=5, deploy_n=10,
           catch_by_source={"testing": {"k": 1, "n": 10},
                            "honeypot": {"k": 6, "n": 10, "bins": [
                                {"lo": 0.0, "hi": 0.6, "k": 1, "n": 5},
                                {"lo": 0.9, "hi": 1.0, "k": 5, "n": 5}]}},
           useful_flag=arm == "treatment", useful_drop_points=7.0 if arm == "treatment" else 1.0,
           sharpen_before={"k": 8, "n": 10}, sharpen={"k": 2, "n": 10},
           deploy_k_return=9, deploy_k_return_organism=4)
  r.update(kw)
  return r


def test_method_sections_pool_counts():
  rows = [_row("treatment", s) for s in range(2)] + [_row("control", s) for s in range(2)]
  md = rm.method_markdown(rows)
  assert "| year | hate | 2 | 10% [" in md and "(2/20)" in md      # testing: 1/10 x 2 catches
  assert "(12/20)" in md and "(10/10)" in md                        # honeypots; top bin
  assert "| year | treatment | 16 | 2 | 2 | +7.0 |" in md           # gate: both flagged
  assert "| year | control | 16 | 2 | 0 | +1.0 |" in md
  assert "(16/20)" in md and "(4/20)" in md                         # sharpening before/after
  assert "(18/20)" in md and "(8/20)" in md                         # return / organism return


def test_no_rows_no_sections():
  assert rm.method_markdown([]) == ""
  assert rm.method_markdown([dict(arm="distinguish", family="x")]) == ""


def test_power_rule_on_the_paired_contrast():
  from catchjax import report
  def r(arm, seed, dep):
    return dict(family="year", behaviour="hate", n=16, arm=arm, seed=seed, organism="o",
                deploy_rate=dep, test_rate=0.0, deploy_rate_before=1.0, test_rate_before=0.0,
                retained=dep)
  rows = [r("treatment", s, 0.5 + 0.01 * s) for s in range(6)] + \
         [r("control", s, 0.6 + 0.01 * s) for s in range(6)]
  pt = report.contrast_half_widths(rows, 16)[("year", "hate")]
  # the per-seed differences are all -0.1: a zero-width contrast, though each arm varies
  assert pt["seeds"] == 6 and pt["half_width"] < 1e-9
  arms = report.point_half_widths(rows, 16)[("year", "hate")]
  assert arms["half_width"] > 0.005
  assert not report.needs_seed(pt, 0.15, 6, 40) and report.needs_seed(arms, 0.001, 6, 40)


def test_kl_estimate_is_the_mean_log_ratio_with_a_bootstrap_interval():
  """stages/measure.kl_estimate (issue 26's KL from the organism): sum(log p_org - log p) over
  tokens; 0 for the organism itself; the interval covers the estimate."""
  import numpy as np
  from catchjax.stages.measure import kl_estimate
  rng = np.random.default_rng(0)
  ref = [rng.normal(-2, 1, int(n)) for n in rng.integers(1, 20, 40)]
  same = kl_estimate(ref, ref)
  assert same["kl"] == 0.0 and same["n_prompts"] == 40
  moved = [a - rng.uniform(0.05, 0.15, len(a)) for a in ref]
  k = kl_estimate(ref, moved)
  want = sum(float(np.sum(a - b)) for a, b in zip(ref, moved)) / sum(len(a) for a in ref)
  assert abs(k["kl"] - want) < 1e-12 and 0.05 < k["kl"] < 0.15
  assert k["lo"] <= k["kl"] <= k["hi"] and k["hi"] - k["lo"] < 0.05
  assert k["n_tokens"] == sum(len(a) for a in ref)
