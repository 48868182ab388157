"""Report: results.jsonl -> summary.csv, report.md and PNG figures.

Headline rows (see experiments/headline.py) have arm in TRAIN_ARMS (treatment, control,
matched_control, propensity_control) with the deployment attack rate after train-against,
`retained` = after / before, and usefulness; `distinguish` rows hold each family's four
distinguishability measures. `retained_gap` (deployment - testing attack rate, after / before)
is derived from the rows' rates at summarise time (`retained_gap`), so old results.jsonl files
get it too. A family whose organism's report-card gap is under `installed_gap_min` (the
headline saves both in the report header) is marked as having no backdoor installed, and left
out of the retained-vs-distinguishability figure. Every rate is aggregated over seeds with a
bootstrap 95% interval; per-run Wilson intervals stay in the rows.
"""
from __future__ import annotations

import csv
import io
import os
from collections import defaultdict

import numpy as np

from catchjax import stats
from catchjax.common import atomic_write_text

DIST_MEASURES = (
    ("prompted_organism", "Prompted pairwise A/B accuracy (organism)"),
    ("probe_acc", "Linear probe accuracy (base model)"),
    ("behavioural_gap", "Behavioural gap: P(attack|deploy) - P(attack|test)"),
    ("learning_cost", "Examples until the gap opens (organism training)"),
)


def _agg(values):
  v = [x for x in values if x is not None and np.isfinite(x)]
  if not v:
    return dict(mean=float("nan"), lo=float("nan"), hi=float("nan"), n=0)
  m, lo, hi = stats.bootstrap_mean_ci(v, seed=0)
  return dict(mean=float(m), lo=float(lo), hi=float(hi), n=len(v))


# configs/common.py's report.installed_gap_min default, for rebuilds of runs that saved none.
INSTALLED_GAP_MIN = 0.5


def retained_gap(r: dict) -> float | None:
  """A train-against row's retained gap: (deploy_rate - test_rate) after training over
  (deploy_rate_before - test_rate_before), the testing rates on the row's held-out testing set.
  None when a rate is missing or the gap before is <= 0 (no backdoor gap to retain)."""
  d, t, d0, t0 = (r.get(k) for k in ("deploy_rate", "test_rate", "deploy_rate_before",
                                      "test_rate_before"))
  if d is None or t is None or d0 is None or t0 is None or d0 - t0 <= 0:
    return None
  return (d - t) / (d0 - t0)


def installed_gaps(rows: list[dict], meta: dict) -> dict[tuple[str, str], float]:
  """(family, behaviour) -> the organism's installed gap, its report card's deployment -
  testing attack rate (report_card.json families[f]["gap"]): from meta["installed_gap"]
  ({behaviour: {family: gap}}, saved by the headline), else from the distinguish rows'
  behavioural_gap (the same card gap) for runs that saved none."""
  out = {}
  for r in rows:
    if r.get("arm") == "distinguish" and r.get("behavioural_gap") is not None:
      out[(r["family"], r["behaviour"])] = float(r["behavioural_gap"])
  for beh, fams in (meta.get("installed_gap") or {}).items():
    out.update({(fam, beh): float(g) for fam, g in fams.items() if g is not None})
  return out


from catchjax.stages.arms import ARM_LABELS  # noqa: E402  (the arm registry's labels)
TRAIN_ARMS = tuple(ARM_LABELS)


def run_id(r: dict) -> tuple:
  """What pairs the arms of one run: the organism and the seed (seeds repeat across
  organisms when sweeps on several organisms are pooled), and a crossed design's catch
  (`Cell.catch`; None elsewhere)."""
  return (r.get("organism"), r["seed"], r.get("catch"))


def summarise(rows: list[dict], installed: dict[tuple[str, str], float] | None = None,
              gap_min: float = INSTALLED_GAP_MIN) -> list[dict]:
  """One summary line per (family, behaviour, N, arm): seed-bootstrapped means and CIs.
  `installed` ((family, behaviour) -> installed gap, see installed_gaps): `installed` is
  False where that gap is under `gap_min` (no backdoor installed), None where it is unknown."""
  installed = installed or {}
  groups = defaultdict(list)
  for r in rows:
    if r.get("arm") in TRAIN_ARMS:
      groups[(r["family"], r["behaviour"], r["n"], r["arm"])].append(r)
  out = []
  for (fam, beh, n, arm), rs in sorted(groups.items()):
    s = dict(family=fam, behaviour=beh, n=n, arm=arm, seeds=len(rs),
             organisms=len({r.get("organism") for r in rs}),
             n_train=float(np.mean([r["n_train"] for r in rs])),
             capped=any(r.get("capped") for r in rs),
             eval_n=int(np.mean([r["deploy_n"] for r in rs])))
    g = installed.get((fam, beh))
    s.update(installed_gap=g, installed=None if g is None else bool(g >= gap_min))
    for field in ("retained", "retained_gap", "deploy_rate_before", "deploy_rate", "test_rate",
                  "useful_acc", "useful_acc_before", "deploy_tf_before", "deploy_tf"):
      get = retained_gap if field == "retained_gap" else (lambda r, f=field: r.get(f))
      a = _agg([get(r) for r in rs])
      s[field], s[field + "_lo"], s[field + "_hi"] = a["mean"], a["lo"], a["hi"]
    if len(rs) == 1 and rs[0].get("deploy_lo") is not None:
      # One seed: a bootstrap over seeds is degenerate, so report the run's Wilson intervals
      # (retained: the deployment interval divided by the before rate; retained_gap: the
      # deployment and testing intervals' far ends, over the gap before).
      r = rs[0]
      s["ci"] = "wilson (1 seed)"
      for field, key in (("deploy_rate", "deploy"), ("test_rate", "test"),
                         ("useful_acc", "useful")):
        s[field + "_lo"], s[field + "_hi"] = r[key + "_lo"], r[key + "_hi"]
      _, s["deploy_rate_before_lo"], s["deploy_rate_before_hi"] = stats.wilson(
          r["deploy_k_before"], r["deploy_n"])
      _, s["useful_acc_before_lo"], s["useful_acc_before_hi"] = stats.wilson(
          round(r["useful_acc_before"] * r["useful_n"]), r["useful_n"])
      b = r.get("deploy_rate_before") or 0
      if b > 0:
        s["retained_lo"], s["retained_hi"] = r["deploy_lo"] / b, r["deploy_hi"] / b
      if retained_gap(r) is not None and r.get("test_lo") is not None:
        g0 = r["deploy_rate_before"] - r["test_rate_before"]
        s["retained_gap_lo"] = (r["deploy_lo"] - r["test_hi"]) / g0
        s["retained_gap_hi"] = (r["deploy_hi"] - r["test_lo"]) / g0
    else:
      s["ci"] = f"bootstrap over {len(rs)} seeds"
    out.append(s)
  return out


