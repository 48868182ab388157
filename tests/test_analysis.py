"""The pre-registered primary analysis (catchjax/analysis.py) on synthetic headline rows."""
import numpy as np
import pytest
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests

from catchjax import analysis, report


def _row(fam, org, seed, arm, gap, beh="hate", n=16, catch_seed=None, **kw):
  """A headline row whose retained gap is `gap` (gap before 0.8, testing rate 0.1)."""
  return dict(experiment="headline", family=fam, behaviour=beh, n=n, arm=arm, seed=seed,
              organism=org, catch_seed=seed if catch_seed is None else catch_seed,
              deploy_rate_before=0.9, test_rate_before=0.1, test_rate=0.1,
              deploy_rate=0.1 + 0.8 * gap, deploy_n=100, n_train=n, commit="abc1234", **kw)


def _pairs_rows(diffs, control=0.5, **kw):
  """Rows from {(family, organism, seed): treatment - control retained gap}."""
  rows = []
  for (fam, org, seed), d in diffs.items():
    rows += [_row(fam, org, seed, "treatment", control + d, **kw),
             _row(fam, org, seed, "control", control, **kw)]
  return rows


def _primary(rows, meta=None, **spec):
  return analysis.primary(rows, meta or {}, dict(analysis.PRIMARY, **spec))


def test_symmetric_null_gives_p_one():
  # Each family: one organism's seeds at +x, another's at -x (an exact sign-symmetric null).
  diffs = {}
  for fam, x in (("token", 0.3), ("year", 0.1)):
    for s in range(3):
      diffs[(fam, "o1", s)], diffs[(fam, "o2", s)] = x, -x
  res = _primary(_pairs_rows(diffs))
  assert res["estimate"] == pytest.approx(0.0, abs=1e-12)
  assert res["p"] == 1.0 and res["exact"]
  assert (res["pairs"], res["clusters"], res["families"]) == (12, 4, 2)


def test_big_effect_gives_small_p_exact_and_monte_carlo():
  rng = np.random.default_rng(0)
  diffs = {(f, f"o{o}", s): -0.5 + 0.05 * rng.normal()
           for f in ("token", "year", "tier") for o in range(4) for s in range(2)}
  res = _primary(_pairs_rows(diffs))
  assert res["exact"] and res["clusters"] == 12
  assert res["p"] == pytest.approx(2 / 2 ** 12) and res["p"] == res["p_min"]
  assert res["estimate"] == pytest.approx(np.mean(list(diffs.values())))
  assert res["lo"] < res["estimate"] < res["hi"] < 0
  diffs = {(f, f"o{o}", 0): -0.5 for f in ("token", "year") for o in range(8)}   # k = 16
  mc = _primary(_pairs_rows(diffs), n_permutations=1000)
  assert not mc["exact"] and mc["draws"] == 1000
  assert mc["p"] == pytest.approx(1 / 1001)
  assert _primary(_pairs_rows(diffs), n_permutations=1000)["p"] == mc["p"]   # seeded


def test_exact_matches_scipy_permutation_test_without_clusters():
  rng = np.random.default_rng(3)
  d = rng.normal(0.2, 0.5, size=9)
  diffs = {("token", f"o{i}", 0): float(x) for i, x in enumerate(d)}  # one pair per organism
  res = _primary(_pairs_rows(diffs))
  a = np.array([0.5 + x for x in d])
  b = np.full_like(a, 0.5)
  ref = sps.permutation_test((a, b), lambda x, y, axis=-1: np.mean(x - y, axis=axis),
                             permutation_type="samples", n_resamples=np.inf,
                             alternative="two-sided", vectorized=True)
  assert res["exact"] and res["clusters"] == 9
  assert res["estimate"] == pytest.approx(ref.statistic)
  assert res["p"] == pytest.approx(ref.pvalue, abs=1e-12)


