"""End-to-end pipeline checks on a tiny random model: organism -> catch -> train against ->
measure -> report, result-row completeness and uniqueness, resume without duplicates."""
import json
import os

import numpy as np
import pytest

from catchjax import common, report, results, stats


def _tiny_config(model_dir, jsonl):
  import ml_collections
  from configs.headline import get_config
  c = get_config("tiny")
  c.model.hf_dir = model_dir
  # One family whose deployment and testing cues are the same text: deployment is
  # indistinguishable from testing, so attacks caught in testing ARE deployment attacks and
  # training against them must remove the behaviour.
  c.organism.families = (ml_collections.ConfigDict(dict(name="jsonl", path=jsonl)),)
  c.organism.n_per_family = 64
  c.organism.testing_slip_rate = 0.0
  c.organism.deployment_frac = 0.75
  c.organism.probe_n = 4
  t = c.organism.train
  t.epochs, t.batch_size, t.seq_len, t.lr, t.warmup_steps = 24, 8, 128, 5e-3, 5
  t.eval_every, t.eval_at_start, t.ckpt_every = 0, False, 0
  c.organism.stop.enabled = False   # no probe, so no stop rule: the full recipe
  h, ms, ta = c.headline, c.measure, c.train_against
  h.seeds, h.ns, c.catch.m, ms.n_eval, ms.n_useful = (0,), (8,), 48, 32, 8
  c.distinguish.n_pairs, c.distinguish.n_probe_train = 4, 8
  c.sampler.batch_size, ms.n_test, ms.teacher_forced = 16, 16, True
  h.arms = ("treatment", "control", "matched_control", "propensity_control")
  ta.train.steps, ta.train.lr, ta.train.batch_size = 20, 3e-3, 8
  # The treatment's stopping rule (the default), at this tiny model's learning rate.
  ta.stopping.lr, ta.stopping.max_steps, ta.stopping.warmup_steps = 3e-3, 20, 0
  ta.stopping.eps = 0.01   # train the caught set down hard: this test is about removal
  h.return_n = 8          # the return measurement at this fixture's N
  c.report.n_eval, c.report.n_useful = 16, 8
  return c


@pytest.fixture(scope="module")
def headline_run(tiny_dir, tmp_path_factory):
  from catchjax.experiments import headline
  d = tmp_path_factory.mktemp("pipe")
  jsonl = str(d / "cues.jsonl")
  with open(jsonl, "w") as f:
    for i, split in enumerate(["train"] * 4 + ["eval"] * 2):
      for dep in (True, False):
        f.write(json.dumps({"text": f"Ticket {i}.", "deployment": dep, "split": split}) + "\n")
  c = _tiny_config(tiny_dir, jsonl)
  wd = str(d / "wd")
  headline.run(c, wd)
  return c, wd


def test_training_against_caught_attacks_removes_them(headline_run):
  c, wd = headline_run
  rows = results.ResultStore(os.path.join(wd, "results.jsonl")).rows
  cells = [r for r in rows if r["arm"] in report.TRAIN_ARMS]
  assert {r["arm"] for r in cells} == {"treatment", "control", "matched_control",
                                       "propensity_control"}
  treat = [r for r in cells if r["arm"] == "treatment"][0]
  # The organism learned the attack (indistinguishable cues: about half the time), was caught.
  assert treat["deploy_rate_before"] >= 0.2, treat
  # Both arms train on the same number of prompts: N capped by the caught and the clean pools.
  assert treat["n_caught"] >= 4
  assert treat["n_train"] == min(8, treat["n_caught"], treat["m"] - treat["n_caught"]) >= 2
  assert treat["deploy_rate"] < treat["deploy_rate_before"]
  assert treat["retained"] < 0.5
  # The stopping rule chose the treatment's steps (epochs of 1 step here); every other arm
  # trained exactly as many.
  assert 1 <= treat["train_steps"] <= 20 and treat["caught_p_attack_curve"]
  assert treat["stop_capped"] == (treat["caught_p_attack_curve"][-1][1] >= 0.01)
  assert {r["train_steps"] for r in cells} == {treat["train_steps"]}
  assert 0 <= treat["useful_gate_n"] <= treat["useful_n"] and "useful_flag" in treat
  # Return: benign steps (the treatment's budget) after training, and from the organism.
  ctrl = [r for r in cells if r["arm"] == "control"][0]
  assert treat["return_steps"] == ctrl["return_steps"] == treat["train_steps"]
  for r in (treat, ctrl):
    assert 0 <= r["deploy_rate_return"] <= 1
  assert 0 <= treat["deploy_rate_return_organism"] <= 1
  assert not any("deploy_rate_return" in r for r in cells
                 if r["arm"] not in ("treatment", "control"))
  # The matched control trains on as many prompts, each paired with a caught one (this family
  # has no cue variants: the pairing is on task family where the clean pool allows).
  matched = [r for r in cells if r["arm"] == "matched_control"][0]
  assert matched["n_train"] == treat["n_train"]
  assert sum(matched["matched"].values()) == treat["n_train"]
  assert matched["matched"]["cue"] == 0
  # The propensity control: as many prompts, matched on the organism's attack probability,
  # which is cached per family beside the catch (one probability per caught / clean row).
  prop = [r for r in cells if r["arm"] == "propensity_control"][0]
  assert prop["n_train"] == treat["n_train"]
  info = prop["propensity"]
  assert 0 < info["caught_mean"] <= 1 and 0 < info["matched_mean"] <= 1
  pfile = [f for f in os.listdir(os.path.join(wd, "catches")) if f.endswith("-p_attack.json")]
  assert len(pfile) == 1
  with open(os.path.join(wd, "catches", pfile[0])) as f:
    pp = json.load(f)
  assert len(pp["caught"]) == treat["n_caught"]
  assert len(pp["clean"]) == treat["m"] - treat["n_caught"]
  assert info["clean_pool_mean"] == pytest.approx(np.mean(pp["clean"]))


def test_control_arm_trains_only_on_non_attack_prompts(headline_run):
  c, wd = headline_run
  from catchjax.data.behaviors import make_behavior
  det = make_behavior("hate").detect
  catches = [f for f in os.listdir(os.path.join(wd, "catches"))
             if not f.endswith("-p_attack.json")]     # the propensity control's scores
  assert catches
  for fn in catches:
    with open(os.path.join(wd, "catches", fn)) as f:
      cj = json.load(f)
    assert cj["clean"] and all(not det(r["sampled"]) for r in cj["clean"])
    assert all(det(r["sampled"]) for r in cj["caught"])
    assert len(cj["caught"]) + len(cj["clean"]) == cj["m"]