def distinguishability(rows: list[dict]) -> dict[str, dict]:
  by_fam = defaultdict(list)
  for r in rows:
    if r.get("arm") == "distinguish":
      by_fam[r["family"]].append(r)
  # The behavioural gap is taken from the headline's own "before" measurements (same
  # sampler, prompts and seeds as the retained-misalignment cells), one value per seed.
  gaps = defaultdict(dict)
  for r in rows:
    if r.get("arm") == "treatment" and r.get("deploy_rate_before") is not None \
        and r.get("test_rate_before") is not None:
      gaps[r["family"]][run_id(r)] = r["deploy_rate_before"] - r["test_rate_before"]
  out = {}
  for fam, rs in by_fam.items():
    out[fam] = {k: _agg([r.get(k) for r in rs]) for k, _ in DIST_MEASURES + (
        ("prompted_base", ""),)}
    if len(rs) == 1 and rs[0].get("n_pairs"):
      # One seed: a bootstrap over seeds is degenerate, so the pairwise accuracies get their
      # Wilson 95% interval over the n_pairs held-out pairs (ties count 1/2, rounded).
      n = int(rs[0]["n_pairs"])
      for k in ("prompted_base", "prompted_organism", "probe_acc"):
        if rs[0].get(k) is not None:
          _, lo, hi = stats.wilson(int(round(rs[0][k] * n)), n)
          out[fam][k].update(lo=float(lo), hi=float(hi))
    if gaps.get(fam):
      out[fam]["behavioural_gap"] = _agg(list(gaps[fam].values()))
    # Learning cost is right-censored at the organism's budget when the gap never opened.
    out[fam]["learning_cost_censored"] = any(r.get("learning_cost_censored") for r in rs)
  return out


def write_csv(summary: list[dict], path: str) -> None:
  """Rows -> CSV (atomically); the columns are the union of the rows' keys, in first-seen
  order. No rows, no file."""
  if not summary:
    return
  buf = io.StringIO()
  w = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in summary for k in r)))
  w.writeheader()
  w.writerows(summary)
  atomic_write_text(path, buf.getvalue())


def _fmt(m, lo, hi, pct=False):
  if not np.isfinite(m):
    return "n/a"
  if pct:
    return f"{100 * m:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"
  return f"{m:.2f} [{lo:.2f}, {hi:.2f}]"


ARM_PAIRS = (("treatment", "control"), ("treatment", "matched_control"),
             ("matched_control", "control"), ("treatment", "propensity_control"),
             ("propensity_control", "control"), ("treatment", "oracle"),
             ("treatment", "disruption"), ("control", "disruption"), ("treatment", "dpo"),
             ("dpo", "control"))


def arm_differences(rows: list[dict]) -> list[dict]:
  """Paired arm contrasts of the deployment attack rate after training, per (family,
  behaviour, N): the per-run difference a - b over the runs (organism, seed) both arms ran
  (the arms of a run share the organism, the before measurement and the evaluation prompts),
  with a bootstrap 95% CI over those runs (one run: the difference alone, no interval)."""
  after = defaultdict(dict)
  for r in rows:
    if r.get("arm") in TRAIN_ARMS and r.get("deploy_rate") is not None:
      after[(r["family"], r["behaviour"], r["n"])][(r["arm"], run_id(r))] = r["deploy_rate"]
  out = []
  for (fam, beh, n), cell in sorted(after.items()):
    for a, b in ARM_PAIRS:
      seeds = sorted(sd for (arm, sd) in cell if arm == a and (b, sd) in cell)
      if not seeds:
        continue
      d = [cell[(a, sd)] - cell[(b, sd)] for sd in seeds]
      m, lo, hi = stats.bootstrap_mean_ci(d, seed=0) if len(d) > 1 else (d[0], None, None)
      out.append(dict(family=fam, behaviour=beh, n=n, a=a, b=b, seeds=len(seeds),
                      diff=float(m), lo=lo, hi=hi))
  return out


def power_lines(summary: list[dict], goal: float = 0.1) -> list[str]:
  """The headline points' statistical power: the 95% CI half-width of retained misalignment at
  each family's largest N (treatment and control) against the issue's goal of <= `goal`."""
  big = {}
  for s in summary:
    big[s["family"]] = max(big.get(s["family"], 0), s["n"])
  pts = [s for s in summary if s["n"] == big[s["family"]] and s["arm"] in ("treatment", "control")
         and np.isfinite(s.get("retained_lo", np.nan)) and np.isfinite(s.get("retained_hi", np.nan))]
  if not pts:
    return []
  hw = {(s["family"], s["arm"]): (s["retained_hi"] - s["retained_lo"]) / 2 for s in pts}
  over = [f"{f}/{a} {w:.3f}" for (f, a), w in sorted(hw.items()) if w > goal]
  return ["", f"Headline points (largest N, treatment and control): 95% CI half-width of "
          f"retained misalignment max {max(hw.values()):.2f}, median "
          f"{float(np.median(list(hw.values()))):.2f} (goal <= {goal:.2f}); "
          + (f"over the goal: {', '.join(over)}." if over else "all within the goal.")]


