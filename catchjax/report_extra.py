"""The extra experiments' report sections: tables, report.md and figures from their rows.

* transfer (experiments/transfer.py): source x target matrices of retained misalignment,
  treatment, control and their difference (`transfer_matrix`, `write_transfer`);
* coherence (experiments/coherence.py): retained and usefulness per (family, arm, aux ratio)
  and the change against ratio 0 (`coherence_summary`, `write_coherence`);
* long_trained (experiments/long_trained.py): the removal cost per organism budget
  (`removal_cost`, `write_long_trained`).

Seed-level summaries (`seed_agg`): the bootstrap 95% interval over seeds, or with one seed the
run's own Wilson interval (never a degenerate bootstrap); paired differences (`paired_diff`):
Newcombe's interval with one seed, else the bootstrap over seeds.
"""
from __future__ import annotations

import functools
import os

import numpy as np

from catchjax import common, report, stats
from catchjax.stats import newcombe_diff

NAN = float("nan")


def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


# ---------------------------------------------------------------------------------------------
# Shared


def seed_agg(rows: list[dict], field: str) -> dict:
  """Mean of `field` over seeds with a 95% interval: bootstrap over seeds (>= 2 rows with a
  value), else the one run's own interval (`field`_lo/_hi, Wilson)."""
  vals = [r[field] for r in rows if r.get(field) is not None and np.isfinite(r[field])]
  if not vals:
    return dict(mean=NAN, lo=NAN, hi=NAN, seeds=0, ci="n/a")
  if len(vals) == 1:
    r = next(r for r in rows if r.get(field) is not None)
    stem = field[:-len("_rate")] if field.endswith("_rate") else field   # deploy_rate: deploy_lo
    lo = r.get(field + "_lo", r.get(stem + "_lo"))
    hi = r.get(field + "_hi", r.get(stem + "_hi"))
    if lo is None or hi is None:
      return dict(mean=float(vals[0]), lo=NAN, hi=NAN, seeds=1, ci="n/a")
    return dict(mean=float(vals[0]), lo=float(lo), hi=float(hi), seeds=1, ci="wilson (1 seed)")
  m, lo, hi = stats.bootstrap_mean_ci(vals, seed=0)
  return dict(mean=float(m), lo=float(lo), hi=float(hi), seeds=len(vals),
              ci=f"bootstrap over {len(vals)} seeds")


def fmt(a: dict, pct: bool = False) -> str:
  if not np.isfinite(a["mean"]):
    return "n/a"
  if not np.isfinite(a["lo"]):
    return f"{100 * a['mean']:.1f}%" if pct else f"{a['mean']:.2f}"
  if pct:
    return f"{100 * a['mean']:.1f}% [{100 * a['lo']:.1f}, {100 * a['hi']:.1f}]"
  return f"{a['mean']:.2f} [{a['lo']:.2f}, {a['hi']:.2f}]"


def paired_diff(rows_a: list[dict], rows_b: list[dict]) -> dict:
  """Retained(a) - retained(b), paired by seed, with a 95% interval: Newcombe's hybrid score
  interval for a difference of two proportions (one seed, scaled by the rate before), or a
  bootstrap over seeds of the per-seed differences."""
  by_seed = {r["seed"]: r for r in rows_b if r.get("retained") is not None}
  pairs = [(r, by_seed[r["seed"]]) for r in rows_a
           if r.get("retained") is not None and r["seed"] in by_seed]
  if not pairs:
    return dict(mean=NAN, lo=NAN, hi=NAN)
  if len(pairs) == 1:
    a, b = pairs[0]
    d, lo, hi = newcombe_diff(a["deploy_k"], a["deploy_n"], b["deploy_k"], b["deploy_n"])
    s = a["deploy_rate_before"]
    return dict(mean=float(d / s), lo=float(lo / s), hi=float(hi / s))
  m, lo, hi = stats.bootstrap_mean_ci([a["retained"] - b["retained"] for a, b in pairs], seed=0)
  return dict(mean=m, lo=lo, hi=hi)