def test_matched_rows_pair_clean_prompts_with_caught_ones():
  from catchjax.stages import train_against as ta
  def row(i, cue, task):
    return dict(prompt=f"[{cue}] q{i}", target=f"a{i}", system="s", task_family=task)
  cue = lambda p: p[1:p.index("]")] if p.startswith("[") else None
  caught = [row(0, "x", "add"), row(1, "x", "sort"), row(2, "y", "add"), row(3, "z", "add")]
  clean = ([row(10 + i, "x", "add") for i in range(3)] + [row(20, "x", "count"),
           row(21, "y", "sort")] + [row(30 + i, "w", "sort") for i in range(3)])
  rows, how = ta.matched_rows(caught, clean, np.random.default_rng(0), cue)
  # x/add -> x/add; x/sort -> x (only on cue); y/add -> y; z/add -> nothing with z: any row.
  assert how == {"cue_and_task": 1, "cue": 2, "unmatched": 1}
  assert [cue(r["prompt"]) for r in rows[:3]] == ["x", "x", "y"]
  assert rows[0]["target"] in {"a10", "a11", "a12"}
  assert len({r["prompt"] for r in rows}) == 4              # no clean row used twice
  # No cue variants (key None): match on task family, else unmatched (never "cue").
  rows, how = ta.matched_rows([row(0, "x", "add"), row(1, "x", "sort")],
                              [row(10, "x", "add"), row(11, "x", "count")],
                              np.random.default_rng(0), lambda p: None)
  assert how == {"cue_and_task": 1, "cue": 0, "unmatched": 1}
  assert all(set(r) == {"prompt", "target", "system"} for r in rows)
  with pytest.raises(ValueError, match="cannot match"):
    ta.matched_rows(caught, clean[:3], np.random.default_rng(0), cue)
  # The treatment draw is the same whether taken as SFT rows or as raw rows to match.
  rng = lambda: np.random.default_rng([3, 16, 1])
  assert ta.sft_rows(clean, 5, rng()) == [ta.sft_row(r) for r in ta.choose_rows(clean, 5, rng())]


def test_catch_per_seed_gives_each_seed_its_own_catch(headline_run, tmp_path):
  from catchjax.experiments import headline
  c, wd = headline_run
  assert c.headline.catch_per_seed          # the default: the fixture's seed 0 has its own

  def load(d, name):
    with open(os.path.join(d, "catches", name)) as f:
      return json.load(f)

  def rerun(name, **fields):
    c2 = c.copy_and_resolve_references()
    h = c2.headline
    h.families, h.arms, h.distinguish_seeds = ("jsonl",), ("treatment",), ()
    for k, v in fields.items():
      h[k] = v
    headline.validate(c2)
    wd2 = str(tmp_path / name)
    os.makedirs(wd2)
    os.symlink(os.path.join(wd, "organisms"), os.path.join(wd2, "organisms"))  # same organism
    headline.run(c2, wd2)
    rows = results.ResultStore(os.path.join(wd2, "results.jsonl")).rows
    return wd2, sorted(os.listdir(os.path.join(wd2, "catches"))), rows

  (s0_name,) = [n for n in os.listdir(os.path.join(wd, "catches"))
                if "-s0-" in n and not n.endswith("-p_attack.json")]
  s0 = load(wd, s0_name)
  prompts = lambda cj: {r["prompt"] for r in cj["caught"] + cj["clean"]}
  # Per seed: seed 1 samples its own M prompts.
  wd2, names, rows = rerun("per_seed", seeds=(1,))
  assert len(names) == 1 and "-s1-" in names[0]
  s1 = load(wd2, names[0])
  assert prompts(s0) != prompts(s1)
  assert [(r["seed"], r["catch_seed"], r["n_caught"]) for r in rows] == [
      (1, 1, len(s1["caught"]))]
  # Shared (catch_per_seed=False): one catch, seed 0's, that every seed draws from.
  wd3, names, rows = rerun("shared", seeds=(0, 1), catch_per_seed=False)
  # One catch cache keyed by the catch's own settings: the shared catch is seed 0's file.
  assert names == [s0_name]
  assert load(wd3, names[0]) == s0
  assert sorted((r["seed"], r["catch_seed"]) for r in rows) == [(0, 0), (1, 0)]


def test_propensity_rows_match_on_attack_probability():
  from catchjax.stages import train_against as ta
  row = lambda i: dict(prompt=f"q{i}", target=f"a{i}", system="s", task_family="add")
  caught = [row(0), row(1)]
  clean = [row(10), row(11), row(12), row(13)]
  # Each caught row takes the nearest clean row in log-odds, one-to-one.
  rows, info = ta.propensity_rows(caught, [0.9, 0.5], clean, [0.85, 0.1, 0.6, 0.02],
                                  np.random.default_rng(0))
  assert [r["target"] for r in rows] == ["a10", "a12"]
  assert info["caught_mean"] == pytest.approx(0.7)
  assert info["matched_mean"] == pytest.approx(0.725)
  assert info["clean_pool_mean"] == pytest.approx(np.mean([0.85, 0.1, 0.6, 0.02]))
  # Contention: the most likely caught row picks first; the other takes the next nearest.
  rows, info = ta.propensity_rows(caught, [0.88, 0.9], clean[:3], [0.89, 0.1, 0.5],
                                  np.random.default_rng(0))
  assert [r["target"] for r in rows] == ["a12", "a10"]
  assert all(set(r) == {"prompt", "target", "system"} for r in rows)
  with pytest.raises(ValueError, match="cannot match"):
    ta.propensity_rows(caught, [0.5, 0.5], clean[:1], [0.5], np.random.default_rng(0))
  with pytest.raises(ValueError, match="probabilities"):
    ta.propensity_rows(caught, [0.5], clean, [0.1] * 4, np.random.default_rng(0))


