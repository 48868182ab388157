"""The dose-response (issue 27 item 5, catchjax/dose.py) on synthetic rows. Fast: no model."""
import math

from catchjax import dose, report


def _rows(xs: dict, ys: dict, organisms=(0, 1, 2)):
  rows = []
  for fam, x in xs.items():
    censored = x is None
    rows.append(dict(arm="distinguish", family=fam, behaviour="hate", seed=0,
                     probe_examples_to_80_base=x, probe_examples_to_80_base_censored=censored,
                     probe_examples_to_80_base_bound=256))
    for o in organisms:
      for s in (0, 1):
        g = ys[fam] + 0.01 * (o - s)   # retained gap = (d - t) / (d0 - t0)
        rows.append(dict(arm="treatment", family=fam, behaviour="hate", n=16, seed=s,
                         organism=f"org{o}", deploy_rate_before=1.0, test_rate_before=0.0,
                         deploy_rate=g, test_rate=0.0))
  return rows


def test_dose_response_ranks_and_clusters_by_family():
  xs = {"token": 4, "tier": 16, "year": 64, "collusion": None}   # collusion: censored > 256
  ys = {"token": 0.1, "tier": 0.5, "year": 0.8, "collusion": 0.95}
  rows = _rows(xs, ys)
  fx = dose.family_x(rows, "probe_examples_to_80_base")
  assert fx[("collusion", "hate")] == dict(x=512.0, censored=True, seeds=1)
  pts = dose.dose_points(rows)
  assert len(pts) == 24 and {p["family"] for p in pts} == set(xs)
  d = dose.dose_response(pts, n_boot=500, seed=0)
  assert d["families"] == 4 and d["runs"] == 24 and d["descriptive"]
  assert d["rho"] > 0.8 and d["slope"] > 0
  lo, hi = d["slope_ci"]
  assert lo <= d["slope"] <= hi and lo > 0          # every family draw keeps the trend
  assert d["degenerate_draws"] > 0                  # some draws hold one family only
  # A flat response: the slope's interval covers 0.
  flat = dose.dose_response(dose.dose_points(_rows(xs, dict.fromkeys(xs, 0.5))), 500, 0)
  assert flat["slope_ci"][0] <= 0 <= flat["slope_ci"][1]


def test_dose_leaves_out_families_without_a_backdoor_and_runs_without_x():
  xs = {"token": 4, "tier": 16, "year": 64}
  rows = _rows(xs, {"token": 0.1, "tier": 0.5, "year": 0.8})
  rows = [r for r in rows if not (r["arm"] == "distinguish" and r["family"] == "year")]
  pts = dose.dose_points(rows, excluded={("tier", "hate")})
  assert {p["family"] for p in pts} == {"token"}
  one = dose.dose_response(pts, n_boot=50)
  assert math.isnan(one["rho"]) and math.isnan(one["slope_ci"][0])
  md = dose.dose_markdown(rows)
  assert "Dose-response" in md and "descriptive" in md and "| token/hate | 4 |" in md
  assert dose.dose_markdown([r for r in rows if r["arm"] != "distinguish"]) == ""


def test_borrowed_distinguish_rows_fill_only_what_is_missing():
  rows = _rows({"token": 4}, {"token": 0.1})
  other = _rows({"token": 8, "year": 64}, {"token": 0.1, "year": 0.8})
  got = report.borrowed_distinguish_rows(rows, [other])
  assert [(r["family"], r["probe_examples_to_80_base"]) for r in got] == [("year", 64)]