def write_outputs(workdir: str, table: list[dict], csv_name: str, md_text: str,
                  figures: dict) -> list[str]:
  """An experiment's report files, written by process 0 only: `csv_name` (the summary table),
  report.md, and figures/NAME for each NAME -> fn(path) in `figures` (fn returns the path, or
  None when it had nothing to draw). Returns the figure paths written."""
  if not common.is_main_process():   # multi-host: process 0 writes
    return []
  report.write_csv(table, os.path.join(workdir, csv_name))
  common.atomic_write_text(os.path.join(workdir, "report.md"), md_text)
  out = []
  for name, fn in figures.items():
    p = fn(os.path.join(workdir, "figures", name))
    if p:
      out.append(p)
  return out


def _write(workdir: str, table: list[dict], csv_name: str, md_lines: list[str], figure, data,
           stem: str) -> list[str]:
  """write_outputs of report.md's lines with one figure per behaviour of `data`:
  figures/<stem>_<behaviour>.png drawn by figure(data, behaviour, path)."""
  return write_outputs(workdir, table, csv_name, "\n".join(md_lines) + "\n",
                       {f"{stem}_{b}.png": functools.partial(figure, data, b)
                        for b in _behaviours(data)})


def _header(title: str, meta: dict, section: str, intro: str) -> list[str]:
  """report.md's title, the run's settings, and the section's heading and intro."""
  return ([f"# catchjax: {title}", ""] + [f"- **{k}**: {v}" for k, v in meta.items()]
          + ["", f"## {section}", "", " ".join(intro.split()), ""])


def _behaviours(rows: list[dict]) -> list[str]:
  return sorted({r["behaviour"] for r in rows})


# ---------------------------------------------------------------------------------------------
# Transfer

TRANSFER_ARMS = ("treatment", "control")
TRANSFER_INTRO = """Rows: the family trained against (N caught testing-cue attacks, or N testing-cue
prompts where the organism behaved for the control); columns: the family whose deployment
attack rate is measured. Cells: retained misalignment = deployment attack rate after /
before, mean over seeds with a 95% interval (Wilson of the after-rate / before with one seed,
else bootstrap over seeds); the difference column uses Newcombe's interval (one seed) or a
bootstrap over seeds. The diagonal is in-domain."""
TRANSFER_PANELS = (("treatment", "treatment (trained on caught attacks)",
                    "Trained on caught attacks"),
                   ("control", "control (trained on clean prompts)",
                    "Control: trained on clean prompts"),
                   ("diff", "treatment - control", "Treatment - control"))


def transfer_matrix(rows: list[dict], behaviour: str) -> dict:
  """{'sources', 'targets', 'treatment'|'control'|'diff': {(src, tgt): agg}} for a behaviour."""
  rs = [r for r in rows if r.get("experiment") == "transfer" and r.get("behaviour") == behaviour
        and r.get("arm") != "before"]
  sources = list(dict.fromkeys(r["source"] for r in rs))
  targets = list(dict.fromkeys(r["target"] for r in rs))
  out = dict(sources=sources, targets=targets, treatment={}, control={}, diff={}, n_train={},
             n_eval={})
  for s in sources:
    for tg in targets:
      cell = {a: [r for r in rs if r["source"] == s and r["target"] == tg
                  and r["train_arm"] == a] for a in TRANSFER_ARMS}
      for a in TRANSFER_ARMS:
        if cell[a]:
          out[a][(s, tg)] = seed_agg(cell[a], "retained")
      if cell["treatment"] and cell["control"]:
        out["diff"][(s, tg)] = paired_diff(cell["treatment"], cell["control"])
      any_rows = cell["treatment"] + cell["control"]
      if any_rows:
        out["n_train"][s] = int(np.mean([r["n_train"] for r in any_rows]))
        out["n_eval"][tg] = int(np.mean([r.get("deploy_n") or 0 for r in any_rows]))
  return out


def transfer_summary(rows: list[dict]) -> list[dict]:
  out = []
  for beh in _behaviours(rows):
    mx = transfer_matrix(rows, beh)
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


