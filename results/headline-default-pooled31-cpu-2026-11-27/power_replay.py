"""Replay the headline power rule (report.point_half_widths / needs_seed, goal 0.1, min 6,
max 40) over pooled N = 16 rows in seed order: at which seed would each family have stopped?"""
import sys
from catchjax import report
from catchjax.results import ResultStore
rows = []
for d in sys.argv[1:]:
  rows += ResultStore(d + "/results.jsonl").rows
rows = [r for r in rows if r.get("n") == 16 and r.get("arm") in ("treatment", "control")]
seeds = sorted({r["seed"] for r in rows})
for fam in sorted({r["family"] for r in rows}):
  fr = [r for r in rows if r["family"] == fam]
  stop = None
  for s in seeds:
    pt = report.point_half_widths([r for r in fr if r["seed"] <= s], 16).get((fam, "hate"))
    if pt and not report.needs_seed(pt, 0.1, 6, 40):
      stop = (s, pt)
      break
  pt = report.point_half_widths(fr, 16)[(fam, "hate")]
  print(f"{fam}: seeds available {pt['runs']}, half-width at all of them {pt['half_width']:.3f};"
        f" rule stops after seed {stop[0]} ({stop[1]['runs']} seeds, half-width "
        f"{stop[1]['half_width']:.3f})" if stop else f"{fam}: seeds {pt['runs']}, "
        f"half-width {pt['half_width']:.3f}; rule not yet satisfied")
