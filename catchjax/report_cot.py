"""The cot experiment's report (experiments/cot.py): the a / b / c table, report.md and
figures/cot_abc.png from its rows.

Deployment responses are sorted by data/reasoning.py's classifier into (a) attack with
dangerous reasoning, (b) attack with benign-looking or no reasoning (opaque), (c) no attack;
counts pooled over seeds with Wilson 95% intervals.
"""
from __future__ import annotations

import functools

import numpy as np

from catchjax import report, stats
from catchjax.report_extra import write_outputs

ARMS = ("scratchpad", "full")   # loss on the benign scratchpad only / on the whole response
CATS = (("a", "dangerous_attack", "(a) attack, dangerous reasoning"),
        ("b", "opaque_attack", "(b) attack, benign-looking / no reasoning"),
        ("c", "no_attack", "(c) no attack"))
POOLED = ("a", "b", "c", "b_benign", "b_none", "c_dangerous", "attack", "dangerous")


def summarise(rows: list[dict]) -> list[dict]:
  """One line per (family, behaviour, N, arm): counts pooled over seeds, Wilson 95% CIs."""
  groups: dict[tuple, list[dict]] = {}
  for r in rows:
    if r.get("eval_n"):
      groups.setdefault((r["family"], r["behaviour"], r["n"], r["arm"]), []).append(r)
  order = {a: i for i, a in enumerate(("before",) + ARMS)}
  out = []
  for (fam, beh, n, arm), rs in sorted(groups.items(),
                                       key=lambda kv: (*kv[0][:3], order.get(kv[0][3], 9))):
    tot = sum(r["eval_n"] for r in rs)
    s = dict(family=fam, behaviour=beh, n=n, arm=arm, seeds=len(rs), eval_n=tot,
             n_train=float(np.mean([r["n_train"] for r in rs])),
             capped=any(r.get("capped") for r in rs),
             n_caught=rs[0].get("n_caught"), m=rs[0].get("m"),
             loss_tokens_outside_scratchpad=sum(r.get("loss_tokens_outside_scratchpad", 0)
                                                for r in rs))
    for k in POOLED:
      kk = sum(r[f"{k}_k"] for r in rs)
      p, lo, hi = stats.wilson(kk, tot)
      s.update({f"{k}_k": kk, k: p, f"{k}_lo": lo, f"{k}_hi": hi})
    out.append(s)
  return out


def _pct(s, k):
  return f"{100 * s[k]:.0f}% [{100 * s[k + '_lo']:.0f}, {100 * s[k + '_hi']:.0f}]"