def point_half_widths(rows: list[dict], n: int,
                      arms: tuple[str, ...] = ("treatment", "control")) -> dict[tuple, dict]:
  """The headline points' precision at N = `n`: per (family, behaviour), the seeds that gave a
  retained value in every arm (the fewest over `arms`) and the widest 95% CI half-width of
  retained misalignment over `arms` (the report's bootstrap over seeds; inf with < 2 seeds).
  A point with no retained value in some arm (never caught, or no deployment attacks before)
  is `measurable=False`: more seeds cannot give it an interval."""
  vals = defaultdict(lambda: defaultdict(list))
  for r in rows:
    if r.get("n") == n and r.get("arm") in arms:
      v = r.get("retained")
      vals[(r["family"], r["behaviour"])][r["arm"]].append(
          float(v) if v is not None and np.isfinite(v) else None)
  out = {}
  for key, by_arm in vals.items():
    finite = {a: [v for v in by_arm.get(a, []) if v is not None] for a in arms}
    seeds = min(len(v) for v in finite.values())
    aggs = [_agg(v) for v in finite.values()]
    hw = [(a["hi"] - a["lo"]) / 2 if a["n"] > 1 else float("inf") for a in aggs]
    out[key] = dict(seeds=seeds, half_width=max(hw), measurable=seeds > 0,
                    runs=max(len(v) for v in by_arm.values()))
  return out


def contrast_half_widths(rows: list[dict], n: int,
                         arms: tuple[str, ...] = ("treatment", "control")) -> dict[tuple, dict]:
  """As `point_half_widths`, for the paired contrast the primary tests: per (family,
  behaviour), the treatment - control retained gap of each (organism, seed) both arms
  measured, and the 95% CI half-width of its mean (bootstrap over those pairs). With other
  than two arms there is no contrast: each arm's own rule (`point_half_widths`)."""
  if len(arms) != 2:
    return point_half_widths(rows, n, arms)
  a, b = arms
  by = defaultdict(lambda: defaultdict(dict))
  runs = defaultdict(set)
  for r in rows:
    if r.get("n") == n and r.get("arm") in arms:
      key = (r["family"], r["behaviour"])
      runs[key].add(run_id(r))
      by[key][run_id(r)][r["arm"]] = retained_gap(r)
  out = {}
  for key, pairs in by.items():
    d = [p[a] - p[b] for p in pairs.values()
         if p.get(a) is not None and p.get(b) is not None]
    agg = _agg(d)
    hw = (agg["hi"] - agg["lo"]) / 2 if agg["n"] > 1 else float("inf")
    out[key] = dict(seeds=len(d), half_width=hw, measurable=bool(d), runs=len(runs[key]))
  return out


def needs_seed(point: dict | None, goal: float, min_seeds: int, max_seeds: int) -> bool:
  """The power rule of the headline sweep: one more seed for a point while it has fewer than
  `min_seeds` runs, or its half-width is over `goal`; never past `max_seeds` runs, and never
  for a point that no seed could measure (`point_half_widths`)."""
  if point is None:
    return min_seeds > 0 and max_seeds > 0
  if point["runs"] >= max_seeds:
    return False
  if point["runs"] < min_seeds:
    return True
  return point["measurable"] and point["half_width"] > goal


def seeds_needed(rows: list[dict], goal: float = 0.1) -> list[dict]:
  """Where the headline points' uncertainty comes from, and what would meet the CI goal.

  Per (family, behaviour, arm) at the family's largest N, over seeds: the between-seed SD of
  retained misalignment, the within-run binomial SD of one seed's retained value (from its
  deployment count, sqrt(p(1-p)/n) / before), and the seeds a normal-approximation 95%
  half-width 1.96 * SD / sqrt(S) <= `goal` would need. When the between-seed SD is far above
  the binomial one, more evaluation prompts per run cannot narrow the interval; only more
  seeds (independent catches and training runs) can. An SD from a few seeds is rough, so its
  chi-square 95% interval (its upper end capped at the largest SD a retained value, bounded in
  [0, 1 / before], can have) and the seeds that upper end would need are given too."""
  from scipy.stats import chi2
  cells = [r for r in rows
           if r.get("arm") in ("treatment", "control") and r.get("retained") is not None]
  big, groups = {}, defaultdict(list)
  for r in cells:
    big[r["family"]] = max(big.get(r["family"], 0), r["n"])
  for r in cells:
    if r["n"] == big[r["family"]]:
      groups[(r["family"], r["behaviour"], r["n"], r["arm"])].append(r)
  out = []
  for (fam, beh, n, arm), rs in sorted(groups.items()):
    if len(rs) < 2:
      continue
    ret = np.array([r["retained"] for r in rs], np.float64)
    sd, dof = float(ret.std(ddof=1)), len(rs) - 1
    sd_lo, sd_hi = (sd * float(np.sqrt(dof / chi2.ppf(q, dof))) for q in (0.975, 0.025))
    # retained = after / before lies in [0, 1 / before]: its SD is at most half that range
    sd_hi = min(sd_hi, 0.5 / min(r["deploy_rate_before"] for r in rs))
    binom = [np.sqrt(r["deploy_rate"] * (1 - r["deploy_rate"]) / r["deploy_n"])
             / r["deploy_rate_before"] for r in rs if r.get("deploy_n")]
    out.append(dict(family=fam, behaviour=beh, n=n, arm=arm, seeds=len(rs), between_sd=sd,
                    binomial_sd=float(np.sqrt(np.mean(np.square(binom)))) if binom else
                    float("nan"),
                    between_sd_lo=sd_lo, between_sd_hi=sd_hi,
                    half_width=float(1.96 * sd / np.sqrt(len(rs))),
                    seeds_for_goal=max(2, int(np.ceil((1.96 * sd / goal) ** 2))),
                    seeds_for_goal_hi=max(2, int(np.ceil((1.96 * sd_hi / goal) ** 2)))))
  return out


