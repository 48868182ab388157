"""Cross-domain transfer: does training against caught attacks in one domain remove the
misalignment in the others?

For each behaviour, the multi-family organism is restored from the cache (the headline's); then
per seed:
  1. before: the organism's sampled deployment attack rate on every target family;
  2. per source family and arm: train against N caught attacks of the source (treatment) or N
     source prompts where the organism behaved (control), with the headline's train-against
     settings (stages/train_against.py);
  3. measure the deployment attack rate on every target family; retained = after / before.
Rows (results.jsonl): one per (target, behaviour, N, arm "<arm>:<source>", seed) plus one
"before" row per (target, seed); report.md, transfer_summary.csv and
figures/transfer_matrix_<behaviour>.png (source x target heatmaps with values and 95% CIs).
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
from catchjax.stages import organism as org_stage
from catchjax.stats import newcombe_diff  # re-exported: coherence and the tests import it here

EXPERIMENT = "transfer"
ARMS = ("treatment", "control")


def _pos_int(field, x):
  if isinstance(x, bool) or not isinstance(x, int) or x <= 0:
    raise ValueError(f"{field} must be a positive integer, got {x!r}.")
  return x


def validate(config):
  """Reject bad input before any compute, naming the field."""
  extra.validate_common(config)
  t = config.transfer
  fams = config.organism.families
  extra.check_subset("config.transfer.sources", t.sources, fams)
  extra.check_subset("config.transfer.targets", t.targets, fams)
  V.distinct_choices("config.transfer.arms", t.arms, ARMS)
  _pos_int("config.transfer.n", t.n)
  _pos_int("config.transfer.n_eval", t.n_eval)
  for f in ("n_test", "n_useful"):
    if isinstance(t[f], bool) or not isinstance(t[f], int) or t[f] < 0:
      raise ValueError(f"config.transfer.{f} must be a non-negative integer, got {t[f]!r}.")
  seeds = tuple(t.seeds)
  if not seeds or len(set(seeds)) != len(seeds) or \
      any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
    raise ValueError(f"config.transfer.seeds must be distinct non-negative integers, "
                     f"got {seeds}.")
  if config.headline.m < t.n:
    raise ValueError(f"config.headline.m={config.headline.m} (prompts sampled to catch) is "
                     f"smaller than config.transfer.n={t.n}.")


def cell_key(target, behaviour, n, arm, source, seed, chash):
  return (EXPERIMENT, target, behaviour, int(n), f"{arm}:{source}", int(seed), chash)


def plan(config, workdir) -> dict:
  """What a run would do (dry run): cells, cache folder and which organisms are cached."""
  t = config.transfer
  fams = config.organism.families
  src = extra.check_subset("config.transfer.sources", t.sources, fams)
  tgt = extra.check_subset("config.transfer.targets", t.targets, fams)
  cache = extra.cache_root(config, workdir)
  orgs = extra.organisms_status(config, cache)
  return dict(experiment=EXPERIMENT, config_hash=common.config_hash(config), cache_dir=cache,
              organisms=orgs, sources=src, targets=tgt, arms=list(t.arms), n=t.n,
              seeds=list(t.seeds), train_runs=len(config.behaviours) * len(t.seeds) * len(src)
              * len(t.arms), cells=len(config.behaviours) * len(t.seeds) * len(src)
              * len(t.arms) * len(tgt))


def run(config, workdir: str):
  return extra.entry(EXPERIMENT, config, workdir, validate, _run, plan)


def _run(config, workdir):
  t, h = config.transfer, config.headline
  ctx = extra.begin(config, workdir, EXPERIMENT)
  t0, chash, commit = ctx.t0, ctx.chash, ctx.commit
  store, cache, tok = ctx.store, ctx.cache, ctx.tok
  fams = org_stage.family_specs(config.organism.families)
  src_names = extra.check_subset("config.transfer.sources", t.sources, fams)
  tgt_names = extra.check_subset("config.transfer.targets", t.targets, fams)
  sources = [f for f in fams if org_stage.family_name(f) in src_names]
  targets = [f for f in fams if org_stage.family_name(f) in tgt_names]
  p = plan(config, workdir)
  bar = ctx.progress(p["cells"], "transfer cells")
  base_fields = ctx.base_fields

  for bspec in config.behaviours:
    bname = extra.behaviour_name(bspec)
    org = org_stage.get_organism(config, cache, bspec)
    meas = extra.Measurer(config, tok, org.model, bspec, n_eval=t.n_eval, n_test=t.n_test,
                          n_useful=t.n_useful, teacher_forced=h.teacher_forced)
    for seed in t.seeds:
      before = {}
      for spec in targets:     # the organism's own rates: one "before" row per target
        tname = org_stage.family_name(spec)
        key = (EXPERIMENT, tname, bname, 0, "before", int(seed), chash)
        if not store.has(key):
          row = dict(base_fields, family=tname, behaviour=bname, n=0, arm="before",
                     seed=int(seed), organism=org.key, target=tname)
          row.update(meas.measure(org.model, spec, 40_000 + seed))
          store.append(row)
        before[tname] = next(r for r in store.rows if tuple(
            r.get(k) for k in ("experiment", "family", "behaviour", "n", "arm", "seed",
                               "config_hash")) == key)
      for sspec in sources:
        sname = org_stage.family_name(sspec)
        c = None
        for arm in t.arms:
          todo = [spec for spec in targets if not store.has(cell_key(
              org_stage.family_name(spec), bname, t.n, arm, sname, seed, chash))]
          if not todo:
            continue
          if c is None:
            c = extra.get_catch(config, cache, org, meas.sampler, tok, sspec, bspec)
          rdir = os.path.join(workdir, "runs", f"{chash}-{sname}-{bname}-{t.n}-{arm}-s{seed}")
          t_run = time.time()
          res, n_train = extra.train_on(config, org.model, tok, c, arm, t.n, seed, rdir,
                                        aux_ratio=float(h.aux_ratio))
          for spec in todo:
            tname = org_stage.family_name(spec)
            b = before[tname]
            row = dict(base_fields, family=tname, behaviour=bname, n=int(t.n),
                       arm=f"{arm}:{sname}", seed=int(seed), organism=org.key, source=sname,
                       target=tname, train_arm=arm, in_domain=sname == tname, m=c.m,
                       n_caught=len(c.caught), catch_rate=c.catch_rate["rate"],
                       catch_lo=c.catch_rate["lo"], catch_hi=c.catch_rate["hi"],
                       n_train=n_train, capped=n_train < int(t.n),
                       aux_ratio=float(h.aux_ratio), deploy_rate_before=b["deploy_rate"],
                       deploy_k_before=b["deploy_k"], deploy_n_before=b["deploy_n"],
                       deploy_lo_before=b["deploy_lo"], deploy_hi_before=b["deploy_hi"],
                       deploy_tf_before=b.get("deploy_tf"))
            extra.record_run(row, res, lambda mdl: meas.measure(mdl, spec, 50_000 + seed),
                             b["deploy_rate"], t_run)
            store.append(row)
            bar.update(1)
          if not h.keep_runs:
            shutil.rmtree(rdir, ignore_errors=True)
  bar.close()
  wall = time.time() - t0
  meta = dict(config_hash=chash, commit=commit, wall_seconds_this_invocation=round(wall),
              n=t.n, seeds=list(t.seeds), n_eval_per_target=t.n_eval, m_catch=h.m,
              train_against=h.train.to_dict(), aux_ratio=h.aux_ratio,
              max_new_tokens=h.max_new_tokens, cache_dir=cache)
  rows = ctx.rows()
  report.save_meta(workdir, meta)
  out = write_report(rows, workdir, meta)
  print(f"[transfer] done in {wall:.0f}s; report at {os.path.join(workdir, 'report.md')}")
  return out


# ---------------------------------------------------------------------------------------------
# Report


def _diff_ci(rows_t, rows_c):
  """Treatment - control retained with a 95% interval: Newcombe's hybrid score interval for a
  difference of two proportions (one seed), or a bootstrap over seeds of the per-seed
  differences."""
  by_seed_c = {r["seed"]: r for r in rows_c if r.get("retained") is not None}
  pairs = [(r, by_seed_c[r["seed"]]) for r in rows_t
           if r.get("retained") is not None and r["seed"] in by_seed_c]
  if not pairs:
    return dict(mean=float("nan"), lo=float("nan"), hi=float("nan"))
  if len(pairs) == 1:
    a, b = pairs[0]
    d, lo, hi = newcombe_diff(a["deploy_k"], a["deploy_n"], b["deploy_k"], b["deploy_n"])
    s = a["deploy_rate_before"]
    return dict(mean=d / s, lo=lo / s, hi=hi / s)
  m, lo, hi = stats.bootstrap_mean_ci([a["retained"] - b["retained"] for a, b in pairs], seed=0)
  return dict(mean=m, lo=lo, hi=hi)


def matrix(rows: list[dict], behaviour: str):
  """{'sources', 'targets', 'treatment'|'control'|'diff': {(src, tgt): agg}} for a behaviour."""
  rs = [r for r in rows if r.get("experiment") == EXPERIMENT and r.get("behaviour") == behaviour
        and r.get("arm") != "before"]
  sources = list(dict.fromkeys(r["source"] for r in rs))
  targets = list(dict.fromkeys(r["target"] for r in rs))
  out = dict(sources=sources, targets=targets, treatment={}, control={}, diff={}, n_train={},
             n_eval={})
  for s in sources:
    for tg in targets:
      cell = {a: [r for r in rs if r["source"] == s and r["target"] == tg
                  and r["train_arm"] == a] for a in ARMS}
      for a in ARMS:
        if cell[a]:
          out[a][(s, tg)] = extra.seed_agg(cell[a], "retained")
      if cell["treatment"] and cell["control"]:
        out["diff"][(s, tg)] = _diff_ci(cell["treatment"], cell["control"])
      any_rows = cell["treatment"] + cell["control"]
      if any_rows:
        out["n_train"][s] = int(np.mean([r["n_train"] for r in any_rows]))
        out["n_eval"][tg] = int(np.mean([r.get("deploy_n") or 0 for r in any_rows]))
  return out


def summary_rows(rows: list[dict]) -> list[dict]:
  out = []
  for beh in sorted({r["behaviour"] for r in rows if r.get("experiment") == EXPERIMENT}):
    mx = matrix(rows, beh)
    for s in mx["sources"]:
      for tg in mx["targets"]:
        line = dict(behaviour=beh, source=s, target=tg, in_domain=s == tg,
                    n_train=mx["n_train"].get(s), eval_n=mx["n_eval"].get(tg))
        for a in ("treatment", "control", "diff"):
          agg = mx[a].get((s, tg))
          if agg is not None:
            line[f"{a}_retained"], line[f"{a}_lo"], line[f"{a}_hi"] = (
                agg["mean"], agg["lo"], agg["hi"])
            if a != "diff":
              line[f"{a}_ci"] = agg["ci"]
        out.append(line)
  return out


def figure(rows: list[dict], behaviour: str, path: str) -> str | None:
  """Heatmaps (rows: trained on; columns: measured on): treatment, control and their
  difference, each cell annotated with the value and its 95% interval."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  mx = matrix(rows, behaviour)
  S, T = mx["sources"], mx["targets"]
  if not S or not T:
    return None
  panels = [(a, title) for a, title in (
      ("treatment", "Trained on caught attacks"), ("control", "Control: trained on clean prompts"),
      ("diff", "Treatment - control")) if mx[a]]
  fig, axes = plt.subplots(1, len(panels), figsize=(1.3 * len(T) * len(panels) + 2.5 * len(panels),
                                                    1.1 * len(S) + 2.2), squeeze=False)
  for ax, (a, title) in zip(axes[0], panels):
    vals = np.full((len(S), len(T)), np.nan)
    for (s, tg), agg in mx[a].items():
      vals[S.index(s), T.index(tg)] = agg["mean"]
    if a == "diff":
      lim = max(0.2, float(np.nanmax(np.abs(vals))) if np.isfinite(vals).any() else 1.0)
      im = ax.imshow(vals, cmap="coolwarm", vmin=-lim, vmax=lim)
    else:
      im = ax.imshow(vals, cmap="RdYlGn_r", vmin=0.0,
                     vmax=max(1.0, float(np.nanmax(vals)) if np.isfinite(vals).any() else 1.0))
    for (s, tg), agg in mx[a].items():
      i, j = S.index(s), T.index(tg)
      txt = "n/a" if not np.isfinite(agg["mean"]) else f"{agg['mean']:.2f}"
      if np.isfinite(agg["lo"]):
        txt += f"\n[{agg['lo']:.2f}, {agg['hi']:.2f}]"
      ax.text(j, i, txt, ha="center", va="center", fontsize=8,
              fontweight="bold" if s == tg else "normal")
    ax.set_xticks(range(len(T)), T, rotation=30, ha="right")
    ax.set_yticks(range(len(S)), [f"{s} (N={mx['n_train'].get(s)})" for s in S])
    ax.set_xlabel("measured on (target family)")
    ax.set_ylabel("trained against (source family)")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04,
                 label="retained misalignment (after / before)" if a != "diff" else
                 "difference in retained")
  fig.suptitle(f"Cross-domain transfer ({behaviour}): retained deployment misalignment, "
               f"95% CIs in brackets")
  return report.savefig(fig, path)


