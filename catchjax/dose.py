"""The dose-response of issue 27 item 5: retained gap against how distinguishable deployment
is from testing, pooled over families, organisms and catches.

The x-axis is pre-registered in config.report.dose (default: the base model's probe
examples-to-80%, `probe_examples_to_80_base` of the distinguish rows; censored "> bound"
values sit at 2 x bound, tied at the top of the ranks). Each run (organism, seed, catch) of
the dose's arm at its N contributes one retained gap (report.retained_gap); families without
an installed backdoor are left out (report's rule). Statistics: Spearman's rank correlation
(scipy.stats.spearmanr) and the OLS slope of the retained gap on log2(x), each with a
family-clustered percentile bootstrap (families resampled with replacement, each with all of
its runs: scipy has no clustered bootstrap, so it is drawn here with numpy; draws with a single
distinct x have no slope and are counted, not used). Descriptive while fewer than 6 families.
"""
from __future__ import annotations

import collections
import math

import numpy as np

DOSE = dict(x="probe_examples_to_80_base", n=16, arm="treatment", n_boot=2000, seed=0)
MIN_FAMILIES_INFERENTIAL = 6


def family_x(rows: list[dict], key: str) -> dict[tuple, dict]:
  """{(family, behaviour): {x, censored, seeds}} from the distinguish rows (mean over seeds;
  a censored seed counts at 2 x its bound)."""
  acc = collections.defaultdict(list)
  for r in rows:
    if r.get("arm") != "distinguish" or key not in r:
      continue
    v, cens = r.get(key), bool(r.get(f"{key}_censored"))
    if v is None and cens and r.get(f"{key}_bound"):
      v = 2 * float(r[f"{key}_bound"])
    if v is not None:
      acc[(r["family"], r["behaviour"])].append((float(v), cens))
  return {k: dict(x=float(np.mean([v for v, _ in vs])), censored=any(c for _, c in vs),
                  seeds=len(vs)) for k, vs in acc.items()}


def dose_points(rows: list[dict], spec: dict | None = None, excluded=frozenset()) -> list[dict]:
  """One point per run: {family, behaviour, x, y (retained gap), organism, seed, catch}."""
  from catchjax import report
  spec = dict(DOSE, **(spec or {}))
  xs = family_x(rows, spec["x"])
  out = []
  for r in rows:
    if r.get("arm") != spec["arm"] or r.get("n") != spec["n"] or r.get("skipped"):
      continue
    k = (r["family"], r["behaviour"])
    y = report.retained_gap(r)
    if k in excluded or k not in xs or y is None:
      continue
    out.append(dict(family=k[0], behaviour=k[1], x=xs[k]["x"], censored=xs[k]["censored"],
                    y=float(y), organism=r.get("organism"), seed=r["seed"],
                    catch=r.get("catch")))
  return out