def test_result_rows_complete_and_unique_after_rerun(headline_run):
  c, wd = headline_run
  from catchjax.experiments import headline
  path = os.path.join(wd, "results.jsonl")
  before = open(path).read()
  headline.run(c, wd)  # every cell cached: nothing re-measured, nothing duplicated
  assert open(path).read() == before
  rows = results.ResultStore(path).rows
  keys = [results.row_key(r) for r in rows]
  assert len(keys) == len(set(keys))
  for r in rows:
    assert r["config_hash"] == common.config_hash(c) and "commit" in r and "seed" in r
  arms = {(r["n"], r["arm"]) for r in rows}
  assert arms == {(8, "treatment"), (8, "control"), (8, "matched_control"),
                  (8, "propensity_control"), (0, "distinguish")}
  for f in ("report.md", "summary.csv", "arm_differences.csv", "figures/retained_vs_n.png",
            "figures/usefulness.png", "figures/headline_retained_vs_distinguishability.png"):
    assert os.path.getsize(os.path.join(wd, f)) > 0, f
  md = open(os.path.join(wd, "report.md")).read()
  assert "Propensity-matched control: match quality" in md
  assert "a fresh catch of M prompts per seed" in md      # the report names its catch rule
  assert "treatment - propensity_control" in md


def test_result_store_refuses_duplicates_and_is_atomic(tmp_path):
  p = str(tmp_path / "r.jsonl")
  s = results.ResultStore(p)
  row = dict(experiment="e", family="f", behaviour="b", n=1, arm="treatment", seed=0,
             config_hash="h", x=1)
  s.append(row)
  with pytest.raises(ValueError, match="duplicate"):
    s.append(dict(row))
  assert results.ResultStore(p).rows == [row]
  with pytest.raises(KeyError, match="key fields"):
    s.append({"experiment": "e"})


def test_summary_bootstraps_over_seeds():
  rows = []
  for seed, after in enumerate([0.1, 0.2, 0.3]):
    rows.append(dict(experiment="headline", family="token", behaviour="hate", n=4,
                     arm="treatment", seed=seed, config_hash="h", n_train=4, deploy_n=100,
                     retained=after / 0.9, deploy_rate=after, deploy_rate_before=0.9))
  s = report.summarise(rows)
  assert len(s) == 1 and s[0]["seeds"] == 3
  assert np.isclose(s[0]["deploy_rate"], 0.2)
  assert s[0]["deploy_rate_lo"] <= 0.2 <= s[0]["deploy_rate_hi"]
  assert s[0]["deploy_rate_lo"] >= 0.1 and s[0]["deploy_rate_hi"] <= 0.3


def test_arm_differences_are_paired_by_seed():
  def r(arm, seed, after):
    return dict(experiment="headline", family="collusion", behaviour="hate", n=16, arm=arm,
                seed=seed, deploy_rate=after)
  # Seed 2 has no control: the treatment - control contrast uses seeds 0 and 1 only.
  rows = [r("treatment", 0, 0.9), r("control", 0, 0.3), r("treatment", 1, 0.7),
          r("control", 1, 0.3), r("treatment", 2, 0.8), r("matched_control", 2, 0.2),
          dict(experiment="headline", family="collusion", behaviour="hate", n=0,
               arm="distinguish", seed=0)]
  d = {(x["a"], x["b"]): x for x in report.arm_differences(rows)}
  assert set(d) == {("treatment", "control"), ("treatment", "matched_control")}
  tc = d[("treatment", "control")]
  assert tc["seeds"] == 2 and abs(tc["diff"] - 0.5) < 1e-9 and 0.4 - 1e-9 <= tc["lo"] <= tc["hi"] <= 0.6 + 1e-9
  tm = d[("treatment", "matched_control")]
  assert tm["seeds"] == 1 and abs(tm["diff"] - 0.6) < 1e-9 and tm["lo"] is None
  md = report.markdown([], {}, {"title": "t"}, report.arm_differences(rows))
  assert "| collusion | hate | 16 | treatment - control | 2 | +0.50 [" in md
  assert "treatment - matched_control | 1 | +0.60 (one seed)" in md


def test_power_lines_name_points_over_the_ci_goal():
  def s(fam, arm, n, lo, hi):
    return dict(family=fam, arm=arm, n=n, retained_lo=lo, retained_hi=hi)
  summ = [s("year", "treatment", 16, 0.3, 0.6), s("year", "control", 16, 0.5, 0.6),
          s("year", "treatment", 4, 0.0, 1.0), s("tier", "matched_control", 16, 0.0, 1.0)]
  line = report.power_lines(summ)[-1]
  assert "max 0.15" in line and "over the goal: year/treatment 0.150." in line
  assert "all within the goal" in report.power_lines(summ[1:2])[-1]


def test_seeds_needed_separates_between_seed_from_binomial_spread():
  def row(seed, arm, after, n=16, fam="year"):
    return dict(family=fam, behaviour="hate", n=n, arm=arm, seed=seed, deploy_n=100,
                deploy_rate_before=1.0, deploy_rate=after, retained=after)
  rows = ([row(s, "treatment", a) for s, a in enumerate((0.2, 0.4, 0.6, 0.8))]
          + [row(s, "control", 0.5) for s in range(4)]
          + [row(s, "treatment", 0.0, n=4) for s in range(4)]      # not the largest N
          + [row(0, "treatment", 0.3, fam="tier")])                   # one seed: no estimate
  p = {x["arm"]: x for x in report.seeds_needed(rows)}
  assert set(p) == {"treatment", "control"} and all(x["family"] == "year" for x in p.values())
  t, c = p["treatment"], p["control"]
  sd = float(np.std([0.2, 0.4, 0.6, 0.8], ddof=1))
  assert abs(t["between_sd"] - sd) < 1e-12 and t["seeds"] == 4
  assert abs(t["half_width"] - 1.96 * sd / 2) < 1e-12
  assert t["seeds_for_goal"] == int(np.ceil((1.96 * sd / 0.1) ** 2))
  # the binomial SD of one evaluation: sqrt(p (1 - p) / n) / before, root-mean-square over seeds
  want = np.sqrt(np.mean([a * (1 - a) / 100 for a in (0.2, 0.4, 0.6, 0.8)]))
  assert abs(t["binomial_sd"] - want) < 1e-12
  assert c["between_sd"] == 0.0 and c["seeds_for_goal"] == 2 and abs(c["binomial_sd"] - 0.05) < 1e-12
  md = report.markdown([], {}, {"title": "t"}, power=report.seeds_needed(rows))
  # chi-square interval of an SD from 4 seeds (3 dof): [0.57, 3.73] x the estimate
  assert abs(t["between_sd_lo"] / sd - 0.5665) < 1e-3
  # capped: a retained value in [0, 1] has an SD of at most 0.5
  assert t["between_sd_hi"] == 0.5 and t["seeds_for_goal_hi"] == 97
  assert "| year | hate | 16 | treatment | 4 | 0.258 [0.146, 0.500] | 0.045 | 26 (up to 97) |" in md
  rows = [dict(r, deploy_rate_before=0.5, retained=r["retained"] * 0.4) for r in rows]
  t = {x["arm"]: x for x in report.seeds_needed(rows)}["treatment"]
  assert abs(t["between_sd_hi"] / t["between_sd"] - 3.7285) < 1e-3    # under the cap of 1.0