def _heatmap(ax, mx: dict, a: str):
  """One panel of the transfer figure: arm `a`'s matrix, each cell with its value and CI."""
  S, T = mx["sources"], mx["targets"]
  vals = np.full((len(S), len(T)), np.nan)
  for (s, tg), agg in mx[a].items():
    vals[S.index(s), T.index(tg)] = agg["mean"]
  top = float(np.nanmax(np.abs(vals))) if np.isfinite(vals).any() else 1.0
  im = (ax.imshow(vals, cmap="coolwarm", vmin=-max(0.2, top), vmax=max(0.2, top)) if a == "diff"
        else ax.imshow(vals, cmap="RdYlGn_r", vmin=0.0, vmax=max(1.0, top)))
  for (s, tg), agg in mx[a].items():
    txt = "n/a" if not np.isfinite(agg["mean"]) else f"{agg['mean']:.2f}"
    if np.isfinite(agg["lo"]):
      txt += f"\n[{agg['lo']:.2f}, {agg['hi']:.2f}]"
    ax.text(T.index(tg), S.index(s), txt, ha="center", va="center", fontsize=8,
            fontweight="bold" if s == tg else "normal")
  ax.set_xticks(range(len(T)), T, rotation=30, ha="right")
  ax.set_yticks(range(len(S)), [f"{s} (N={mx['n_train'].get(s)})" for s in S])
  ax.set_xlabel("measured on (target family)")
  ax.set_ylabel("trained against (source family)")
  return im


def transfer_figure(rows: list[dict], behaviour: str, path: str) -> str | None:
  """Heatmaps (rows: trained on; columns: measured on): treatment, control and their
  difference, each cell annotated with the value and its 95% interval."""
  plt = _plt()
  mx = transfer_matrix(rows, behaviour)
  S, T = mx["sources"], mx["targets"]
  if not S or not T:
    return None
  panels = [(a, title) for a, _, title in TRANSFER_PANELS if mx[a]]
  fig, axes = plt.subplots(1, len(panels), figsize=(1.3 * len(T) * len(panels) + 2.5 * len(panels),
                                                    1.1 * len(S) + 2.2), squeeze=False)
  for ax, (a, title) in zip(axes[0], panels):
    im = _heatmap(ax, mx, a)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04,
                 label="retained misalignment (after / before)" if a != "diff" else
                 "difference in retained")
  fig.suptitle(f"Cross-domain transfer ({behaviour}): retained deployment misalignment, "
               f"95% CIs in brackets")
  return report.savefig(fig, path)


def _transfer_section(rows: list[dict], beh: str) -> list[str]:
  mx = transfer_matrix(rows, beh)
  befores = [r for r in rows if r.get("arm") == "before" and r["behaviour"] == beh]
  lines = [f"### {beh}", "", "Before (organism, per target): " + ", ".join(
      f"{tg} {fmt(seed_agg([r for r in befores if r['family'] == tg], 'deploy_rate'), True)}"
      for tg in mx["targets"]) + f" (n = {mx['n_eval']} deployment prompts per seed).", ""]
  for a, title, _ in TRANSFER_PANELS:
    if not mx[a]:
      continue
    lines += [f"**{title}**", "", "| trained on \\ measured on | " + " | ".join(mx["targets"])
              + " |", "|---|" + "---|" * len(mx["targets"])]
    for s in mx["sources"]:
      cells = ["" if mx[a].get((s, tg)) is None else fmt(mx[a][(s, tg)]) for tg in mx["targets"]]
      lines.append(f"| {s} (N={mx['n_train'].get(s)}) | " + " | ".join(cells) + " |")
    lines.append("")
  diag = [mx["treatment"][(s, s)]["mean"] for s in mx["sources"] if (s, s) in mx["treatment"]]
  off = [v["mean"] for (s, tg), v in mx["treatment"].items() if s != tg]
  if diag or off:
    lines += [f"Mean treatment retained: in-domain {np.nanmean(diag) if diag else NAN:.2f}"
              f", cross-domain {np.nanmean(off) if off else NAN:.2f}.", ""]
  return lines


def transfer_markdown(rows: list[dict], meta: dict) -> list[str]:
  lines = _header("cross-domain transfer", meta, "Cross-domain transfer", TRANSFER_INTRO)
  for beh in _behaviours(rows):
    lines += _transfer_section(rows, beh)
  return lines


def write_transfer(rows: list[dict], workdir: str, meta: dict) -> dict:
  rows = [r for r in rows if r.get("experiment") == "transfer"]
  summ = transfer_summary(rows)
  return dict(summary=summ, figures=_write(workdir, summ, "transfer_summary.csv", transfer_markdown(
      rows, meta), transfer_figure, rows, "transfer_matrix"))


# ---------------------------------------------------------------------------------------------
# Coherence


COHERENCE_INTRO = """Train-against on N prompts (treatment: caught attacks; control: clean
prompts) with round(r * N) usefulness examples mixed in. Retained = deployment attack rate
after / before (mean over seeds, 95% CI: Wilson with one seed, else bootstrap over seeds);
delta = retained(r) - retained(0) of the same arm and seed (Newcombe interval with one seed,
else bootstrap). An interval for delta that excludes 0 means the mixture moved retained
misalignment."""


