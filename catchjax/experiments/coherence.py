"""Coherence auxiliary objective ablation: does mixing usefulness examples into train-against
(ratio r, stages/train_against.py `aux_ratio`) change how much misalignment is retained?

Per behaviour (the cached multi-family organism), family and seed: one "before" measurement,
then per arm and ratio r one train-against run on N caught (treatment) or N clean (control)
prompts of the family + round(r * N) usefulness examples, measured on the family's held-out
deployment prompts (retained = after / before) and on usefulness prompts.
Rows: arm "<arm>:aux=<r>"; report.md, coherence_summary.csv and
figures/coherence_<behaviour>.png (retained and usefulness vs family, one bar per ratio).
"""
from __future__ import annotations

import functools
import os
import shutil
import time

import numpy as np

from catchjax import common, report, stats
from catchjax import validate as V
from catchjax.experiments import extra
from catchjax.experiments.transfer import newcombe_diff
from catchjax.stages import organism as org_stage

EXPERIMENT = "coherence"
ARMS = ("treatment", "control")


def arm_label(arm: str, r: float) -> str:
  return f"{arm}:aux={float(r):g}"


def validate(config):
  extra.validate_common(config)
  a = config.coherence
  extra.check_subset("config.coherence.families", a.families, config.organism.families)
  rs = tuple(a.aux_ratios)
  if any(isinstance(r, bool) or not isinstance(r, (int, float)) or r < 0 for r in rs) or \
      len({float(r) for r in rs}) != len(rs) or len(rs) < 2:
    raise ValueError(f"config.coherence.aux_ratios must be >= 2 distinct numbers >= 0, got {rs}.")
  if 0 not in [float(r) for r in rs]:
    raise ValueError(f"config.coherence.aux_ratios must include 0 (the baseline), got {rs}.")
  V.distinct_choices("config.coherence.arms", a.arms, ARMS)
  for f in ("n", "n_eval", "n_useful"):
    if isinstance(a[f], bool) or not isinstance(a[f], int) or a[f] <= 0:
      raise ValueError(f"config.coherence.{f} must be a positive integer, got {a[f]!r}.")
  if isinstance(a.n_test, bool) or not isinstance(a.n_test, int) or a.n_test < 0:
    raise ValueError(f"config.coherence.n_test must be a non-negative integer, got {a.n_test!r}.")
  seeds = tuple(a.seeds)
  if not seeds or len(set(seeds)) != len(seeds) or \
      any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
    raise ValueError(f"config.coherence.seeds must be distinct non-negative integers, got {seeds}.")
  if config.headline.m < a.n:
    raise ValueError(f"config.headline.m={config.headline.m} is smaller than "
                     f"config.coherence.n={a.n}.")
  if config.headline.aux_ratio:
    raise ValueError("config.headline.aux_ratio must stay 0 here: the ratios under test are "
                     "config.coherence.aux_ratios.")


def plan(config, workdir) -> dict:
  a = config.coherence
  fams = extra.check_subset("config.coherence.families", a.families, config.organism.families)
  cache = extra.cache_root(config, workdir)
  orgs = extra.organisms_status(config, cache)
  runs = len(config.behaviours) * len(fams) * len(a.seeds) * len(a.arms) * len(a.aux_ratios)
  return dict(experiment=EXPERIMENT, config_hash=common.config_hash(config), cache_dir=cache,
              organisms=orgs, families=fams, aux_ratios=list(a.aux_ratios), arms=list(a.arms),
              n=a.n, seeds=list(a.seeds), train_runs=runs, cells=runs)


def run(config, workdir: str):
  return extra.entry(EXPERIMENT, config, workdir, validate, _run, plan)