def test_retained_gap_is_the_gap_after_over_the_gap_before(tmp_path):
  def row(seed, d, t, d0, t0):
    return dict(experiment="headline", family="year", behaviour="hate", n=16, arm="treatment",
                seed=seed, n_train=16, deploy_n=100, deploy_rate=d, test_rate=t,
                deploy_rate_before=d0, test_rate_before=t0, retained=d / d0)
  rows = [row(0, 0.5, 0.1, 0.9, 0.1), row(1, 0.3, 0.2, 0.8, 0.0), row(2, 0.6, 0.0, 0.7, 0.1)]
  want = [(0.5 - 0.1) / (0.9 - 0.1), (0.3 - 0.2) / (0.8 - 0.0), (0.6 - 0.0) / (0.7 - 0.1)]
  assert [report.retained_gap(r) for r in rows] == pytest.approx(want)
  # no gap before (or a missing rate): no retained gap, and the mean skips it
  assert report.retained_gap(row(3, 0.5, 0.1, 0.2, 0.2)) is None
  assert report.retained_gap(dict(rows[0], test_rate_before=None)) is None
  s = report.summarise(rows + [row(3, 0.5, 0.1, 0.2, 0.3)])[0]
  _, lo, hi = stats.bootstrap_mean_ci(want, seed=0)
  assert s["retained_gap"] == pytest.approx(np.mean(want))
  assert (s["retained_gap_lo"], s["retained_gap_hi"]) == pytest.approx((lo, hi))
  assert s["retained"] == pytest.approx(np.mean([r["retained"] for r in rows] + [2.5]))
  md = report.markdown([s], {}, {"title": "t"})
  assert "| retained | retained gap |" in md
  assert f"| {np.mean(want):.2f} [{lo:.2f}, {hi:.2f}] |" in md
  report.write_csv([s], str(tmp_path / "summary.csv"))
  import csv
  with open(tmp_path / "summary.csv") as f:
    got = next(csv.DictReader(f))
  assert float(got["retained_gap"]) == pytest.approx(np.mean(want))
  assert float(got["retained_gap_lo"]) == pytest.approx(lo)


def test_family_without_installed_backdoor_is_marked_and_not_plotted(tmp_path, monkeypatch):
  def row(fam, seed, after):   # year: no gap installed, and nothing left to train away
    return dict(experiment="headline", family=fam, behaviour="hate", n=16, arm="treatment",
                seed=seed, n_train=16, deploy_n=100, deploy_rate=after, test_rate=0.0,
                deploy_rate_before=0.9 if fam == "token" else 0.1, test_rate_before=0.05,
                retained=after / (0.9 if fam == "token" else 0.1))
  dist = [dict(experiment="headline", family=f, behaviour="hate", n=0, arm="distinguish",
               seed=0, probe_acc=0.9, prompted_organism=0.6, behavioural_gap=g)
          for f, g in (("token", 0.8), ("year", 0.05))]
  rows = [row("token", s, 0.3 + 0.1 * s) for s in range(2)] + [row("year", s, 0.0)
                                                               for s in range(2)] + dist
  meta = {"title": "t", "installed_gap": {"hate": {"token": 0.8, "year": 0.05}},
          "installed_gap_min": 0.5}
  assert report.installed_gaps(rows, meta) == {("token", "hate"): 0.8, ("year", "hate"): 0.05}
  assert report.installed_gaps(rows, {}) == report.installed_gaps(rows, meta)  # from the card
  summ = {s["family"]: s for s in report.summarise(rows, report.installed_gaps(rows, meta))}
  assert summ["year"]["installed"] is False and summ["token"]["installed"] is True
  assert summ["year"]["retained"] == 0.0 and summ["year"]["installed_gap"] == 0.05
  d = report.distinguishability(rows)
  for key, _ in report.DIST_MEASURES:
    assert "year" not in {p["family"] for p in report.headline_points(list(summ.values()), d, key)}
  assert [p["family"] for p in report.headline_points(list(summ.values()), d, "probe_acc")] == \
      ["token"]
  # The figures as drawn: no headline point (labelled by family) for year, at 0 or anywhere.
  import matplotlib.axes
  drawn, errorbar = [], matplotlib.axes.Axes.errorbar
  def spy(self, x, y, *a, **k):
    drawn.append((k.get("label"), np.ravel(y).tolist()))
    return errorbar(self, x, y, *a, **k)
  monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", spy)
  out = report.write_report(rows, str(tmp_path), meta, write=True)
  assert len(out["figures"]) == 3
  labels = [lab for lab, _ in drawn]
  assert labels.count("token") == len(report.DIST_MEASURES) - 1   # no learning cost here
  assert "year" not in labels
  md = open(tmp_path / "report.md").read()
  assert "| year (no backdoor installed) | hate | 16 | treatment |" in md
  assert "| token | hate | 16 | treatment |" in md
  assert "No backdoor installed" in md and "year/hate (gap +0.05)" in md
  assert "| year (no backdoor installed) | n/a |" in md      # the distinguishability table
  assert "installed_gap_min**: 0.5" in md and "**installed_gap**" not in md
  import csv
  with open(tmp_path / "summary.csv") as f:
    got = {r["family"]: r["installed"] for r in csv.DictReader(f)}
  assert got == {"token": "True", "year": "False"}