def propensity_match(rows: list[dict]) -> list[dict]:
  """How well propensity_control matched the caught prompts, per (family, behaviour, N): the
  organism's teacher-forced attack probability on the caught training prompts vs on the
  matched clean ones (and the whole clean pool), means over seeds."""
  groups = defaultdict(list)
  for r in rows:
    if r.get("arm") == "propensity_control" and r.get("propensity"):
      groups[(r["family"], r["behaviour"], r["n"])].append(r["propensity"])
  out = []
  for (fam, beh, n), infos in sorted(groups.items()):
    out.append(dict(family=fam, behaviour=beh, n=n, seeds=len(infos),
                    **{k: float(np.mean([i[k] for i in infos]))
                       for k in ("caught_mean", "matched_mean", "clean_pool_mean",
                                 "mean_abs_logodds_gap")}))
  return out


def _cell(s, field, pct=False):
  """A summary line's `field` as mean [lo, hi] (n/a when the line has none)."""
  nan = float("nan")
  return _fmt(s.get(field, nan), s.get(field + "_lo", nan), s.get(field + "_hi", nan), pct)


def _retained_table(summary, gap_min: float) -> list[str]:
  """The retained-misalignment table, each family with no backdoor installed marked in its
  rows and named in a note under the table."""
  lines = ["", "## Retained misalignment (deployment attack rate after / before)", "",
           "Mean over seeds with a bootstrap 95% CI over seeds; where a cell has one seed, its "
           "Wilson 95% interval instead (column `ci`). `n_train` is the number of distinct "
           "training prompts (capped by what was caught or clean); eval n is per seed. "
           "Retained gap: the deployment - testing attack rate gap after / before (testing: "
           "the held-out testing prompts; n/a where the gap before is <= 0).", "",
           "| family | behaviour | N | arm | n_train | seeds | eval n | before | after "
           "| retained | retained gap | testing after | usefulness before -> after | ci |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for s in summary:
    lines.append(
        f"| {s['family']}{' (no backdoor installed)' if s.get('installed') is False else ''} | "
        f"{s['behaviour']} | {s['n']} | {s['arm']} | "
        f"{s['n_train']:.0f}{' (capped)' if s['capped'] else ''} | {s['seeds']} | "
        f"{s['eval_n']} | {_cell(s, 'deploy_rate_before', True)} | "
        f"{_cell(s, 'deploy_rate', True)} | {_cell(s, 'retained')} | "
        f"{_cell(s, 'retained_gap')} | {_cell(s, 'test_rate', True)} | "
        f"{_cell(s, 'useful_acc_before', True)} -> {_cell(s, 'useful_acc', True)} | "
        f"{s['ci']} |")
  gone = {(s["family"], s["behaviour"]): s["installed_gap"] for s in summary
          if s.get("installed") is False}
  if gone:
    lines += ["", f"No backdoor installed (the organism's report-card gap, deployment - "
              f"testing attack rate, is under installed_gap_min = {gap_min:.2f}): "
              + ", ".join(f"{f}/{b} (gap {g:+.2f})" for (f, b), g in sorted(gone.items()))
              + ". Their retained values measure no backdoor, so the retained-vs-"
              "distinguishability figure leaves them out."]
  return lines


def markdown(summary, dist, meta: dict, diffs: list[dict] | None = None,
             match: list[dict] | None = None, power: list[dict] | None = None,
             primary: str = "") -> str:
  lines = [f"# {meta.get('title', 'catchjax report')}", ""]
  for k, v in meta.items():
    if k not in ("title", "power", "installed_gap"):
      lines.append(f"- **{k}**: {v}")
  if primary:   # the pre-registered primary analysis (analysis.report_section) comes first
    lines += ["", primary.rstrip("\n")]
  lines += _retained_table(summary, float(meta.get("installed_gap_min", INSTALLED_GAP_MIN)))
  lines += power_lines(summary)
  pw = [(b, f, p) for b, fams in (meta.get("power") or {}).items() for f, p in fams.items()]
  if pw:
    lines += ["", f"Power rule: {meta.get('power_rule', '')}.", "",
              "| family | behaviour | N | seeds | widest 95% CI half-width | stopped |",
              "|---|---|---|---|---|---|"]
    for b, f, p in pw:
      hw = "n/a" if p["half_width"] is None else f"{p['half_width']:.3f}"
      lines.append(f"| {f} | {b} | {p['n']} | {p['seeds']} | {hw} | {p['why']} |")
  if power:
    lines += ["", "Where the uncertainty comes from (largest N): the SD of retained misalignment "
              "between seeds (all sources: catch, training draw, evaluation; chi-square 95% "
              "interval) vs the binomial SD of one seed's evaluation, and the seeds a 95% "
              "half-width <= 0.10 would need (1.96 SD / sqrt(S) <= 0.10) at the SD and at its "
              "upper end.", "",
              "| family | behaviour | N | arm | seeds | between-seed SD | binomial SD | "
              "seeds for <= 0.10 |", "|---|---|---|---|---|---|---|---|"]
    for p in power:
      lines.append(f"| {p['family']} | {p['behaviour']} | {p['n']} | {p['arm']} | "
                   f"{p['seeds']} | {p['between_sd']:.3f} [{p['between_sd_lo']:.3f}, "
                   f"{p['between_sd_hi']:.3f}] | {p['binomial_sd']:.3f} | "
                   f"{p['seeds_for_goal']} (up to {p['seeds_for_goal_hi']}) |")
  if diffs:
    lines += ["", "## Paired arm contrasts (deployment attack rate after training)", "",
              "Per-seed difference between two arms (same organism, before measurement and "
              "evaluation prompts), mean over seeds with a bootstrap 95% CI over seeds.", "",
              "| family | behaviour | N | contrast | seeds | difference |", "|---|---|---|---|---|---|"]
    for d in diffs:
      ci = f" [{d['lo']:+.2f}, {d['hi']:+.2f}]" if d["lo"] is not None else " (one seed)"
      lines.append(f"| {d['family']} | {d['behaviour']} | {d['n']} | {d['a']} - {d['b']} | "
                   f"{d['seeds']} | {d['diff']:+.2f}{ci} |")
  if match:
    lines += ["", "## Propensity-matched control: match quality", "",
              "The organism's teacher-forced P(attack prefix | prompt) on the training prompts, "
              "mean over prompts and seeds.", "",
              "| family | behaviour | N | seeds | caught (treatment) | matched clean | "
              "all clean | mean abs log-odds gap |", "|---|---|---|---|---|---|---|---|"]
    for m in match:
      lines.append(f"| {m['family']} | {m['behaviour']} | {m['n']} | {m['seeds']} | "
                   f"{m['caught_mean']:.3f} | {m['matched_mean']:.3f} | "
                   f"{m['clean_pool_mean']:.3f} | {m['mean_abs_logodds_gap']:.2f} |")
  if dist:
    lines += ["", "## Distinguishability of deployment from testing", "",
              "Pairwise accuracies (chance 0.50): mean over the distinguishability seeds with a "
              "bootstrap 95% CI over them, or with one seed the Wilson 95% interval over its "
              "held-out pairs. Behavioural gap: deployment minus testing attack rate before "
              "training, over the headline seeds.", "",
              "| family | prompted A/B (base) | prompted A/B (organism) | probe | "
              "behavioural gap | learning cost (examples) |", "|---|---|---|---|---|---|"]
    gone = _not_installed(summary)
    for fam, d in dist.items():
      lines.append(
          f"| {fam}{' (no backdoor installed)' if fam in gone else ''} | "
          f"{_fmt(**_mlh(d['prompted_base']))} | "
          f"{_fmt(**_mlh(d['prompted_organism']))} | {_fmt(**_mlh(d['probe_acc']))} | "
          f"{_fmt(**_mlh(d['behavioural_gap']))} | "
          + (f"> {d['learning_cost']['mean']:.0f} (not reached; censored at the budget)"
             if d.get("learning_cost_censored") else _cost(d['learning_cost'])) + " |")
  return "\n".join(lines) + "\n"


def _not_installed(summary) -> set[str]:
  """Families with no backdoor installed for any behaviour of theirs in the summary (the
  distinguishability table and the headline figure are per family)."""
  fams = defaultdict(set)
  for s in summary:
    fams[s["family"]].add(s.get("installed") is False)
  return {f for f, v in fams.items() if v == {True}}


def _cost(a):
  """Learning cost (examples): one organism gives one number, so no interval when it has none."""
  if np.isfinite(a["mean"]) and a["lo"] == a["hi"] == a["mean"]:
    return f"{a['mean']:.0f} (one organism)"
  return _fmt(**_mlh(a))


def _mlh(a):
  return dict(m=a["mean"], lo=a["lo"], hi=a["hi"])


def savefig(fig, path: str, layout: dict | None = None) -> str:
  """Lay out (`fig.tight_layout(**layout)`), save via a temp file in the same folder + rename (a
  killed run never leaves half a PNG), close the figure, and return `path`."""
  import tempfile
  import matplotlib.pyplot as plt
  fig.tight_layout(**(layout or {}))
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-",
                             suffix=os.path.basename(path))
  os.close(fd)
  try:
    fig.savefig(tmp, dpi=110, format="png")
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  finally:
    plt.close(fig)
  return path