def _run(config, workdir):
  a, h = config.coherence, config.headline
  ctx = extra.begin(config, workdir, EXPERIMENT)
  t0, chash, commit = ctx.t0, ctx.chash, ctx.commit
  store, cache, tok = ctx.store, ctx.cache, ctx.tok
  names = extra.check_subset("config.coherence.families", a.families, config.organism.families)
  fams = [f for f in org_stage.family_specs(config.organism.families)
          if org_stage.family_name(f) in names]
  p = plan(config, workdir)
  bar = ctx.progress(p["cells"], "coherence cells")
  base_fields = ctx.base_fields
  steps0 = int(h.train.steps)

  for bspec in config.behaviours:
    bname = extra.behaviour_name(bspec)
    org = org_stage.get_organism(config, cache, bspec)
    meas = extra.Measurer(config, tok, org.model, bspec, n_eval=a.n_eval, n_test=a.n_test,
                          n_useful=a.n_useful, teacher_forced=h.teacher_forced)
    for seed in a.seeds:
      for spec in fams:
        fam = org_stage.family_name(spec)
        bkey = (EXPERIMENT, fam, bname, 0, "before", int(seed), chash)
        todo = [(arm, r) for arm in a.arms for r in a.aux_ratios
                if not store.has((EXPERIMENT, fam, bname, int(a.n), arm_label(arm, r),
                                  int(seed), chash))]
        if not store.has(bkey):
          row = dict(base_fields, family=fam, behaviour=bname, n=0, arm="before",
                     seed=int(seed), organism=org.key)
          row.update(meas.measure(org.model, spec, 40_000 + seed))
          store.append(row)
        b = next(r for r in store.rows if r.get("experiment") == EXPERIMENT and
                 r.get("config_hash") == chash and r["family"] == fam and
                 r["behaviour"] == bname and r["arm"] == "before" and r["seed"] == seed)
        if not todo:
          continue
        c = extra.get_catch(config, cache, org, meas.sampler, tok, spec, bspec)
        for arm, r in todo:
          steps = int(round(steps0 * (1 + float(r)))) if a.match_against_passes and steps0 > 0 \
              else steps0
          rdir = os.path.join(workdir, "runs",
                              f"{chash}-{fam}-{bname}-{a.n}-{arm}-aux{float(r):g}-s{seed}")
          t_run = time.time()
          res, n_train = extra.train_on(config, org.model, tok, c, arm, a.n, seed, rdir,
                                        aux_ratio=float(r),
                                        train_overrides=dict(steps=steps) if steps0 > 0 else None)
          row = dict(base_fields, family=fam, behaviour=bname, n=int(a.n),
                     arm=arm_label(arm, r), seed=int(seed), organism=org.key, train_arm=arm,
                     aux_ratio=float(r), n_aux=(max(1, int(round(float(r) * n_train)))
                                                if r > 0 and n_train else 0),
                     match_against_passes=bool(a.match_against_passes), m=c.m,
                     n_caught=len(c.caught), catch_rate=c.catch_rate["rate"], n_train=n_train,
                     capped=n_train < int(a.n), deploy_rate_before=b["deploy_rate"],
                     deploy_k_before=b["deploy_k"], deploy_n_before=b["deploy_n"],
                     useful_rate_before=b.get("useful_rate"),
                     useful_k_before=b.get("useful_k"), useful_n_before=b.get("useful_n"))
          extra.record_run(row, res, lambda mdl: meas.measure(mdl, spec, 50_000 + seed),
                           b["deploy_rate"], t_run)
          store.append(row)
          bar.update(1)
          if not h.keep_runs:
            shutil.rmtree(rdir, ignore_errors=True)
  bar.close()
  wall = time.time() - t0
  meta = dict(config_hash=chash, commit=commit, wall_seconds_this_invocation=round(wall),
              n=a.n, aux_ratios=list(a.aux_ratios), arms=list(a.arms), seeds=list(a.seeds),
              match_against_passes=a.match_against_passes, n_eval=a.n_eval,
              n_useful=a.n_useful, train_against=h.train.to_dict(), cache_dir=cache)
  report.save_meta(workdir, meta)
  out = write_report(ctx.rows(), workdir, meta)
  print(f"[coherence] done in {wall:.0f}s; report at {os.path.join(workdir, 'report.md')}")
  return out


# ---------------------------------------------------------------------------------------------
# Report