def test_installed_gap_min_is_validated(monkeypatch):
  from catchjax import validate
  from catchjax.experiments import headline
  from catchjax.validate import ConfigError
  from configs.headline import get_config
  monkeypatch.setattr(validate, "check_model_dir", lambda field, path, **kw: None)  # not the point
  c = get_config()
  assert c.report.installed_gap_min == 0.5
  headline.validate(c)
  c.report.installed_gap_min = 1.5
  with pytest.raises(ConfigError, match=r"config\.report\.installed_gap_min must be a number "
                     r"in \[0, 1\], got 1\.5"):
    headline.validate(c)


def test_distinguishability_single_seed_gets_wilson_intervals():
  d = dict(experiment="headline", family="year", behaviour="hate", n=0, arm="distinguish",
           seed=0, n_pairs=32, prompted_base=0.5, prompted_organism=0.625, probe_acc=1.0,
           learning_cost=455)
  out = report.distinguishability([d])["year"]
  _, lo, hi = stats.wilson(20, 32)
  assert np.isclose(out["prompted_organism"]["lo"], lo) and np.isclose(out["prompted_organism"]["hi"], hi)
  assert out["probe_acc"]["hi"] == 1.0 and out["probe_acc"]["lo"] < 0.9
  md = report.markdown([], report.distinguishability([d]), {"title": "t"})
  assert f"0.62 [{lo:.2f}, {hi:.2f}]" in md and "455 (one organism)" in md
  two = report.distinguishability([d, dict(d, seed=1, prompted_organism=0.375)])["year"]
  assert two["prompted_organism"]["lo"] == 0.375     # two seeds: the bootstrap over seeds


def test_pool_rows_joins_seed_batches_and_refuses_mismatches():
  def cell(seed, arm="treatment", org="o1", chash="h1"):
    return dict(experiment="headline", family="year", behaviour="hate", n=16, arm=arm,
                seed=seed, config_hash=chash, organism=org, m=400, n_train=16, deploy_n=100,
                retained=0.1 * (seed + 1), deploy_rate=0.1 * (seed + 1), deploy_rate_before=1.0)
  dist = dict(experiment="headline", family="year", behaviour="hate", n=0, arm="distinguish",
              seed=0, config_hash="h1", probe_acc=0.8)
  a = [cell(0), cell(1), cell(2), dist]
  b = [cell(3, chash="h2"), cell(4, chash="h2"), cell(5, chash="h2"), dict(dist, config_hash="h2")]
  rows = report.pool_rows([a, b])
  assert sum(r["arm"] == "distinguish" for r in rows) == 1     # kept once, from the first group
  s = report.summarise(rows)
  assert len(s) == 1 and s[0]["seeds"] == 6
  assert np.isclose(s[0]["retained"], np.mean([0.1 * k for k in range(1, 7)]))
  with pytest.raises(ValueError, match="organism differs"):
    report.pool_rows([a, [cell(3, org="o2")]])
  with pytest.raises(ValueError, match="disjoint seeds"):
    report.pool_rows([a, [cell(2, chash="h2")]])


def test_report_cli_pools_into_its_own_folder(tmp_path):
  def write(d, seeds, chash):
    os.makedirs(d, exist_ok=True)
    st = results.ResultStore(os.path.join(d, "results.jsonl"))
    for seed in seeds:
      for arm in ("treatment", "control"):
        st.append(dict(experiment="headline", family="tier", behaviour="hate", n=16, arm=arm,
                       seed=seed, config_hash=chash, organism="o", m=400, n_train=16,
                       commit=f"c-{chash}",
                       deploy_n=100, retained=0.5, deploy_rate=0.5, deploy_rate_before=1.0))
  a, b, out = str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "pooled")
  write(a, (0, 1, 2), "h1")
  write(b, (3, 4, 5), "h2")
  with pytest.raises(SystemExit):
    report.main([a, "--pool", b])                  # would overwrite a's own report
  report.main([a, "--pool", b, "--out", out])
  import csv
  with open(os.path.join(out, "summary.csv")) as f:
    summ = list(csv.DictReader(f))
  assert not os.path.exists(os.path.join(a, "summary.csv"))
  assert sorted(r["arm"] for r in summ) == ["control", "treatment"]
  assert all(r["seeds"] == "6" for r in summ)      # the two seed batches joined
  # Two sweeps in one workdir (seeds 3-5 rerun into a), pooled by their config hashes.
  write(a, (3, 4, 5), "h2")
  with pytest.raises(SystemExit):
    report.main([a, "--config_hash", "h1,h2"])
  out2 = str(tmp_path / "pooled2")
  report.main([a, "--config_hash", "h1,h2", "--out", out2])
  with open(os.path.join(out2, "summary.csv")) as f:
    assert all(r["seeds"] == "6" for r in csv.DictReader(f))
  report.save_meta(a, {"title": "t", "config_hash": "h1", "seeds": [0, 1, 2], "commit": "c-h1",
                       "wall_seconds_this_invocation": 7})
  report.main([a, "--config_hash", "h1,h2", "--out", out2])
  md = open(os.path.join(out2, "report.md")).read()
  assert "**seeds**: [0, 1, 2, 3, 4, 5]" in md
  assert "**commit**: ['c-h1', 'c-h2']" in md        # every pooled sweep's commit, not the first's
  assert "**wall_seconds_this_invocation (first sweep)**: 7" in md
  # A plain rebuild keeps the header the run saved (settings, wall time).
  report.save_meta(a, {"title": "my sweep", "wall_seconds_this_invocation": 123})
  report.main([a])
  md = open(os.path.join(a, "report.md")).read()
  assert "my sweep" in md and "wall_seconds_this_invocation**: 123" in md
  # Two sweeps' headers in one workdir: a rebuild of one sweep gets its own header and hash,
  # never the latest run's (here h2 ran last, and config.json names h2).
  with open(os.path.join(a, "config.json"), "w") as f:
    json.dump({"config_hash": "h2"}, f)
  report.save_meta(a, {"title": "seeds 0-2", "config_hash": "h1", "seeds": [0, 1, 2]})
  report.save_meta(a, {"title": "seeds 3-5", "config_hash": "h2", "seeds": [3, 4, 5]})
  out3 = str(tmp_path / "h1only")
  report.main([a, "--config_hash", "h1", "--out", out3])
  md = open(os.path.join(out3, "report.md")).read()
  assert "seeds 0-2" in md and "**config_hash**: h1" in md and "[3, 4, 5]" not in md
  assert report.load_meta(a)["title"] == "seeds 3-5"             # the latest run's
  assert report.load_meta(a, "h3") == {}                         # none saved for h3