def test_cluster_flip_keeps_an_organisms_pairs_together():
  # Two organisms, ten seeds each, every pair at +1: per-pair flips would give p = 2 / 2^20;
  # one sign per organism gives 4 patterns, 2 of them as extreme: p = 0.5.
  diffs = {("token", org, s): 1.0 for org in ("o1", "o2") for s in range(10)}
  res = _primary(_pairs_rows(diffs))
  assert (res["pairs"], res["clusters"]) == (20, 2)
  assert res["p"] == 0.5 and res["p_min"] == 0.5
  assert res["lo"] == pytest.approx(res["hi"]) == 1.0   # two identical clusters: zero width
  assert analysis.cluster_bootstrap_ci(res["pair_list"][:10])[0] is None   # one cluster
  diffs[("year", "o1", 0)] = 1.0   # a second family, one organism: held fixed in the bootstrap
  ci = analysis.cluster_bootstrap_ci(_primary(_pairs_rows(diffs))["pair_list"])
  assert ci[0] is not None


def test_holm_matches_statsmodels():
  rng = np.random.default_rng(1)
  diffs = {}
  for fam, eff in (("token", -0.6), ("year", -0.05), ("tier", -0.3)):
    for o in range(6):
      diffs[(fam, f"o{o}", 0)] = eff + 0.2 * rng.normal()
  res = _primary(_pairs_rows(diffs))
  fams = analysis.per_family(res["pair_list"], analysis.PRIMARY)
  assert [f["family"] for f in fams] == ["tier", "token", "year"]
  raw = [f["p"] for f in fams]
  assert all(f["exact"] and f["clusters"] == 6 for f in fams)
  reject, adj, _, _ = multipletests(raw, alpha=0.05, method="holm")
  assert [f["p_holm"] for f in fams] == pytest.approx(list(adj))
  assert [f["reject"] for f in fams] == list(reject)


def test_families_without_a_backdoor_are_excluded():
  diffs = {("token", f"o{o}", 0): -0.4 for o in range(4)}
  diffs.update({("tier", f"o{o}", 0): 5.0 for o in range(4)})
  meta = dict(installed_gap={"hate": {"token": 0.9, "tier": 0.1}}, installed_gap_min=0.5)
  res = _primary(_pairs_rows(diffs), meta)
  assert res["excluded"] == [("tier", "hate")]
  assert res["family_names"] == ["token"] and res["pairs"] == 4
  assert res["estimate"] == pytest.approx(-0.4)
  md = analysis.primary_markdown(_pairs_rows(diffs), meta)
  assert "Excluded (no backdoor installed)**: tier (hate)" in md


def test_unpaired_and_other_n_rows_are_left_out():
  rows = _pairs_rows({("token", "o1", 0): -0.2, ("token", "o2", 0): -0.2})
  rows.append(_row("token", "o3", 0, "treatment", 0.1))              # no control
  rows.append(_row("token", "o1", 0, "treatment", 0.1, n=64))        # another N
  res = _primary(rows)
  assert res["pairs"] == 2 and res["unpaired"] == 1
  with pytest.raises(ValueError, match="two rows"):
    _primary(rows + [_row("token", "o1", 0, "control", 0.5)])


def test_markdown_states_the_primary_first_and_flags_a_changed_primary():
  rng = np.random.default_rng(2)
  diffs = {(f, f"o{o}", s): -0.3 + 0.1 * rng.normal()
           for f in ("token", "year") for o in range(3) for s in range(2)}
  h = analysis.primary_hash(analysis.PRIMARY)
  rows = _pairs_rows(diffs, primary_hash=h)
  md = analysis.primary_markdown(rows, {}, dict(primary=analysis.PRIMARY))
  i = [md.index(s) for s in ("## Primary analysis (pre-registered)", "**Outcome**: retained_gap",
                             "**Estimate**", "**p** =", "### Per-family tests",
                             "Exploratory:")]
  assert i == sorted(i)
  assert analysis.CHANGED not in md
  assert f"{h}, set at commit abc1234" in md
  other = dict(analysis.PRIMARY, n=64)
  md2 = analysis.primary_markdown(rows, {}, dict(primary=other))
  assert analysis.CHANGED in md2 and md2.index(analysis.CHANGED) < md2.index("**Estimate**")
  # A header that recorded another primary flags it too (first record wins in primary_meta).
  meta = analysis.primary_meta(rows, other)
  assert meta["primary_hash"] == analysis.primary_hash(other)
  assert analysis.primary_meta(rows, analysis.PRIMARY, meta)["primary_hash"] == meta["primary_hash"]
  plain = _pairs_rows(diffs)
  assert analysis.CHANGED in analysis.primary_markdown(plain, meta, dict(primary=analysis.PRIMARY))
  assert "unrecorded" in analysis.primary_markdown(plain, {})