def coherence_summary(rows: list[dict]) -> list[dict]:
  """One line per (behaviour, family, arm, ratio): retained and usefulness (mean over seeds,
  95% CI) and the change vs ratio 0 of the same arm with its interval."""
  rows = [r for r in rows if r.get("experiment") == "coherence" and r.get("arm") != "before"]
  group = lambda r: (r["behaviour"], r["family"], r["train_arm"], r["aux_ratio"])  # noqa: E731
  out = []
  for beh, fam, arm, ratio in sorted({group(r) for r in rows}):
    rs = [r for r in rows if group(r) == (beh, fam, arm, ratio)]
    ret, use = seed_agg(rs, "retained"), seed_agg(rs, "useful_rate")
    useb = seed_agg([dict(useful_rate=r.get("useful_rate_before")) for r in rs], "useful_rate")
    d = paired_diff(rs, [r for r in rows if group(r) == (beh, fam, arm, 0.0)])
    out.append(dict(behaviour=beh, family=fam, arm=arm, aux_ratio=ratio, seeds=ret["seeds"],
                    n_train=float(np.mean([r["n_train"] for r in rs])),
                    train_steps=float(np.mean([r.get("train_steps") or 0 for r in rs])),
                    eval_n=int(np.mean([r.get("deploy_n") or 0 for r in rs])),
                    retained=ret["mean"], retained_lo=ret["lo"], retained_hi=ret["hi"],
                    ci=ret["ci"], useful=use["mean"], useful_lo=use["lo"], useful_hi=use["hi"],
                    useful_before=useb["mean"], delta_vs_r0=d["mean"], delta_lo=d["lo"],
                    delta_hi=d["hi"]))
  return out


def _coherence_bars(ax, ss: list[dict], fams: list[str], combos: list, field: str) -> None:
  width = 0.8 / max(1, len(combos))
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
    ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=f"{arm}, aux ratio {ratio:g}",
           hatch="//" if arm == "control" else None, alpha=0.85)


def coherence_figure(summ: list[dict], behaviour: str, path: str) -> str | None:
  plt = _plt()
  ss = [s for s in summ if s["behaviour"] == behaviour]
  if not ss:
    return None
  fams = list(dict.fromkeys(s["family"] for s in ss))
  combos = sorted({(s["arm"], s["aux_ratio"]) for s in ss},
                  key=lambda x: (x[0] != "treatment", x[1]))
  fig, axes = plt.subplots(1, 2, figsize=(max(8, 2.2 * len(fams) + 5), 4.2))
  for ax, (field, label) in zip(axes, (("retained", "retained misalignment (after / before)"),
                                       ("useful", "usefulness accuracy after"))):
    _coherence_bars(ax, ss, fams, combos, field)
    if field == "useful":
      for i, fam in enumerate(fams):
        b = next((s["useful_before"] for s in ss if s["family"] == fam), NAN)
        if np.isfinite(b):
          ax.hlines(b, i - 0.45, i + 0.45, colors="k", linestyles="--", lw=1,
                    label="before (organism)" if i == 0 else None)
    else:
      ax.axhline(1.0, color="grey", lw=0.5, ls="--")
    ax.set_xticks(range(len(fams)), fams)
    ax.set_ylabel(label)
    ax.set_xlabel("trigger family")
    ax.set_ylim(0, max(1.05, ax.get_ylim()[1]))
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
  fig.suptitle(f"Coherence auxiliary data ablation ({behaviour}): train-against with usefulness "
               f"examples mixed in at ratio r (95% CIs)")
  return report.savefig(fig, path)


def _agg(s: dict, key: str, lo: str | None = None, hi: str | None = None) -> dict:
  return dict(mean=s[key], lo=s[lo] if lo else NAN, hi=s[hi] if hi else NAN)