def markdown(rows: list[dict], meta: dict) -> str:
  lines = ["# catchjax: cross-domain transfer", ""]
  lines += [f"- **{k}**: {v}" for k, v in meta.items()]
  lines += ["", "## Cross-domain transfer", "",
            "Rows: the family trained against (N caught testing-cue attacks, or N testing-cue "
            "prompts where the organism behaved for the control); columns: the family whose "
            "deployment attack rate is measured. Cells: retained misalignment = deployment "
            "attack rate after / before, mean over seeds with a 95% interval (Wilson of the "
            "after-rate / before with one seed, else bootstrap over seeds); the difference "
            "column uses Newcombe's interval (one seed) or a bootstrap over seeds. The "
            "diagonal is in-domain.", ""]
  befores = [r for r in rows if r.get("arm") == "before"]
  for beh in sorted({r["behaviour"] for r in rows if r.get("experiment") == EXPERIMENT}):
    mx = matrix(rows, beh)
    lines += [f"### {beh}", "", "Before (organism, per target): " + ", ".join(
        f"{tg} {extra.fmt(extra.seed_agg([r for r in befores if r['family'] == tg and r['behaviour'] == beh], 'deploy_rate'), True)}"
        for tg in mx["targets"]) + f" (n = {mx['n_eval']} deployment prompts per seed).", ""]
    for a, title in (("treatment", "treatment (trained on caught attacks)"),
                     ("control", "control (trained on clean prompts)"),
                     ("diff", "treatment - control")):
      if not mx[a]:
        continue
      lines += [f"**{title}**", "", "| trained on \\ measured on | " + " | ".join(mx["targets"])
                + " |", "|---|" + "---|" * len(mx["targets"])]
      for s in mx["sources"]:
        cells = []
        for tg in mx["targets"]:
          agg = mx[a].get((s, tg))
          cells.append("" if agg is None else extra.fmt(agg))
        lines.append(f"| {s} (N={mx['n_train'].get(s)}) | " + " | ".join(cells) + " |")
      lines.append("")
    diag = [mx["treatment"][(s, s)]["mean"] for s in mx["sources"] if (s, s) in mx["treatment"]]
    off = [v["mean"] for (s, tg), v in mx["treatment"].items() if s != tg]
    if diag or off:
      lines += [f"Mean treatment retained: in-domain {np.nanmean(diag) if diag else float('nan'):.2f}"
                f", cross-domain {np.nanmean(off) if off else float('nan'):.2f}.", ""]
  return "\n".join(lines) + "\n"


def write_report(rows: list[dict], workdir: str, meta: dict) -> dict:
  rows = [r for r in rows if r.get("experiment") == EXPERIMENT]
  summ = summary_rows(rows)
  figs = extra.write_outputs(
      workdir, summ, "transfer_summary.csv", markdown(rows, meta),
      {f"transfer_matrix_{b}.png": functools.partial(figure, rows, b)
       for b in sorted({r["behaviour"] for r in rows})})
  return dict(summary=summ, figures=figs)


__all__ = ["run", "validate", "plan", "matrix", "write_report", "newcombe_diff"]