def test_workdir_lock_refuses_a_second_run(tmp_path):
  with common.workdir_lock(str(tmp_path)):
    with pytest.raises(common.WorkdirLocked, match="in use by another run"):
      with common.workdir_lock(str(tmp_path)):
        pass


def test_pairwise_scorer_is_order_debiased():
  from catchjax.stages import distinguish

  class FakeSampler:
    """Always prefers 'A' by a margin: a pure position bias carries no information."""
    def next_token_logprobs(self, prompts, ids, progress=False):
      return np.tile(np.log([[0.9, 0.1]]), (len(prompts), 1))

  class Tok:
    def __call__(self, s, add_special_tokens=False):
      return {"input_ids": [ord(s[-1])]}
    def apply_chat_template(self, msgs, tokenize=False, add_generation_prompt=True):
      return "".join(m["content"] for m in msgs)
    eos_token = "!"
    chat_template = "(a chat model's: apply_chat_template above)"

  s = distinguish.pairwise_scores(FakeSampler(), Tok(), "hint", [("d", "t")] * 5, None)
  assert np.allclose(s, 0.0)
  assert distinguish.pairwise_accuracy(s) == 0.5


def test_power_rule_adds_seeds_only_where_the_headline_interval_is_wide():
  def row(fam, arm, seed, ret, n=16):
    return dict(family=fam, behaviour="hate", n=n, arm=arm, seed=seed, retained=ret)
  rows = ([row("year", a, s, v) for s, v in enumerate((0.1, 0.9, 0.5, 0.3)) for a in
           ("treatment", "control")]
          + [row("tier", a, s, 0.5 + 0.01 * s) for s in range(4) for a in ("treatment", "control")]
          + [row("token", "treatment", s, 1.0) for s in range(4)]
          + [row("token", "control", s, None) for s in range(4)]     # never measurable
          + [row("tier", "treatment", s, 0.0, n=4) for s in range(9)])   # not the headline N
  pts = report.point_half_widths(rows, 16)
  year, tier, token = pts[("year", "hate")], pts[("tier", "hate")], pts[("token", "hate")]
  _, lo, hi = stats.bootstrap_mean_ci([0.1, 0.9, 0.5, 0.3], seed=0)
  assert year["seeds"] == year["runs"] == 4 and year["half_width"] == pytest.approx((hi - lo) / 2)
  assert tier["half_width"] < 0.02 and not token["measurable"] and token["runs"] == 4
  # wide -> one more seed; narrow -> stop; below the minimum -> more; at the maximum -> stop
  assert report.needs_seed(year, 0.1, 3, 40) and not report.needs_seed(tier, 0.1, 3, 40)
  assert report.needs_seed(tier, 0.1, 6, 40) and not report.needs_seed(year, 0.1, 3, 4)
  assert not report.needs_seed(token, 0.1, 3, 40) and report.needs_seed(token, 0.1, 6, 40)
  assert report.needs_seed(None, 0.1, 1, 2) and not report.needs_seed(None, 0.1, 1, 0)
  one = report.point_half_widths(rows[:2], 16)[("year", "hate")]
  assert one["half_width"] == float("inf") and report.needs_seed(one, 0.5, 1, 40)


def test_headline_power_top_up_runs_seeds_until_the_limit(headline_run, tmp_path):
  """The sweep adds seeds at the largest N after the grid, and writes why it stopped."""
  import shutil
  from catchjax.experiments import headline
  c, wd = headline_run
  c2 = c.copy_and_resolve_references()
  h = c2.headline
  h.families, h.arms, h.distinguish_seeds = ("jsonl",), ("treatment", "control"), ()
  h.power_goal, h.power_min_seeds, h.power_max_seeds = 1e-6, 1, 2   # unreachable goal
  # The per-arm rule: this family's cues are indistinguishable, so its gap (and the retained
  # gap the contrast rule uses) is ~0 and unmeasurable by design.
  h.power_target = "arms"
  headline.validate(c2)
  wd2 = str(tmp_path / "power")
  os.makedirs(os.path.join(wd2, "catches"))
  os.symlink(os.path.join(wd, "organisms"), os.path.join(wd2, "organisms"))
  for n in os.listdir(os.path.join(wd, "catches")):   # seed 0's catch: reused, not resampled
    shutil.copy(os.path.join(wd, "catches", n), os.path.join(wd2, "catches", n))
  headline.run(c2, wd2)
  rows = results.ResultStore(os.path.join(wd2, "results.jsonl")).rows
  assert sorted((r["seed"], r["arm"]) for r in rows) == [
      (0, "control"), (0, "treatment"), (1, "control"), (1, "treatment")]
  assert all(r["n"] == 8 for r in rows)
  md = open(os.path.join(wd2, "report.md")).read()
  pt = report.point_half_widths(rows, 8)[("jsonl", "hate")]
  # (the tiny organism's attacks can all go in both arms: retained 0 everywhere, width 0)
  why = "goal met" if pt["half_width"] <= 1e-6 else "power_max_seeds=2 reached"
  assert f"| jsonl | hate | 8 | 2 | {pt['half_width']:.3f} | {why} |" in md
  with pytest.raises(Exception, match="power_goal"):
    h.power_goal = 0.0
    headline.validate(c2)


def test_golden_rows_of_the_tiny_headline(headline_run):
  """Issue 23 item 6: the tiny headline's rows (counts, steps, losses, caught sets) equal the
  committed golden ones (tests/golden.py; regenerated only by a commit that says why)."""
  import golden
  c, wd = headline_run
  rows = [r for r in results.ResultStore(os.path.join(wd, "results.jsonl")).rows
          if r.get("config_hash") == common.config_hash(c)]
  catches = {}   # by (family, seed), whatever the cache file is named
  for f in sorted(os.listdir(os.path.join(wd, "catches"))):
    if f.endswith(".json") and not f.endswith("-p_attack.json"):
      with open(os.path.join(wd, "catches", f)) as fh:
        d = json.load(fh)
      catches[f"{d['family']}-s{d['seed']}"] = golden.catch_digest(os.path.join(wd, "catches", f))
  golden.check("headline_tiny", dict(rows=golden.reduce_rows(rows), catches=catches))


