"""Removal-vs-step curves (issue 26 item 2; train_against.curve_every): per family and arm,
the deployment and testing attack rates and the KL from the organism at each eval step,
pooled over seeds (k / n summed, Wilson interval from catchjax.stats), as a report table and
one figure per family."""
from __future__ import annotations

import collections
import os

from catchjax import stats


def pooled_curves(rows: list[dict]) -> dict:
  """{(family, behaviour, n, arm): [{step, deploy (rate, lo, hi), test (...), kl, seeds}]}:
  the curve points of every row with one, pooled over seeds by step."""
  acc = collections.defaultdict(lambda: collections.defaultdict(lambda: dict(
      dk=0, dn=0, tk=0, tn=0, kl=[], seeds=0)))
  for r in rows:
    for pt in r.get("curve") or ():
      a = acc[(r["family"], r["behaviour"], r["n"], r["arm"])][int(pt["step"])]
      a["dk"] += int(pt["deploy_k"])
      a["dn"] += int(pt["deploy_n"])
      a["tk"] += int(pt["test_k"])
      a["tn"] += int(pt["test_n"])
      if pt.get("kl") is not None:
        a["kl"].append(float(pt["kl"]))
      a["seeds"] += 1
  out = {}
  for key, by_step in acc.items():
    out[key] = [dict(step=s, deploy=stats.wilson(a["dk"], a["dn"]),
                     test=stats.wilson(a["tk"], a["tn"]),
                     kl=sum(a["kl"]) / len(a["kl"]) if a["kl"] else None, seeds=a["seeds"])
                for s, a in sorted(by_step.items())]
  return out


def curves_markdown(rows: list[dict]) -> str:
  """The curves as a table per (family, behaviour, N): one column per arm."""
  curves = pooled_curves(rows)
  if not curves:
    return ""
  lines = ["", "## Removal vs training step (exploratory)", "",
           "Deployment attack rate (95% Wilson CI, pooled over seeds) / testing attack rate / "
           "mean per-token KL from the organism, at each eval step of every arm's run "
           "(`train_against.curve_every`; step 0 is the organism).", ""]
  groups = sorted({k[:3] for k in curves})
  for fam, beh, n in groups:
    arms = [k[3] for k in sorted(curves) if k[:3] == (fam, beh, n)]
    steps = sorted({p["step"] for a in arms for p in curves[(fam, beh, n, a)]})
    lines += [f"**{fam} / {beh}, N = {n}**", "",
              "| step | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
    for s in steps:
      cells = []
      for a in arms:
        p = next((p for p in curves[(fam, beh, n, a)] if p["step"] == s), None)
        if p is None:
          cells.append("")
          continue
        d, t = p["deploy"], p["test"]
        kl = "" if p["kl"] is None else f" / KL {p['kl']:.3f}"
        cells.append(f"{d[0]:.2f} [{d[1]:.2f}, {d[2]:.2f}] / {t[0]:.2f}{kl}")
      lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines.append("")
  return "\n".join(lines) + "\n"


def curves_figures(rows: list[dict], outdir: str) -> list[str]:
  """figures/curve_<family>_<behaviour>_n<N>.png: deployment attack rate vs step per arm
  (shaded 95% CI), testing rate dashed."""
  curves = pooled_curves(rows)
  if not curves:
    return []
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  os.makedirs(outdir, exist_ok=True)
  paths = []
  for fam, beh, n in sorted({k[:3] for k in curves}):
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for i, arm in enumerate(k[3] for k in sorted(curves) if k[:3] == (fam, beh, n)):
      pts = curves[(fam, beh, n, arm)]
      x = [p["step"] for p in pts]
      color = f"C{i}"
      ax.plot(x, [p["deploy"][0] for p in pts], "-o", color=color, ms=3, label=arm)
      ax.fill_between(x, [p["deploy"][1] for p in pts], [p["deploy"][2] for p in pts],
                      color=color, alpha=0.15)
      ax.plot(x, [p["test"][0] for p in pts], "--", color=color, lw=1)
    ax.set(xlabel="train-against step", ylabel="attack rate (deployment; testing dashed)",
           title=f"{fam} / {beh}, N = {n}", ylim=(-0.02, 1.02))
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(outdir, f"curve_{fam}_{beh}_n{n}.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(path)
  return paths


__all__ = ["pooled_curves", "curves_markdown", "curves_figures"]