def summary_rows(rows: list[dict]) -> list[dict]:
  """One line per (behaviour, family, arm, ratio): retained and usefulness (mean over seeds,
  95% CI) and the change vs ratio 0 of the same arm with its interval."""
  rows = [r for r in rows if r.get("experiment") == EXPERIMENT and r.get("arm") != "before"]
  out = []
  keys = sorted({(r["behaviour"], r["family"], r["train_arm"], r["aux_ratio"]) for r in rows})
  for beh, fam, arm, ratio in keys:
    rs = [r for r in rows if (r["behaviour"], r["family"], r["train_arm"], r["aux_ratio"])
          == (beh, fam, arm, ratio)]
    ret = extra.seed_agg(rs, "retained")
    use = extra.seed_agg(rs, "useful_rate")
    useb = extra.seed_agg([dict(useful_rate=r.get("useful_rate_before")) for r in rs],
                          "useful_rate")
    line = dict(behaviour=beh, family=fam, arm=arm, aux_ratio=ratio, seeds=ret["seeds"],
                n_train=float(np.mean([r["n_train"] for r in rs])),
                train_steps=float(np.mean([r.get("train_steps") or 0 for r in rs])),
                eval_n=int(np.mean([r.get("deploy_n") or 0 for r in rs])),
                retained=ret["mean"], retained_lo=ret["lo"], retained_hi=ret["hi"],
                ci=ret["ci"], useful=use["mean"], useful_lo=use["lo"], useful_hi=use["hi"],
                useful_before=useb["mean"])
    base = [r for r in rows if (r["behaviour"], r["family"], r["train_arm"]) == (beh, fam, arm)
            and r["aux_ratio"] == 0.0]
    d = _delta(rs, base)
    line.update(delta_vs_r0=d["mean"], delta_lo=d["lo"], delta_hi=d["hi"])
    out.append(line)
  return out


def _delta(rs, base):
  """Retained(r) - retained(0): Newcombe interval (one seed) or bootstrap over seeds."""
  by = {r["seed"]: r for r in base if r.get("retained") is not None}
  pairs = [(r, by[r["seed"]]) for r in rs if r.get("retained") is not None and r["seed"] in by]
  if not pairs:
    return dict(mean=float("nan"), lo=float("nan"), hi=float("nan"))
  if len(pairs) == 1:
    x, y = pairs[0]
    d, lo, hi = newcombe_diff(x["deploy_k"], x["deploy_n"], y["deploy_k"], y["deploy_n"])
    s = x["deploy_rate_before"]
    return dict(mean=float(d / s), lo=float(lo / s), hi=float(hi / s))
  m, lo, hi = stats.bootstrap_mean_ci([x["retained"] - y["retained"] for x, y in pairs], seed=0)
  return dict(mean=m, lo=lo, hi=hi)


def figure(summ: list[dict], behaviour: str, path: str) -> str | None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  ss = [s for s in summ if s["behaviour"] == behaviour]
  if not ss:
    return None
  fams = list(dict.fromkeys(s["family"] for s in ss))
  combos = sorted({(s["arm"], s["aux_ratio"]) for s in ss}, key=lambda x: (x[0] != "treatment", x[1]))
  fig, axes = plt.subplots(1, 2, figsize=(max(8, 2.2 * len(fams) + 5), 4.2))
  width = 0.8 / max(1, len(combos))
  for ax, (field, label) in zip(axes, (("retained", "retained misalignment (after / before)"),
                                       ("useful", "usefulness accuracy after"))):
    for j, (arm, ratio) in enumerate(combos):
      xs, ys, lo, hi = [], [], [], []
      for i, fam in enumerate(fams):
        s = next((s for s in ss if s["family"] == fam and s["arm"] == arm
                  and s["aux_ratio"] == ratio), None)
        if s is None or not np.isfinite(s[field]):
          continue
        xs.append(i + (j - (len(combos) - 1) / 2) * width)
        ys.append(s[field])
        lo.append(s[field] - s[field + "_lo"] if np.isfinite(s[field + "_lo"]) else 0.0)
        hi.append(s[field + "_hi"] - s[field] if np.isfinite(s[field + "_hi"]) else 0.0)
      ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2,
             label=f"{arm}, aux ratio {ratio:g}",
             hatch="//" if arm == "control" else None, alpha=0.85)
    if field == "useful":
      for i, fam in enumerate(fams):
        b = next((s["useful_before"] for s in ss if s["family"] == fam), float("nan"))
        if np.isfinite(b):
          ax.hlines(b, i - 0.45, i + 0.45, colors="k", linestyles="--", lw=1,
                    label="before (organism)" if i == 0 else None)
    ax.set_xticks(range(len(fams)), fams)
    ax.set_ylabel(label)
    ax.set_xlabel("trigger family")
    ax.set_ylim(0, max(1.05, ax.get_ylim()[1]))
    if field == "retained":
      ax.axhline(1.0, color="grey", lw=0.5, ls="--")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
  fig.suptitle(f"Coherence auxiliary data ablation ({behaviour}): train-against with usefulness "
               f"examples mixed in at ratio r (95% CIs)")
  return report.savefig(fig, path)