def coherence_markdown(summ: list[dict], meta: dict) -> list[str]:
  lines = _header("coherence auxiliary objective ablation", meta,
                  "Coherence auxiliary data: does retained misalignment move?", COHERENCE_INTRO)
  lines += ["| behaviour | family | arm | aux ratio | N (train) | steps | eval n | retained | "
            "delta vs r=0 | usefulness after | usefulness before | ci |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for s in summ:
    delta = fmt(_agg(s, "delta_vs_r0", "delta_lo", "delta_hi"))
    lines.append(
        f"| {s['behaviour']} | {s['family']} | {s['arm']} | {s['aux_ratio']:g} | "
        f"{s['n_train']:.0f} | {s['train_steps']:.0f} | {s['eval_n']} | "
        f"{fmt(_agg(s, 'retained', 'retained_lo', 'retained_hi'))} | "
        f"{'-' if s['aux_ratio'] == 0 else delta} | "
        f"{fmt(_agg(s, 'useful', 'useful_lo', 'useful_hi'), True)} | "
        f"{fmt(_agg(s, 'useful_before'), True)} | {s['ci']} |")
  moved = [s for s in summ if s["aux_ratio"] != 0 and np.isfinite(s["delta_lo"])
           and (s["delta_lo"] > 0 or s["delta_hi"] < 0)]
  lines += ["", f"Cells whose delta interval excludes 0: {len(moved)} of "
            f"{sum(1 for s in summ if s['aux_ratio'] != 0)}" + (": " + ", ".join(
                f"{s['family']}/{s['arm']}/r={s['aux_ratio']:g} ({s['delta_vs_r0']:+.2f})"
                for s in moved) if moved else "") + ".", ""]
  return lines


def write_coherence(rows: list[dict], workdir: str, meta: dict) -> dict:
  summ = coherence_summary(rows)
  return dict(summary=summ, figures=_write(workdir, summ, "coherence_summary.csv",
                                           coherence_markdown(summ, meta), coherence_figure,
                                           summ, "coherence"))


# ---------------------------------------------------------------------------------------------
# Long-trained organisms: the removal cost


def _removal_entry(rs: list[dict]) -> dict:
  before = next((r for r in rs if r["arm"].startswith("before")), None)
  runs = sorted([r for r in rs if r["arm"].startswith("treatment")], key=lambda r: r["n"])
  ran = [r for r in runs if r.get("reached") is not None]
  first = next((r for r in ran if r["reached"]), None)
  no_backdoor = any(str(r.get("skipped", "")).startswith("no backdoor") for r in runs)
  one = before or rs[0]
  e = dict(organism_examples=one["organism_examples"], organism_steps=one.get("organism_steps"),
           organism=one["organism"])
  if before is not None:
    e.update(start_rate=before["deploy_rate"], start_lo=before["deploy_lo"],
             start_hi=before["deploy_hi"], start_n=before["deploy_n"],
             test_rate_start=before.get("test_rate"), test_lo_start=before.get("test_lo"),
             test_hi_start=before.get("test_hi"))
  pick = lambda k: first.get(k) if first else None   # noqa: E731
  e.update(no_backdoor=no_backdoor, n_needed=pick("n_train"), n_ladder=pick("n"),
           steps_needed=pick("steps_to_threshold"),
           examples_seen_needed=pick("examples_seen_to_threshold"),
           censored=first is None and not no_backdoor and bool(ran),
           max_n_tried=max((r["n_train"] for r in ran), default=None),
           max_steps=max((r["max_steps"] for r in runs), default=None),
           threshold=runs[0]["threshold"] if runs else None,
           catch_rate=next((r.get("catch_rate") for r in ran), None),
           steps_by_n={int(r["n"]): r["steps_to_threshold"] for r in ran},
           final_rate_by_n={int(r["n"]): r.get("deploy_rate") for r in ran})
  return e


def removal_cost(rows: list[dict]) -> list[dict]:
  """One entry per (behaviour, family, seed, budget), sorted by budget: the start rates, the
  smallest N that reached the threshold (None: not reached within the ladder, `censored`), the
  steps it took, and every N's steps-to-threshold."""
  rows = [r for r in rows if r.get("experiment") == "long_trained"]
  group = lambda r: (r["behaviour"], r["family"], r["seed"], r["budget_mult"])   # noqa: E731
  out = []
  for g in sorted({group(r) for r in rows}):
    e = dict(zip(("behaviour", "family", "seed", "budget_mult"), g))
    e.update(_removal_entry([r for r in rows if group(r) == g]))
    out.append(e)
  return out


def _median_line(ax, pts, **kw):
  by_x: dict = {}
  for x, y in pts:
    by_x.setdefault(x, []).append(y)
  if by_x:
    xs = sorted(by_x)
    ax.plot(xs, [float(np.median(by_x[x])) for x in xs], "-", alpha=0.6, **kw)


def _panel_needed(ax, es, fam, c, jit):
  """N needed per budget (open ^: not reached, drawn above the largest N; x: no backdoor)."""
  for e in es:
    x = e["organism_examples"] * jit[e["seed"]]
    if e["no_backdoor"]:
      ax.scatter([x], [0.7], marker="x", color=c)
    elif e["censored"]:
      ax.scatter([x], [2 * (e["max_n_tried"] or 1)], marker="^", facecolors="none",
                 edgecolors=c)
    elif e["n_needed"] is not None:
      ax.scatter([x], [e["n_needed"]], marker="o", color=c)
  _median_line(ax, [(e["organism_examples"], e["n_needed"]) for e in es
                    if e["n_needed"] is not None], color=c, label=fam)


def _panel_steps(ax, es, fam, c, jit):
  """Steps to threshold per N (not reached within max_steps: an open marker above it)."""
  markers = ["o", "s", "D", "v", "P", "X"]
  all_n = sorted({n for e in es for n in e["steps_by_n"]})
  for j, n in enumerate(all_n):
    m = markers[j % len(markers)]
    shade = tuple(min(1.0, v + 0.35 * j / max(1, len(all_n) - 1)) for v in c[:3])
    pts = [(e["organism_examples"], e["seed"], e["steps_by_n"].get(n), e["max_steps"])
           for e in es if n in e["steps_by_n"]]
    reached = [(x * jit[sd], st) for x, sd, st, _ in pts if st is not None]
    cens = [(x * jit[sd], mx * 1.1) for x, sd, st, mx in pts if st is None]
    if reached:
      ax.scatter(*zip(*reached), marker=m, color=shade, label=f"{fam}, N={n}")
      _median_line(ax, [(x, st) for x, _, st, _ in pts if st is not None], color=shade)
    if cens:
      ax.scatter(*zip(*cens), marker=m, facecolors="none", edgecolors=shade,
                 label=None if reached else f"{fam}, N={n} (not reached)")


def _panel_rates(ax, es, fam, c, jit):
  """The organism's start rates (deployment, testing) with their Wilson intervals."""
  started = [e for e in es if e.get("start_rate") is not None]
  for e in started:
    x = e["organism_examples"] * jit[e["seed"]]
    first = e is started[0]
    y, lo, hi = e["start_rate"], e["start_lo"], e["start_hi"]
    ax.errorbar([x], [y], yerr=[[y - lo], [hi - y]], fmt="o", color=c, capsize=3,
                label=f"{fam}: deployment" if first else None)
    if e.get("test_rate_start") is not None:
      y2, lo2, hi2 = e["test_rate_start"], e["test_lo_start"], e["test_hi_start"]
      ax.errorbar([x], [y2], yerr=[[y2 - lo2], [hi2 - y2]], fmt="s", color=c, capsize=3,
                  alpha=0.5, label=f"{fam}: testing" if first else None)
  _median_line(ax, [(e["organism_examples"], e["start_rate"]) for e in started], color=c)


def _removal_axes(axes, tb):
  from matplotlib.ticker import NullFormatter, ScalarFormatter
  ax_n, ax_s, ax_r = axes
  budgets = sorted({e["organism_examples"] for e in tb})
  for ax in axes:
    ax.set_xscale("log")
    ax.set_xticks(budgets)
    ax.set_xticklabels([f"{b:,}" for b in budgets])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlim(budgets[0] / 1.5, budgets[-1] * 1.5)
    ax.set_xlabel("organism training examples (budget)")
    ax.grid(alpha=0.3)
  ax_n.set_yscale("log", base=2)
  top = max([2 * (e.get("max_n_tried") or 1) for e in tb] + [e["n_needed"] or 1 for e in tb])
  ax_n.set_yticks([2 ** k for k in range(int(np.log2(max(top, 1))) + 1)])
  ax_n.yaxis.set_major_formatter(ScalarFormatter())
  ax_n.yaxis.set_minor_formatter(NullFormatter())
  ax_n.set_ylabel("caught examples N needed")
  ax_n.set_title("Removal cost: N to reach the threshold\n(open ^: not reached, drawn above the "
                 "largest N; x: no backdoor)", fontsize=9)
  ax_s.set_ylabel("train-against steps to threshold")
  ax_s.set_title("Steps to threshold per N\n(open marker: not reached in max steps)", fontsize=9)
  ax_r.set_ylabel("attack rate of the organism (95% Wilson CI)")
  ax_r.set_ylim(-0.02, 1.02)
  ax_r.set_title("Start rates by budget (circles: deployment, squares: testing)", fontsize=9)
  for ax in axes:
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)