def test_mixed_model_recovers_the_arm_effect_and_guards_failures():
  rng = np.random.default_rng(4)
  rows = []
  for o in range(6):
    u = 0.1 * rng.normal()
    for s in range(4):
      c = 0.05 * rng.normal()
      for f, base in (("token", 0.8), ("year", 0.6)):
        for arm, eff in (("treatment", -0.4), ("control", 0.0)):
          rows.append(_row(f, f"o{o}", s, arm, base + u + c + eff + 0.03 * rng.normal(),
                           catch_seed=s))
  mm = analysis.mixed_model(rows, {})
  assert "error" not in mm, mm
  assert mm["lo"] < -0.4 < mm["hi"] and mm["coef"] == pytest.approx(-0.4, abs=0.05)
  assert mm["organisms"] == 6 and not any("poorly" in n for n in mm["notes"])
  few = analysis.mixed_model([r for r in rows if r["organism"] in ("o0", "o1")], {})
  assert "error" in few or "poorly estimated" in few["notes"][0]
  flat = [dict(r, deploy_rate=0.5) for r in rows]   # no variance at all: a singular fit
  out = analysis.mixed_model(flat, {})
  assert "error" in out and out["error"].startswith("mixed model did not converge")
  assert "mixed model" in analysis.primary_markdown(rows, {})


def test_variance_components_recover_known_components():
  rng = np.random.default_rng(5)
  n_eval, v_catch, v_train = 400, 0.01, 0.0049
  ce, te = rng.normal(0, v_catch ** 0.5, 24), rng.normal(0, v_train ** 0.5, 24)
  rows = []
  for c in range(24):
    for t in range(24):
      for arm, eff in (("treatment", -0.1), ("control", 0.0)):
        p = float(np.clip(0.5 + eff + ce[c] + te[t], 0.01, 0.99))
        rows.append(dict(family="token", arm=arm, catch_seed=c, seed=t, deploy_n=n_eval,
                         deploy_rate=rng.binomial(n_eval, p) / n_eval))
  vc = analysis.variance_components(rows)
  assert "error" not in vc, vc
  assert 0.5 * v_catch < vc["catch_var"] < 2 * v_catch
  assert 0.5 * v_train < vc["train_var"] < 2 * v_train
  binom = np.mean([r["deploy_rate"] * (1 - r["deploy_rate"]) / n_eval for r in rows])
  assert vc["binomial_var"] == pytest.approx(binom)
  assert 0.7 * binom < vc["residual_var"] < 1.4 * binom   # the residual is the binomial here
  same = [dict(r, catch_seed=r["seed"]) for r in rows]   # each seed its own catch
  assert "confounded" in analysis.variance_components(same)["error"]
  with pytest.raises(ValueError):
    analysis.variance_components(rows + [dict(rows[0], family="year")])


def test_config_default_and_validation():
  import ml_collections
  from configs.common import base_config
  from catchjax.validate import ConfigError, check_primary
  c = base_config()
  assert analysis.primary_spec(c.report.primary) == analysis.primary_spec(None)
  check_primary("config.report.primary", c.report.primary)
  for field, bad in (("outcome", "nope"), ("arms", ("treatment",)), ("n", 0),
                     ("test", "t_test"), ("n_permutations", -1), ("seed", 1.5)):
    p = c.report.primary.to_dict()
    p[field] = bad
    with pytest.raises(ConfigError, match=f"config.report.primary.{field}"):
      check_primary("config.report.primary", ml_collections.ConfigDict(p))


def test_report_builds_with_and_without_primary_rows():
  diffs = {(f, f"o{o}", 0): -0.3 for f in ("token", "year") for o in range(2)}
  rows = _pairs_rows(diffs)
  assert analysis.report_section([r for r in rows if r["arm"] == "treatment"], {}) == ""
  assert analysis.report_section([], {}) == ""
  sec = analysis.report_section(rows, {})
  md = report.markdown(report.summarise(rows), {}, dict(title="t"), primary=sec)
  assert md.index("## Primary analysis") < md.index("Retained")
  broken = rows + [rows[0]]   # a duplicate cell: a note, not a crash
  assert "primary analysis failed" in analysis.report_section(broken, {})