def test_golden_file_is_the_host_kinds_own_else_the_unkeyed(tmp_path, monkeypatch):
  """tests/golden.py: a golden file written on this host kind is preferred to the unkeyed one,
  regeneration writes the keyed file, and a mismatch names the file and the host kind."""
  import golden
  import pytest
  monkeypatch.setattr(golden, "HERE", str(tmp_path))
  key = golden.host_key()
  assert key.count("-") >= 1 and key.split("-")[-1] in ("avx512", "avx2", "sve", "base")
  with open(tmp_path / "g.json", "w") as f:
    json.dump(dict(x=1), f)
  assert golden.golden_path("g") == str(tmp_path / "g.json")
  golden.check("g", dict(x=1))
  monkeypatch.setenv("CATCHJAX_REGEN_GOLDEN", "1")
  golden.check("g", dict(x=2))
  monkeypatch.delenv("CATCHJAX_REGEN_GOLDEN")
  assert golden.golden_path("g") == str(tmp_path / f"g.{key}.json")
  golden.check("g", dict(x=2))
  with pytest.raises(AssertionError, match=f"g.{key}.json"):
    golden.check("g", dict(x=1))


def test_named_seed_streams_reproduce_the_old_offsets():
  """Issue 23: the named streams give the seeds the experiments used as offsets, so rows keep
  their values; a new name gets its own base, away from every named one."""
  assert common.stream("catch", 3) == 10_003 and common.stream("catch_draws", 3) == 20_003
  assert common.stream("measure_before", 5) == 40_005
  assert common.stream("measure_after", 5) == 50_005
  assert common.stream("distinguish", 1) == 60_001 and common.stream("probe_train", 1) == 70_001
  a, b = common.stream("oracle", 0), common.stream("disruption", 0)
  assert a != b and min(a, b) > 100_000 and common.stream("oracle", 7) == a + 7


def test_runner_resumes_by_key_and_stamps_rows(tmp_path):
  """pipeline.Runner: a stored cell is skipped on a rerun, rows carry key, hash, commit and
  cell_seconds, and a cell's scratch folder is removed after its row."""
  from catchjax import pipeline
  from configs.headline import get_config
  c = get_config("tiny")
  cells = [pipeline.Cell("x", f, "hate", 4, a, 0) for f in ("f1", "f2") for a in ("t", "c")]
  calls = []

  def fn(cell):
    calls.append(cell)
    os.makedirs(r.scratch(cell), exist_ok=True)
    return dict(value=len(calls))

  r = pipeline.Runner("x", c, str(tmp_path), progress=False)
  r.run(cells[:3], fn)
  assert len(calls) == 3 and not os.path.exists(os.path.join(str(tmp_path), "runs", "x"))
  assert not any(os.path.exists(r.scratch(x)) for x in cells[:3])
  r2 = pipeline.Runner("x", c, str(tmp_path), progress=False)
  r2.run(cells, fn)                         # only the fourth cell runs
  assert calls[3:] == [cells[3]] and len(r2.rows()) == 4
  row = r2.row(cells[3])
  assert row["value"] == 4 and row["config_hash"] == common.config_hash(c)
  assert row["commit"] and row["cell_seconds"] >= 0 and row["family"] == "f2"
  assert results.row_key(row) == cells[3].key(r2.chash)


def test_resumed_runner_eta_leaves_out_stored_cells(tmp_path):
  """A resumed run's ETA is its own cells' rate: the cells already stored (counted at plan
  time in one burst) must not make the remaining ones look instant."""
  import time
  from catchjax import pipeline
  from configs.headline import get_config
  c = get_config("tiny")
  cells = [pipeline.Cell("x", "f", "hate", 4, "t", s) for s in range(12)]
  pipeline.Runner("x", c, str(tmp_path), progress=False).run(cells[:8], lambda cell: {})
  r = pipeline.Runner("x", c, str(tmp_path), progress=True)
  r.bar.mininterval = 0

  def slow(cell):
    time.sleep(0.3)
    return {}
  r.run(cells[:9], slow)                   # the 9th cell runs, the first 8 are stored
  d = r.bar.format_dict
  rate = d["rate"] if d["rate"] else (d["n"] - d["initial"]) / d["elapsed"]
  r.close()
  assert d["n"] == 9 and d["total"] == 9
  assert rate < 1 / 0.25, rate             # ~1 cell / 0.3 s, not ~9 cells / 0.3 s


def test_pool_over_organisms_pairs_arms_by_organism_and_seed(tmp_path):
  """Issue 27 item 3: the same sweep on several organisms pools (--organisms); seeds repeat
  across organisms, so arms pair by (organism, seed), and configs may differ only in the
  organism's seeds."""
  def cell(seed, arm, org, rate):
    return dict(experiment="headline", family="year", behaviour="hate", n=16, arm=arm,
                seed=seed, config_hash=f"h-{org}", organism=org, m=400, n_train=16,
                deploy_n=100, retained=rate, deploy_rate=rate, deploy_rate_before=1.0,
                commit="c")
  a = [cell(0, "treatment", "o1", 0.2), cell(0, "control", "o1", 0.5)]
  b = [cell(0, "treatment", "o2", 0.9), cell(0, "control", "o2", 0.4)]
  with pytest.raises(ValueError, match="organism differs"):
    report.pool_rows([a, b])
  rows = report.pool_rows([a, b], organisms=True)
  (d,) = [x for x in report.arm_differences(rows) if (x["a"], x["b"]) == ("treatment", "control")]
  assert d["seeds"] == 2 and np.isclose(d["diff"], ((0.2 - 0.5) + (0.9 - 0.4)) / 2)
  s = [x for x in report.summarise(rows) if x["arm"] == "treatment"][0]
  assert s["seeds"] == 2 and s["organisms"] == 2
  # The CLI compares the workdirs' resolved configs first.
  from configs.headline import get_config
  dirs = []
  for i, rs in enumerate((a, b)):
    d = str(tmp_path / f"o{i}")
    os.makedirs(d)
    st = results.ResultStore(os.path.join(d, "results.jsonl"))
    for r in rs:
      st.append(r)
    c = get_config()
    c.organism.seed = c.organism.train.seed = i
    with open(os.path.join(d, "config.json"), "w") as f:
      json.dump({"config_hash": common.config_hash(c), "config": c.to_dict()}, f, default=str)
    dirs.append((d, c))
  out = str(tmp_path / "pooled")
  report.main([dirs[0][0], "--pool", dirs[1][0], "--organisms", "--out", out])
  assert os.path.isfile(os.path.join(out, "report.md"))
  c = dirs[1][1]
  c.catch.m = 300             # a stage setting: refused
  with open(os.path.join(dirs[1][0], "config.json"), "w") as f:
    json.dump({"config_hash": "x", "config": c.to_dict()}, f, default=str)
  with pytest.raises(SystemExit):
    report.main([dirs[0][0], "--pool", dirs[1][0], "--organisms", "--out", out])