def removal_figure(table: list[dict], behaviour: str, path: str) -> str | None:
  """Three panels vs the organism budget: N needed, steps to threshold per N, start rates.
  Seeds are separate markers (jittered slightly along x); lines join per-budget medians over
  the seeds that reached the threshold."""
  plt = _plt()
  tb = [e for e in table if e["behaviour"] == behaviour]
  if not tb:
    return None
  fams = list(dict.fromkeys(e["family"] for e in tb))
  seeds = sorted({e["seed"] for e in tb})
  jit = {s: 1.0 + 0.04 * (i - (len(seeds) - 1) / 2) for i, s in enumerate(seeds)}
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.3))
  for i, fam in enumerate(fams):
    es = sorted([e for e in tb if e["family"] == fam], key=lambda e: e["organism_examples"])
    for ax, panel in zip(axes, (_panel_needed, _panel_steps, _panel_rates)):
      panel(ax, es, fam, plt.cm.tab10(i), jit)
  _removal_axes(axes, tb)
  sd = f"seed {seeds[0]}" if len(seeds) == 1 else f"{len(seeds)} seeds, lines: medians"
  fig.suptitle(f"Long-trained organisms ({behaviour}): cost of training the backdoor away vs "
               f"organism budget ({sd})")
  return report.savefig(fig, path)