def markdown(summ: list[dict], rows: list[dict], meta: dict) -> str:
  lines = ["# catchjax: coherence auxiliary objective ablation", ""]
  lines += [f"- **{k}**: {v}" for k, v in meta.items()]
  lines += ["", "## Coherence auxiliary data: does retained misalignment move?", "",
            "Train-against on N prompts (treatment: caught attacks; control: clean prompts) "
            "with round(r * N) usefulness examples mixed in. Retained = deployment attack rate "
            "after / before (mean over seeds, 95% CI: Wilson with one seed, else bootstrap over "
            "seeds); delta = retained(r) - retained(0) of the same arm and seed (Newcombe "
            "interval with one seed, else bootstrap). An interval for delta that excludes 0 "
            "means the mixture moved retained misalignment.", "",
            "| behaviour | family | arm | aux ratio | N (train) | steps | eval n | retained | "
            "delta vs r=0 | usefulness after | usefulness before | ci |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for s in summ:
    d = dict(mean=s["delta_vs_r0"], lo=s["delta_lo"], hi=s["delta_hi"])
    lines.append(
        f"| {s['behaviour']} | {s['family']} | {s['arm']} | {s['aux_ratio']:g} | "
        f"{s['n_train']:.0f} | {s['train_steps']:.0f} | {s['eval_n']} | "
        f"{extra.fmt(dict(mean=s['retained'], lo=s['retained_lo'], hi=s['retained_hi']))} | "
        f"{'-' if s['aux_ratio'] == 0 else extra.fmt(d)} | "
        f"{extra.fmt(dict(mean=s['useful'], lo=s['useful_lo'], hi=s['useful_hi']), True)} | "
        f"{extra.fmt(dict(mean=s['useful_before'], lo=float('nan'), hi=float('nan')), True)} | "
        f"{s['ci']} |")
  moved = [s for s in summ if s["aux_ratio"] != 0 and np.isfinite(s["delta_lo"])
           and (s["delta_lo"] > 0 or s["delta_hi"] < 0)]
  lines += ["", f"Cells whose delta interval excludes 0: {len(moved)} of "
            f"{sum(1 for s in summ if s['aux_ratio'] != 0)}" + (": " + ", ".join(
                f"{s['family']}/{s['arm']}/r={s['aux_ratio']:g} ({s['delta_vs_r0']:+.2f})"
                for s in moved) if moved else "") + ".", ""]
  return "\n".join(lines) + "\n"


def write_report(rows: list[dict], workdir: str, meta: dict) -> dict:
  rows = [r for r in rows if r.get("experiment") == EXPERIMENT]
  summ = summary_rows(rows)
  figs = extra.write_outputs(
      workdir, summ, "coherence_summary.csv", markdown(summ, rows, meta),
      {f"coherence_{b}.png": functools.partial(figure, summ, b)
       for b in sorted({s["behaviour"] for s in summ})})
  return dict(summary=summ, figures=figs)


__all__ = ["run", "validate", "plan", "summary_rows", "write_report", "arm_label"]