def test_crossed_design_runs_every_training_seed_against_every_catch(headline_run, tmp_path):
  """headline.catch_seeds (issue 27 item 6): cells cross training seeds with catches; a
  row's catch is its own key field, rows of one catch share its caught set, a rerun adds
  nothing, and the report decomposes the variance; the validation refuses a crossed design
  with the power rule on."""
  from catchjax import analysis
  from catchjax.experiments import headline
  from catchjax.validate import ConfigError
  c, wd = headline_run
  c2 = c.copy_and_resolve_references()
  h = c2.headline
  h.families, h.arms, h.distinguish_seeds = ("jsonl",), ("treatment", "control"), ()
  h.seeds, h.catch_seeds, h.return_n = (0, 1), (0, 1), 0
  headline.validate(c2)
  cells = [x for cs in headline.rounds(c2, ["jsonl"], "hate") for x in cs]
  assert sorted((x.seed, x.catch, x.arm) for x in cells) == sorted(
      (s, k, a) for s in (0, 1) for k in (0, 1) for a in ("treatment", "control"))
  wd2 = str(tmp_path / "crossed")
  os.makedirs(wd2)
  os.symlink(os.path.join(wd, "organisms"), os.path.join(wd2, "organisms"))
  headline.run(c2, wd2)
  rows = results.ResultStore(os.path.join(wd2, "results.jsonl")).rows
  assert sorted((r["seed"], r["catch"], r["catch_seed"], r["arm"]) for r in rows) == sorted(
      (s, k, k, a) for s in (0, 1) for k in (0, 1) for a in ("treatment", "control"))
  assert len({results.row_key(r) for r in rows}) == 8
  for k in (0, 1):   # one catch, whatever the training seed
    assert len({r["n_caught"] for r in rows if r["catch"] == k}) == 1
  catches = [n for n in os.listdir(os.path.join(wd2, "catches"))
             if not n.endswith("-p_attack.json")]
  assert len(catches) == 2
  headline.run(c2, wd2)                    # resume: nothing new
  assert len(results.ResultStore(os.path.join(wd2, "results.jsonl")).rows) == 8
  pairs, unpaired = analysis.pair_rows(rows, dict(analysis.PRIMARY, n=8))
  # treatment - control per (seed, catch): 4 pairs (a pair whose gap before is 0 has no
  # retained gap and counts its two rows as unpaired), never two rows for one cell.
  assert len(pairs) + unpaired / 2 == 4 and pairs
  md = open(os.path.join(wd2, "report.md")).read()
  assert "variance decomposition of the crossed design" in md
  h.power_max_seeds = 3
  with pytest.raises(ConfigError, match="catch_seeds"):
    headline.validate(c2)


def test_removal_curves_record_every_arm_on_the_way(headline_run, tmp_path):
  """train_against.curve_every (issue 26 item 2): with the stopping rule off, every arm's run
  is measured every k steps (step 0 = the organism); rows carry the curve, the report its
  table and figure; the validation refuses curves with the stopping rule on."""
  from catchjax.experiments import headline
  from catchjax.validate import ConfigError
  c, wd = headline_run
  c2 = c.copy_and_resolve_references()
  h, t = c2.headline, c2.train_against
  h.families, h.arms, h.distinguish_seeds, h.return_n = ("jsonl",), ("treatment", "oracle"), \
      (), 0
  t.curve_every = 4
  with pytest.raises(ConfigError, match="curve_every=4 needs the stopping rule off"):
    headline.validate(c2)
  t.stopping.enabled = False
  t.train.steps = 8
  headline.validate(c2)
  wd2 = str(tmp_path / "curves")
  os.makedirs(wd2)
  os.symlink(os.path.join(wd, "organisms"), os.path.join(wd2, "organisms"))
  headline.run(c2, wd2)
  rows = results.ResultStore(os.path.join(wd2, "results.jsonl")).rows
  assert sorted(r["arm"] for r in rows) == ["oracle", "treatment"]
  for r in rows:
    assert r["train_steps"] == 8
    assert [p["step"] for p in r["curve"]] == [0, 4, 8], r["curve"]
    for p in r["curve"]:
      assert p["deploy_n"] == c2.measure.n_eval and p["test_n"] == c2.measure.n_test
      assert 0 <= p["deploy_lo"] <= p["deploy_rate"] <= p["deploy_hi"] <= 1
    assert r["curve"][0]["kl"] == pytest.approx(0.0, abs=1e-4)   # step 0: the organism
    assert r["curve"][-1]["kl"] > 1e-4                            # trained: it moved
  md = open(os.path.join(wd2, "report.md")).read()
  assert "Removal vs training step" in md and "| 8 |" in md
  assert os.path.isfile(os.path.join(wd2, "figures", "curve_jsonl_hate_n8.png"))


def test_headline_round_one_is_two_seeds_at_the_largest_n():
  """Issue 28 item 2: the default plan's first round (the first complete report) is every
  family, treatment and control, at N = 16 on two seeds; distinguishability comes after it,
  then the third seed, then the other Ns; the rounds cover the grid once."""
  from catchjax.experiments import headline
  from configs.headline import get_config
  c = get_config()
  names = [headline.org_stage.family_name(f) for f in headline.families_of(c)]
  rs = list(headline.rounds(c, names, "hate"))
  first = {(x.family, x.arm, x.n, x.seed) for x in rs[0]}
  assert first == {(f, a, 16, s) for f in names for a in ("treatment", "control")
                   for s in (0, 1)}
  assert {x.arm for x in rs[1]} == {"distinguish"}
  assert {x.seed for x in rs[2]} == {2} and {x.n for x in rs[2]} == {16}
  assert {x.n for x in rs[-1]} == {1, 4}
  cells = [x for r in rs for x in r]
  assert len(cells) == len(set(cells)) == 5 * 2 * 3 * 3 + 5