def _stats(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
  """(Spearman rho, OLS slope of y on log2 x); nan where x has one distinct value."""
  from scipy import stats as st
  if len(np.unique(x)) < 2 or len(y) < 3:
    return math.nan, math.nan
  rho = float(st.spearmanr(x, y).statistic)
  slope = float(np.polyfit(np.log2(x), y, 1)[0])
  return rho, slope


def dose_response(points: list[dict], n_boot: int = 2000, seed: int = 0) -> dict:
  """Spearman rho and the log2-x slope with family-clustered 95% percentile intervals."""
  fams = sorted({(p["family"], p["behaviour"]) for p in points})
  x = np.array([p["x"] for p in points], float)
  y = np.array([p["y"] for p in points], float)
  rho, slope = _stats(x, y)
  by_fam = {f: [i for i, p in enumerate(points) if (p["family"], p["behaviour"]) == f]
            for f in fams}
  rng = np.random.default_rng(seed)
  draws, degenerate = [], 0
  for _ in range(int(n_boot) if len(fams) >= 2 else 0):
    idx = [i for j in rng.integers(0, len(fams), len(fams)) for i in by_fam[fams[j]]]
    r, s = _stats(x[idx], y[idx])
    if math.isnan(r) or math.isnan(s):
      degenerate += 1
      continue
    draws.append((r, s))
  d = np.array(draws) if draws else np.empty((0, 2))
  ci = lambda col: ((float(np.percentile(d[:, col], 2.5)), float(np.percentile(d[:, col], 97.5)))  # noqa: E731
                    if len(d) else (math.nan, math.nan))
  return dict(families=len(fams), runs=len(points), rho=rho, rho_ci=ci(0), slope=slope,
              slope_ci=ci(1), n_boot=int(n_boot), degenerate_draws=degenerate,
              descriptive=len(fams) < MIN_FAMILIES_INFERENTIAL,
              per_family={f"{f}/{b}": dict(x=float(x[by_fam[(f, b)][0]]),
                                           y_mean=float(np.mean(y[by_fam[(f, b)]])),
                                           runs=len(by_fam[(f, b)]))
                          for f, b in fams})


def dose_markdown(rows: list[dict], spec: dict | None = None, excluded=frozenset()) -> str:
  """The report's dose-response section ('' without distinguish rows or runs at its N)."""
  spec = dict(DOSE, **(spec or {}))
  pts = dose_points(rows, spec, excluded)
  if not pts:
    return ""
  d = dose_response(pts, spec["n_boot"], spec["seed"])
  f = lambda v: "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:+.3f}"  # noqa: E731
  label = ("descriptive: fewer than 6 families / levels" if d["descriptive"] else
           "pre-registered x-axis")
  lines = ["", f"## Dose-response: retained gap vs {spec['x']} ({label})", "",
           f"{spec['arm']} at N = {spec['n']}: {d['runs']} runs over {d['families']} "
           f"families with an installed backdoor. Spearman rho {f(d['rho'])} "
           f"[{f(d['rho_ci'][0])}, {f(d['rho_ci'][1])}]; OLS slope of the retained gap per "
           f"doubling of x {f(d['slope'])} [{f(d['slope_ci'][0])}, {f(d['slope_ci'][1])}] "
           f"(95% family-clustered bootstrap, {d['n_boot']} draws, {d['degenerate_draws']} "
           f"with one distinct x left out).", "",
           "| family | x | runs | mean retained gap |", "|---|---|---|---|"]
  for fam, v in sorted(d["per_family"].items(), key=lambda kv: kv[1]["x"]):
    cens = any(p["censored"] for p in pts if f"{p['family']}/{p['behaviour']}" == fam)
    lines.append(f"| {fam} | {'> ' if cens else ''}{v['x']:.0f} | {v['runs']} | "
                 f"{v['y_mean']:.3f} |")
  return "\n".join(lines) + "\n"


def dose_figure(rows: list[dict], outdir: str, spec: dict | None = None,
                excluded=frozenset()) -> list[str]:
  """figures/dose_response.png: each run's retained gap against x (log2 axis; censored
  families as triangles), family means, and the fitted OLS line; [] without points."""
  spec = dict(DOSE, **(spec or {}))
  pts = dose_points(rows, spec, excluded)
  if not pts:
    return []
  import os

  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from catchjax.report import savefig
  d = dose_response(pts, spec["n_boot"], spec["seed"])
  fig, ax = plt.subplots(figsize=(5.5, 4))
  jit = np.random.default_rng(0)
  for i, (fam, v) in enumerate(sorted(d["per_family"].items())):
    ps = [p for p in pts if f"{p['family']}/{p['behaviour']}" == fam]
    xs = [p["x"] * 2 ** jit.uniform(-0.08, 0.08) for p in ps]
    mk = ">" if ps[0]["censored"] else "o"
    ax.scatter(xs, [p["y"] for p in ps], s=12, alpha=0.4, color=f"C{i}", marker=mk)
    ax.scatter([v["x"]], [v["y_mean"]], s=70, color=f"C{i}", marker=mk, edgecolor="k",
               label=f"{fam} ({v['runs']} runs)")
  if not math.isnan(d["slope"]):
    lx = np.log2([p["x"] for p in pts])
    b, a = np.polyfit(lx, [p["y"] for p in pts], 1)
    g = np.linspace(lx.min(), lx.max(), 20)
    ax.plot(2 ** g, a + b * g, "k--", lw=1,
            label=f"slope {b:+.3f} / doubling, rho {d['rho']:+.2f}")
  ax.set_xscale("log", base=2)
  ax.set(xlabel=f"{spec['x']} (triangle: censored)", ylabel="retained gap (after / before)",
         title=f"Dose-response, {spec['arm']} at N = {spec['n']}"
               + (" (descriptive)" if d["descriptive"] else ""))
  ax.axhline(1.0, color="grey", lw=0.5)
  ax.legend(fontsize=7)
  os.makedirs(outdir, exist_ok=True)
  return [savefig(fig, os.path.join(outdir, "dose_response.png"))]


__all__ = ["DOSE", "family_x", "dose_points", "dose_response", "dose_markdown", "dose_figure"]