def _table(summary: list[dict]) -> list[str]:
  lines = ["| family | behaviour | N | arm | n_train | seeds | n | (a) dangerous attack | "
           "(b) opaque attack | b_benign / b_none | (c) no attack | c_dangerous | "
           "any attack | any dangerous reasoning |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for s in summary:
    lines.append(
        f"| {s['family']} | {s['behaviour']} | {s['n']} | {s['arm']} | "
        f"{s['n_train']:.0f}{' (capped)' if s['capped'] else ''} | {s['seeds']} | "
        f"{s['eval_n']} | {_pct(s, 'a')} | {_pct(s, 'b')} | {s['b_benign_k']} / {s['b_none_k']}"
        f" | {_pct(s, 'c')} | {s['c_dangerous_k']} | {_pct(s, 'attack')} | "
        f"{_pct(s, 'dangerous')} |")
  return lines


def _notes(rows: list[dict]) -> list[str]:
  """The catches, the skipped cells and one trained cell's example responses."""
  lines, cat = [], {}
  for r in rows:
    cat.setdefault((r["family"], r["behaviour"]), r)
  if cat:
    lines += ["", "Catches (testing prompts, T=1): "]
    for (fam, beh), r in cat.items():
      lo, hi = r.get("catch_lo"), r.get("catch_hi")
      lines.append(f"- {fam} / {beh}: {r['n_caught']} of {r['m']} caught "
                   f"({100 * r['catch_rate']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]); "
                   f"{r['caught_dangerous']} of them with dangerous reasoning, "
                   f"{r['caught_scratchpad']} with a scratchpad.")
  skipped = [r for r in rows if r.get("skipped")]
  if skipped:
    lines += ["", f"{len(skipped)} cells skipped (nothing caught to train against)."]
  ex = [r for r in rows if r.get("examples") and r["arm"] != "before"]
  if ex:
    r = max(ex, key=lambda r: (r["n"], r["arm"] == "scratchpad"))
    lines += ["", f"Example responses ({r['family']}, N={r['n']}, arm {r['arm']}, "
              f"seed {r['seed']}):"]
    for catn, exs in r["examples"].items():
      for e in exs[:1]:
        lines.append(f"- {catn}: `{e[:160]!s}`".replace("\n", " "))
  return lines


INTRO = ("Deployment responses (held-out prompts, T=1) sorted by the rule-based reasoning "
         "classifier (catchjax/data/reasoning.py): **(a)** attack with explicit dangerous "
         "reasoning, **(b)** attack with benign-looking (b_benign) or no (b_none) reasoning "
         "(opaque), **(c)** no attack (c_dangerous: dangerous reasoning but no attack). "
         "Arms: `before` = the organism; `scratchpad` = SFT to a benign scratchpad on N caught "
         "prompts, loss on scratchpad tokens only; `full` = same target, loss on the whole "
         "response. Counts pooled over seeds; Wilson 95% intervals; n = eval responses.")


def markdown(summary: list[dict], rows: list[dict], meta: dict) -> str:
  head = [f"# {meta.get('title', 'cot')}", ""]
  head += [f"- **{k}**: {v}" for k, v in meta.items() if k != "title"]
  body = ["", "## Training against dangerous chain-of-thought", "", INTRO, ""]
  return "\n".join(head + body + _table(summary) + _notes(rows)) + "\n"


def _bars(ax, ss: list[dict]) -> None:
  """One panel: a stacked a / b / c bar per (N, arm), each segment's Wilson 95% CI at its top."""
  colors = {"a": "#c0392b", "b": "#e69f00", "c": "#6a9fd4"}
  labels = []
  for i, s in enumerate(ss):
    bottom = 0.0
    for k, _, lab in CATS:
      v = s[k]
      ax.bar(i, v, 0.7, bottom=bottom, color=colors[k], label=lab if i == 0 else None,
             edgecolor="white")
      top = bottom + v
      ax.errorbar(i + (ord(k) - ord("b")) * 0.18, top, yerr=[[v - s[f"{k}_lo"]],
                                                             [s[f"{k}_hi"] - v]],
                  fmt="none", ecolor="black", capsize=2, lw=0.9)
      bottom = top
    labels.append("before" if s["arm"] == "before" else f"{s['arm']}\nN={s['n']}")
  ax.set_xticks(range(len(ss)), labels, fontsize=8)


def figure(summary: list[dict], path: str) -> str | None:
  """Stacked a/b/c bars per (N, arm), one panel per family x behaviour, Wilson 95% CIs."""
  if not summary:
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  panels = sorted({(s["family"], s["behaviour"]) for s in summary})
  fig, axes = plt.subplots(1, len(panels), figsize=(max(5.0, 1.1 * 7) * len(panels), 4.6),
                           squeeze=False)
  for ax, (fam, beh) in zip(axes[0], panels):
    ss = [s for s in summary if (s["family"], s["behaviour"]) == (fam, beh)]
    _bars(ax, ss)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share of deployment responses")
    ax.set_title(f"{fam} / {beh} (n per bar: {ss[0]['eval_n']})", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
  handles, labs = axes[0][0].get_legend_handles_labels()
  fig.legend(handles, labs, loc="lower center", ncol=3, fontsize=8, frameon=False)
  fig.suptitle("Training against the reasoning of caught attacks: deployment responses\n"
               "(error bars: Wilson 95% CI of each category, drawn at its segment's top)",
               fontsize=10)
  return report.savefig(fig, path, layout=dict(rect=(0, 0.06, 1, 1)))


def write_report(rows: list[dict], workdir: str, meta: dict) -> dict:
  """summary.csv, report.md and figures/cot_abc.png (process 0 writes)."""
  summary = summarise(rows)
  figs = write_outputs(workdir, summary, "summary.csv", markdown(summary, rows, meta),
                       {"cot_abc.png": functools.partial(figure, summary)})
  return dict(summary=summary, figures=figs)


__all__ = ["ARMS", "CATS", "summarise", "markdown", "figure", "write_report"]