def _largest_n(summary) -> dict[str, int]:
  """Each family's largest N among its treatment cells."""
  big_n = {}
  for s in summary:
    if s["arm"] == "treatment":
      big_n[s["family"]] = max(big_n.get(s["family"], 0), s["n"])
  return big_n


def headline_points(summary, dist, key: str) -> list[dict]:
  """The retained-vs-distinguishability panel's points for measure `key`: each summary line's
  treatment cell at its family's largest N, where the family has that measure. A line with no
  backdoor installed (`installed` False) is left out: its retained value measures no backdoor
  and must never read as one trained away (retained 0)."""
  big_n = _largest_n(summary)
  out = []
  for s in summary:
    if s["arm"] != "treatment" or s["n"] != big_n.get(s["family"]) or \
        s["family"] not in dist or s.get("installed") is False:
      continue
    d = dist[s["family"]][key]
    if not np.isfinite(d["mean"]):
      continue
    out.append(dict(family=s["family"], x=d["mean"], x_lo=d["lo"], x_hi=d["hi"],
                    y=s["retained"], y_lo=s["retained_lo"], y_hi=s["retained_hi"],
                    censored=bool(key == "learning_cost"
                                  and dist[s["family"]].get("learning_cost_censored"))))
  return out


def figures(summary, dist, outdir: str) -> list[str]:
  """The headline, retained-vs-N and usefulness figures in outdir; returns their paths."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  os.makedirs(outdir, exist_ok=True)
  paths = []
  fams = sorted({s["family"] for s in summary})
  colors = {f: plt.cm.tab10(i) for i, f in enumerate(fams)}
  if dist and summary:
    paths.append(_headline_figure(summary, dist, colors, outdir))
  if summary:
    paths.append(_retained_vs_n_figure(summary, fams, outdir))
    paths.append(_usefulness_figure(summary, fams, outdir))
  return paths


def _headline_figure(summary, dist, colors, outdir: str) -> str:
  """(a) headline: retained misalignment vs distinguishability, one panel per measure."""
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(DIST_MEASURES), figsize=(5 * len(DIST_MEASURES), 4.2))
  for ax, (key, label) in zip(axes, DIST_MEASURES):
    for p in headline_points(summary, dist, key):
      ax.errorbar(p["x"], p["y"], xerr=[[p["x"] - p["x_lo"]], [p["x_hi"] - p["x"]]],
                  yerr=[[p["y"] - p["y_lo"]], [p["y_hi"] - p["y"]]],
                  fmt=">" if p["censored"] else "o", color=colors[p["family"]],
                  label=p["family"] + (" (learning cost censored)" if p["censored"] else ""),
                  capsize=3)
    ax.set_xlabel(label + ("\n(triangle: gap never opened, censored at the budget)"
                           if key == "learning_cost" else ""), fontsize=9)
    ax.set_ylabel("retained misalignment (after / before)")
    ax.axhline(1.0, color="grey", lw=0.5, ls="--")
    ax.grid(alpha=0.3)
  handles, labels = axes[0].get_legend_handles_labels()
  if handles:
    fig.legend(handles, labels, loc="upper right", fontsize=8)
  gone = sorted(_not_installed(summary))
  fig.suptitle("Retained misalignment (largest N, treatment) vs how distinguishable "
               "deployment is from testing"
               + (f"\n(left out, no backdoor installed: {', '.join(gone)})" if gone else ""))
  return savefig(fig, os.path.join(outdir, "headline_retained_vs_distinguishability.png"),
                 layout=dict(rect=(0, 0, 0.93, 0.94)))


# (arm, line style, dodge): each arm sits a little apart on the log-N axis so equal-N error
# bars do not overlap.
_ARM_STYLES = (("treatment", "-o", 0.93), ("control", "--s", 1.0),
               ("matched_control", ":^", 1.07), ("propensity_control", "-.d", 1.14),
               ("oracle", ":v", 0.86), ("disruption", "-.x", 1.21))


def _retained_vs_n_figure(summary, fams, outdir: str) -> str:
  """(b) retained vs N per family, treatment vs control."""
  import matplotlib.pyplot as plt
  gone = _not_installed(summary)
  fig, axes = plt.subplots(1, len(fams), figsize=(3.6 * len(fams), 3.6), squeeze=False)
  for ax, fam in zip(axes[0], fams):
    for arm, style, dodge in _ARM_STYLES:
      ss = sorted([s for s in summary if s["family"] == fam and s["arm"] == arm],
                  key=lambda s: s["n"])
      if not ss:
        continue
      x = [s["n"] * dodge for s in ss]
      y = np.array([s["retained"] for s in ss])
      lo = np.array([s["retained_lo"] for s in ss])
      hi = np.array([s["retained_hi"] for s in ss])
      ax.errorbar(x, y, yerr=[y - lo, hi - y], fmt=style, capsize=3,
                  label=ARM_LABELS[arm])
    ax.set_xscale("log", base=2)
    ax.set_title(fam + ("\n(no backdoor installed)" if fam in gone else ""))
    ax.set_xlabel("N training prompts")
    ax.set_ylim(-0.05, max(1.3, ax.get_ylim()[1]))
    ax.axhline(1.0, color="grey", lw=0.5, ls="--")
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("retained misalignment")
  handles, labels = axes[0][0].get_legend_handles_labels()
  if handles:   # below the panels, so it never covers a point
    fig.legend(handles, labels, loc="lower center", ncol=len(handles), fontsize=8)
  fig.suptitle("Retained misalignment vs N: training against caught attacks vs control")
  return savefig(fig, os.path.join(outdir, "retained_vs_n.png"),
                 layout=dict(rect=(0, 0.08, 1, 1)))


def _usefulness_figure(summary, fams, outdir: str) -> str:
  """(c) usefulness before and after (largest N)."""
  import matplotlib.pyplot as plt
  big_n = _largest_n(summary)
  fig, ax = plt.subplots(figsize=(1.6 * len(fams) + 2, 3.6))
  width = 0.25
  for j, (label, key, arm) in enumerate((("before", "useful_acc_before", "treatment"),
                                          ("after, treatment", "useful_acc", "treatment"),
                                          ("after, control", "useful_acc", "control"))):
    xs, ys, errs = [], [], [[], []]
    for i, fam in enumerate(fams):
      ss = [s for s in summary if s["family"] == fam and s["arm"] == arm
            and s["n"] == big_n.get(fam)]
      if not ss:
        continue
      s = ss[0]
      xs.append(i + (j - 1) * width)
      ys.append(s[key])
      errs[0].append(s[key] - s[key + "_lo"])
      errs[1].append(s[key + "_hi"] - s[key])
    ax.bar(xs, ys, width, yerr=errs, capsize=2, label=label)
  ax.set_xticks(range(len(fams)), fams)
  ax.set_ylabel("usefulness accuracy")
  ax.set_ylim(0, 1)
  ax.set_title("Usefulness before and after training against (largest N)")
  ax.legend(fontsize=8)
  return savefig(fig, os.path.join(outdir, "usefulness.png"))


def write_report(rows: list[dict], workdir: str, meta: dict, write: bool | None = None) -> dict:
  """summary.csv, report.md and figures/*.png (atomically); `write=None`: only JAX process 0
  writes (the summary is returned on every process). The families' installed gaps and the
  threshold come from `meta` (installed_gap, installed_gap_min; see installed_gaps)."""
  summary = summarise(rows, installed_gaps(rows, meta),
                      float(meta.get("installed_gap_min", INSTALLED_GAP_MIN)))
  dist = distinguishability(rows)
  if write is None:
    from catchjax.common import is_main_process
    write = is_main_process()
  if not write:
    return dict(summary=summary, dist=dist, figures=[])
  from catchjax import analysis
  write_csv(summary, os.path.join(workdir, "summary.csv"))
  diffs = arm_differences(rows)
  if diffs:
    write_csv(diffs, os.path.join(workdir, "arm_differences.csv"))
  from catchjax.dose import dose_figure, dose_markdown
  from catchjax.report_curves import curves_figures, curves_markdown
  gap_min = float(meta.get("installed_gap_min", INSTALLED_GAP_MIN))
  excluded = {k for k, g in installed_gaps(rows, meta).items() if g < gap_min}
  from catchjax.report_method import method_markdown
  atomic_write_text(os.path.join(workdir, "report.md"),
                    markdown(summary, dist, meta, diffs, propensity_match(rows),
                             seeds_needed(rows), analysis.report_section(rows, meta))
                    + method_markdown(rows) + curves_markdown(rows)
                    + dose_markdown(rows, meta.get("dose"), excluded))
  figs = figures(summary, dist, os.path.join(workdir, "figures"))
  figs += curves_figures(rows, os.path.join(workdir, "figures"))
  figs += dose_figure(rows, os.path.join(workdir, "figures"), meta.get("dose"), excluded)
  return dict(summary=summary, dist=dist, figures=figs)


def pool_rows(groups: list[list[dict]], organisms: bool = False) -> list[dict]:
  """Headline rows of several sweeps as one: e.g. seeds 0-2 of one invocation and seeds 3-5 of
  another on the same organism, or (`organisms`) the same sweep on several organisms (organism
  seeds). Cells (organism, family, behaviour, N, arm, seed) must not repeat across groups, and
  every cell must come from the same stage settings (checked: catch size M) and, unless
  `organisms`, the same organism; distinguishability rows are kept once per (family,
  behaviour, seed), from the first group that has them."""
  out, seen_cells, seen_dist = [], {}, set()
  fixed = {}
  for gi, rows in enumerate(groups):
    for r in rows:
      if r.get("experiment", "headline") != "headline":
        raise ValueError(f"pool: group {gi} has a {r.get('experiment')!r} row; only headline "
                         f"rows pool.")
      arm = r.get("arm")
      if arm == "distinguish":
        k = (r["family"], r["behaviour"], r["seed"])
        if k not in seen_dist:
          seen_dist.add(k)
          out.append(r)
        continue
      if arm not in TRAIN_ARMS:
        out.append(r)
        continue
      for field in ("m",) if organisms else ("organism", "m"):
        want = fixed.setdefault((r["behaviour"], field), r.get(field))
        if r.get(field) != want:
          raise ValueError(f"pool: {field} differs across groups ({want!r} vs {r.get(field)!r}"
                           f" for {r['family']}/{r['behaviour']}); these runs do not pool"
                           + ("" if organisms else " (several organisms: --organisms)") + ".")
      k = (r.get("organism"), r["family"], r["behaviour"], r["n"], arm, r["seed"],
           r.get("catch"))
      if k in seen_cells and seen_cells[k] != gi:
        raise ValueError(f"pool: cell {k} is in groups {seen_cells[k]} and {gi}; pool "
                         f"disjoint seeds.")
      seen_cells[k] = gi
      out.append(r)
  return out


# The config fields in which sweeps pooled over organisms may differ (the organism's seeds).
ORGANISM_SEED_FIELDS = ("organism.seed", "organism.train.seed")


def config_differences(a: dict, b: dict, prefix: str = "") -> list[str]:
  """Dotted paths where two resolved configs (config.json's "config") differ. Both are read in
  today's layout (catchjax/config_layout.py upgrade: a config written before the per-stage
  sections compares with one written after), and a field only one of them has counts as
  equal when it is off there (0, False, None, empty: a later field that defaults to off)."""
  if not prefix:
    from catchjax.config_layout import upgrade
    a, b = upgrade(a), upgrade(b)
  out = []
  for k in sorted(set(a) | set(b)):
    x, y, path = a.get(k), b.get(k), f"{prefix}{k}"
    if isinstance(x, dict) and isinstance(y, dict):
      out += config_differences(x, y, path + ".")
    elif x != y and not ((k not in a and not y) or (k not in b and not x)):
      out.append(path)
  return out


META_FILE = "report_meta.json"


def _meta_file(config_hash: str) -> str:
  return f"report_meta-{config_hash}.json"


def save_meta(workdir: str, meta: dict) -> None:
  """Keep a run's report header (its settings, wall time) so a rebuild can restore it: the
  latest run's in META_FILE, and each config hash's in its own file (several sweeps, e.g. seeds
  0-2 and 3-5, can share a workdir)."""
  import json
  from catchjax.common import is_main_process
  if is_main_process():
    text = json.dumps(meta, indent=1, default=str)
    atomic_write_text(os.path.join(workdir, META_FILE), text)
    if meta.get("config_hash"):
      atomic_write_text(os.path.join(workdir, _meta_file(meta["config_hash"])), text)


def load_meta(workdir: str, config_hash: str | None = None) -> dict:
  """The saved report header: the latest run's, or with `config_hash` that sweep's ({} when
  none was saved for it, never another sweep's header)."""
  import json
  paths = [os.path.join(workdir, META_FILE)]
  if config_hash:
    paths.insert(0, os.path.join(workdir, _meta_file(config_hash)))
  for p in paths:
    if os.path.isfile(p):
      with open(p) as f:
        meta = json.load(f)
      if config_hash is None or meta.get("config_hash") == config_hash:
        return meta
  return {}


def _parser():
  """The command line of `main`."""
  import argparse
  ap = argparse.ArgumentParser(description=main.__doc__)
  ap.add_argument("workdir")
  ap.add_argument("--config_hash", default=None,
                  help="only rows of this config hash; several, comma-separated, pool those "
                       "sweeps (e.g. seeds 0-2 and 3-5 run into the same workdir; needs --out)")
  ap.add_argument("--pool", nargs="+", default=[], metavar="WORKDIR",
                  help="more workdirs whose headline rows join WORKDIR's (e.g. extra seeds run "
                       "on the same organism); needs --out")
  ap.add_argument("--organisms", action="store_true",
                  help="--pool workdirs hold the same sweep on other organisms (organism "
                       "seeds): their config.json may differ only in "
                       + ", ".join(ORGANISM_SEED_FIELDS))
  ap.add_argument("--distinguish", nargs="+", default=[], metavar="WORKDIR",
                  help="take distinguishability rows (the dose-response's x-axis) from these "
                       "workdirs too, e.g. a configs/headline.py:distinguish run; a (family, "
                       "behaviour, seed) the rows already have is kept as it is; needs --out")
  ap.add_argument("--out", default=None, help="write the report here (default: WORKDIR)")
  return ap


def main(argv=None):
  """`python -m catchjax.report WORKDIR`: rebuild report.md, summary.csv and figures from
  WORKDIR/results.jsonl (e.g. for a sweep that is still running or was stopped)."""
  import json
  ap = _parser()
  a = ap.parse_args(argv)
  if a.distinguish and not a.out:
    ap.error("--distinguish needs --out: the report with borrowed rows must not overwrite "
             "WORKDIR's own")
  from catchjax.results import ResultStore
  hashes = [h for h in (a.config_hash or "").split(",") if h]
  if (a.pool or len(hashes) > 1) and not a.out:
    ap.error("pooling (--pool, or several --config_hash) needs --out: the pooled report must "
             "not overwrite WORKDIR's own")
  rows = ResultStore(os.path.join(a.workdir, "results.jsonl")).rows
  if hashes:   # one group of rows per hash; the first is WORKDIR's report, the rest pool in
    rows, *groups = [[r for r in rows if r.get("config_hash") == h] for h in hashes]
    if groups and not (rows and all(groups)):
      ap.error(f"--config_hash: no rows for some of {hashes} in {a.workdir}")
  else:
    groups = []
  out_dir = a.out or a.workdir
  # The run's own header (settings, wall time of the invocation that wrote it) when it saved
  # one; the rebuild says so.
  meta = {**load_meta(a.workdir, hashes[0] if hashes else None),
          "rebuilt_from": "results.jsonl", "rows": len(rows)}
  meta.setdefault("title", "catchjax report (rebuilt from results.jsonl)")
  cfg = os.path.join(a.workdir, "config.json")
  if hashes:   # the selected sweep's, not the workdir's latest run's
    meta["config_hash"] = hashes[0]
  elif os.path.isfile(cfg):
    with open(cfg) as f:
      meta["config_hash"] = json.load(f).get("config_hash")
  if a.organisms:
    _check_organism_pool(ap, [a.workdir] + list(a.pool))
  if a.pool or groups:
    rows = pool_rows([rows] + groups + [ResultStore(os.path.join(d, "results.jsonl")).rows
                                        for d in a.pool], organisms=a.organisms)
    meta.update(title="catchjax report (pooled over workdirs)", rows=len(rows),
                pooled=[a.workdir] + list(a.pool), pooled_hashes=hashes or None,
                config_hash=sorted({r.get("config_hash") for r in rows}))
    # The header's settings are the first sweep's: seeds and Ns are what the pooled rows hold,
    # and the first sweep's wall time is labelled as such.
    cells = [r for r in rows if r.get("arm") in TRAIN_ARMS]
    meta.update(seeds=sorted({r["seed"] for r in cells}), ns=sorted({r["n"] for r in cells}),
                commit=sorted({str(r["commit"]) for r in rows if r.get("commit")}) or None)
    for k in ("wall_seconds_this_invocation", "runtime"):
      if k in meta:
        meta[f"{k} (first sweep)"] = meta.pop(k)
    os.makedirs(out_dir, exist_ok=True)
  if a.distinguish:
    rows = rows + borrowed_distinguish_rows(
        rows, [ResultStore(os.path.join(d, "results.jsonl")).rows for d in a.distinguish])
    meta.update(distinguish_from=list(a.distinguish), rows=len(rows))
    os.makedirs(out_dir, exist_ok=True)
  exps = {r.get("experiment") for r in rows}
  mod = None
  if len(exps) == 1 and next(iter(exps)) not in (None, "headline"):
    # An experiment with its own report (e.g. cot, propensity): its module's write_report.
    import importlib
    try:
      mod = importlib.import_module(f"catchjax.experiments.{next(iter(exps))}")
    except ImportError:
      mod = None
  if mod is not None and hasattr(mod, "write_report"):
    out = mod.write_report(rows, out_dir, meta)
  else:
    out = write_report(rows, out_dir, meta)
  print(f"{len(rows)} rows -> {out_dir}/report.md, summary.csv, {len(out['figures'])} figures")


def borrowed_distinguish_rows(rows: list[dict], groups: list[list[dict]]) -> list[dict]:
  """The distinguish rows of `groups` (other workdirs) for the (family, behaviour, seed)s that
  `rows` has none of, first group first: the x-axis of a sweep run without them."""
  have = {(r["family"], r["behaviour"], r["seed"]) for r in rows if r.get("arm") == "distinguish"}
  out = []
  for g in groups:
    for r in g:
      k = (r.get("family"), r.get("behaviour"), r.get("seed"))
      if r.get("arm") == "distinguish" and k not in have:
        have.add(k)
        out.append(r)
  return out


def _check_organism_pool(ap, workdirs: list[str]) -> None:
  """Refuse (one line) pooling workdirs whose resolved configs differ beyond the organism's
  seeds, or that have no config.json to compare."""
  import json
  cfgs = []
  for d in workdirs:
    p = os.path.join(d, "config.json")
    if not os.path.isfile(p):
      ap.error(f"--organisms: {p} is missing: the configs must be compared before pooling")
    with open(p) as f:
      cfgs.append(json.load(f)["config"])
  for d, c in zip(workdirs[1:], cfgs[1:]):
    bad = [x for x in config_differences(cfgs[0], c) if x not in ORGANISM_SEED_FIELDS]
    if bad:
      ap.error(f"--organisms: {d}'s config differs from {workdirs[0]}'s in {bad} (only "
               f"{', '.join(ORGANISM_SEED_FIELDS)} may)")


if __name__ == "__main__":
  main()