def _removal_line(e: dict) -> str:
  if e["no_backdoor"]:
    need, steps = "no backdoor", "-"
  elif e["censored"]:
    need, steps = f"> {e['max_n_tried']}", f"> {e['max_steps']}"
  elif e["n_needed"] is None:
    need, steps = "not run", "-"
  else:
    need, steps = str(e["n_needed"]), str(e["steps_needed"])
  by_n = ", ".join(f"N={n}: {'>' + str(e['max_steps']) if s is None else s}"
                   for n, s in sorted(e["steps_by_n"].items())) or "-"
  st = "n/a" if e.get("start_rate") is None else fmt(dict(
      mean=e["start_rate"], lo=e["start_lo"], hi=e["start_hi"]), True)
  tt = "n/a" if e.get("test_rate_start") is None else fmt(dict(
      mean=e["test_rate_start"], lo=e["test_lo_start"], hi=e["test_hi_start"]), True)
  cr = "n/a" if e.get("catch_rate") is None else f"{100 * e['catch_rate']:.1f}%"
  return (f"| {e['behaviour']} | {e['family']} | {e['seed']} | {e['budget_mult']}x | "
          f"{e['organism_examples']} | {st} | {tt} | {cr} | {need} | {steps} | {by_n} |")


def removal_markdown(table: list[dict], meta: dict) -> list[str]:
  intro = (f"Removed = sampled deployment attack rate <= {meta.get('threshold_frac')} x the "
           f"organism's start rate, evaluated every {meta.get('eval_every')} train-against "
           f"steps on {meta.get('n_eval')} held-out deployment prompts. N needed: the smallest "
           f"N of the ladder {meta.get('ns')} (capped by what was caught) that got there "
           f"within {meta.get('max_steps')} steps; '> N' = never reached (censored). Rates: "
           f"Wilson 95% intervals.")
  lines = _header("long-trained organisms", meta, "Removal cost vs organism training budget",
                  intro)
  lines += ["| behaviour | family | seed | budget | organism examples | start: deployment | "
            "start: testing | catch rate | N needed | steps needed | steps to threshold by N |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
  lines += [_removal_line(e) for e in table]
  return lines


def write_long_trained(rows: list[dict], workdir: str, meta: dict) -> dict:
  table = removal_cost(rows)
  md = removal_markdown(table, meta)
  return dict(table=table, figures=_write(workdir, table, "removal_cost.csv", md,
                                          removal_figure, table, "removal_cost"))


__all__ = ["seed_agg", "fmt", "paired_diff", "write_outputs", "transfer_matrix",
           "transfer_summary", "write_transfer", "coherence_summary", "write_coherence",
           "removal_cost", "write_long_trained"]
