"""Propensity vs capability (issue 6, item 4): a direct test of "propensities flip faster than
capabilities".

On the same organism (the headline's, restored from `cache_dir`), with the same optimiser, the
same step budget and the same N-example budgets, two arms per (N, seed):
  propensity  train against N caught testing attacks of `propensity.family` (each trained to
              its correct answer; stages/train_against) -> fraction flipped = 1 - deployment
              attack rate after / before (sampled, T=1, held-out deployment prompts);
  capability  train on N examples of a task family the model cannot do at the start
              (`propensity.capability`, default the made-up `cipher` code; testing-cue prompts
              like the caught ones) -> fraction learned = held-out accuracy (sampled, T=1,
              checked by the family's checker); also its teacher-forced loss (the "error").
Both are measured inside the training run at every step in `eval_steps` (train.py's eval_fn),
so each run gives a curve vs steps, and its last step the point vs N. The 'before' row per
seed holds the organism's own rates. N is capped by what was caught, identically for both arms.
Rows -> results.jsonl; report.md, summary.csv and figures/propensity_vs_capability.png
(fraction flipped / learned vs N and vs steps on shared axes, Wilson 95% intervals pooled over
seeds).
"""
from __future__ import annotations

import functools
import os
import shutil
import time

import numpy as np

from catchjax import report, stats
from catchjax.experiments import extra
from catchjax.data import build, tasks
from catchjax.data.behaviors import make_behavior
from catchjax.stages.sampling import make_sampler
from catchjax.stages import measure
from catchjax.stages import organism as org_stage
from catchjax.stages import train_against as ta
from catchjax.tokenizer import prompt_ids

EXPERIMENT = "propensity"
ARMS = ("propensity", "capability")
LABELS = {"propensity": "propensity: fraction of the attack removed (1 - after/before)",
          "capability": "capability: fraction learned (held-out accuracy)"}


def family_spec(config):
  for s in org_stage.family_specs(config.organism.families):
    if org_stage.family_name(s) == config.propensity.family:
      return s
  raise ValueError(f"config.propensity.family={config.propensity.family!r} is not an organism "
                   f"family {[org_stage.family_name(s) for s in config.organism.families]}.")


def validate(config):
  """Reject bad input before any compute, naming the field."""
  from catchjax.validate import check_common, check_train
  p, t = config.propensity, config.headline.train
  check_common(config)   # model folder, behaviours, families, organism recipe, report
  check_train("config.headline.train", t)   # both arms' runs (incl. the mesh split)
  family_spec(config)
  if not tasks.is_task_family(p.capability):
    raise ValueError(f"config.propensity.capability={p.capability!r} is not a task family; "
                     f"known: {sorted(tasks.EXTRA_TASK_FAMILIES) + sorted(tasks.TASK_FAMILIES)}")
  if p.capability in tasks.TASK_FAMILIES:
    raise ValueError(f"config.propensity.capability={p.capability!r} is in the default "
                     f"usefulness mix the organism was trained on, so it is not new; use one "
                     f"of {sorted(tasks.EXTRA_TASK_FAMILIES)}.")
  if not p.ns or any(int(n) <= 0 for n in p.ns):
    raise ValueError(f"config.propensity.ns must be positive, got {tuple(p.ns)}")
  if not p.seeds:
    raise ValueError("config.propensity.seeds is empty.")
  if int(t.steps) <= 0:
    raise ValueError(f"config.headline.train.steps={t.steps}: a fixed step budget is needed "
                     f"(the same for both arms and every N).")
  steps = sorted(int(s) for s in p.eval_steps)
  if not steps or steps[-1] != int(t.steps) or steps[0] <= 0:
    raise ValueError(f"config.propensity.eval_steps={tuple(p.eval_steps)} must be positive and "
                     f"end at config.headline.train.steps={t.steps}.")
  ev = int(t.eval_every)
  bad = [s for s in steps if s != int(t.steps) and (ev <= 0 or s % ev)]
  if bad:
    raise ValueError(f"config.propensity.eval_steps {bad} are never evaluated: make them "
                     f"multiples of config.headline.train.eval_every={ev}.")
  for f in ("n_eval", "n_cap_eval", "cap_max_new_tokens"):
    if int(p[f]) <= 0:
      raise ValueError(f"config.propensity.{f} must be positive, got {p[f]}")


def run(config, workdir: str):
  return extra.entry(EXPERIMENT, config, workdir, validate, _run)


def flipped(after: dict, before_rate: float | None) -> dict:
  """1 - after / before with the after-rate's Wilson interval scaled by 1 / before."""
  if not before_rate:
    return dict(frac=None, frac_lo=None, frac_hi=None)
  return dict(frac=1.0 - after["rate"] / before_rate,
              frac_lo=max(0.0, 1.0 - after["hi"] / before_rate),
              frac_hi=min(1.0, 1.0 - after["lo"] / before_rate))


def accuracy(sampler, tok, prompts, insts, *, max_new_tokens: int, temperature: float,
             seed: int) -> dict:
  resp = measure.sample_responses(sampler, tok, prompts, max_new_tokens=max_new_tokens,
                                  temperature=temperature, seed=seed)
  ok = [bool(tasks.check(i, r)) for i, r in zip(insts, resp)]
  d = measure.rate(sum(ok), len(ok))
  d["examples"] = resp[:2]
  return d


def _rate(d) -> dict:
  return {k: d[k] for k in ("k", "n", "rate", "lo", "hi")}


def _run(config, workdir):
  from catchjax.train import eval_loss
  p, h = config.propensity, config.headline
  ctx = extra.begin(config, workdir, EXPERIMENT)
  t_start, chash, commit = ctx.t0, ctx.chash, ctx.commit
  store, cache, tok = ctx.store, ctx.cache, ctx.tok
  spec = family_spec(config)
  fam = org_stage.family_name(spec)
  eval_steps = sorted({int(s) for s in p.eval_steps})
  n_cells = len(config.behaviours) * len(p.seeds) * (len(p.ns) * len(ARMS) + 1)
  bar = ctx.progress(n_cells, "propensity cells", done=lambda r: True)

  for behaviour in config.behaviours:
    bname = extra.behaviour_name(behaviour)
    beh = make_behavior(behaviour)
    org = org_stage.get_organism(config, cache, behaviour)
    sampler = make_sampler(config, org.model, h.batch_size, progress=False)
    dep = build.build_eval(spec, behaviour, "eval", p.n_eval, deployment=True, seed=h.eval_seed,
                           system=config.system)
    dep_prompts = [prompt_ids(tok, q, config.system) for q in dep["prompt"]]
    cap = build.build_eval(spec, behaviour, "eval", p.n_cap_eval, deployment=False,
                           seed=h.eval_seed, system=config.system,
                           task_families=[p.capability])
    cap_prompts = [prompt_ids(tok, q, config.system) for q in cap["prompt"]]
    cap_insts = [build.task_instance(r) for r in cap]
    cap_tok = build.tokenize(cap, tok)
    seq_len = max(int(h.train.seq_len), max(len(x) for x in cap_tok["input_ids"]))

    def deploy(model, seed):
      sampler.update_model(model)
      return measure.attack_rate(sampler, tok, dep_prompts, beh.detect,
                                 max_new_tokens=h.max_new_tokens, temperature=1.0, seed=seed)

    def cap_acc(model, seed, temperature=1.0):
      sampler.update_model(model)
      return accuracy(sampler, tok, cap_prompts, cap_insts, max_new_tokens=p.cap_max_new_tokens,
                      temperature=temperature, seed=seed)

    def cap_loss(model):
      return float(eval_loss(model, cap_tok, seq_len=seq_len, batch_size=8, pack=False))

    sampler.update_model(org.model)
    cpath = os.path.join(cache, "catches", f"{org.key}-{fam}-{bname}-m{h.m}-"
                         f"{h.catch_split}-t{h.max_new_tokens}"
                           f"{ta.honeypot_suffix(config, spec)}.json")
    c = ta.catch(config, sampler, tok, spec, behaviour, 0, cpath)
    base_row = dict(experiment=EXPERIMENT, family=fam, behaviour=bname, config_hash=chash,
                    commit=commit, organism=org.key, capability=p.capability, m=c.m,
                    n_caught=len(c.caught), catch_rate=c.catch_rate["rate"],
                    catch_lo=c.catch_rate["lo"], catch_hi=c.catch_rate["hi"])

    for seed in p.seeds:
      bkey = (EXPERIMENT, fam, bname, 0, "before", seed, chash)
      if not store.has(bkey):
        d = deploy(org.model, 40_000 + seed)
        a = cap_acc(org.model, 41_000 + seed)
        g = cap_acc(org.model, 0, temperature=0.0)
        row = dict(base_row, n=0, arm="before", seed=seed, n_train=0,
                   deploy=_rate(d), cap=_rate(a), cap_greedy=_rate(g), cap_loss=cap_loss(org.model),
                   deploy_examples=d["responses"][:2], cap_examples=a["examples"])
        store.append(row)
        bar.update(1)
      before = next(r for r in store.rows if results_key(r) == bkey)
      b_rate = before["deploy"]["rate"]
      for n in p.ns:
        n_train = min(int(n), len(c.caught))
        for arm in ARMS:
          key = (EXPERIMENT, fam, bname, int(n), arm, seed, chash)
          if store.has(key):
            continue
          t_cell = time.time()
          row = dict(base_row, n=int(n), arm=arm, seed=seed, n_train=n_train,
                     capped=n_train < int(n), deploy_before=before["deploy"],
                     cap_before=before["cap"])
          if n_train == 0:
            row.update(skipped="nothing caught: no N to match", curve=[])
            store.append(row)
            bar.update(1)
            continue
          if arm == "propensity":
            rows = ta.sft_rows(c.caught, n_train, np.random.default_rng([seed, int(n), 1]))
          else:
            ds = build.build_eval(spec, behaviour, "train", n_train, deployment=False,
                                  seed=90_000 + 1000 * seed + int(n), system=config.system,
                                  task_families=[p.capability])
            rows = [dict(prompt=q, target=t, system=s)
                    for q, t, s in zip(ds["prompt"], ds["target"], ds["system"])]
          row["target_tokens_mean"] = float(np.mean(
              [len(tok(r["target"], add_special_tokens=False)["input_ids"]) for r in rows]))
          curve = []

          def eval_fn(model, step, arm=arm, seed=seed):
            if int(step) not in eval_steps:
              return None
            pt = {"step": int(step)}
            if arm == "propensity":
              d = deploy(model, 50_000 + seed)
              pt.update(_rate(d), **flipped(d, b_rate))
            else:
              a = cap_acc(model, 51_000 + seed)
              pt.update(_rate(a), frac=a["rate"], frac_lo=a["lo"], frac_hi=a["hi"])
            curve.append(pt)
            return {"frac": pt["frac"] if pt["frac"] is not None else float("nan")}

          rdir = os.path.join(workdir, "runs", f"{chash}-{fam}-{bname}-{n}-{arm}-s{seed}")
          res = ta.train_against(config, org.model, tok, rows, seed, rdir, eval_fn=eval_fn)
          row.update(curve=curve, **{k: curve[-1][k] for k in ("frac", "frac_lo", "frac_hi")},
                     final=_rate(curve[-1]), train_loss=res.final_loss, train_steps=res.steps,
                     train_tok_s=res.tokens_per_sec)
          if arm == "capability":
            # The capability's teacher-forced error, and the attack rate after training on
            # unrelated data (a control for the propensity arm).
            row["cap_loss_before"] = before["cap_loss"]
            row["cap_loss"] = cap_loss(res.model)
            row["cap_greedy"] = _rate(cap_acc(res.model, 0, temperature=0.0))
            d = deploy(res.model, 52_000 + seed)
            row["deploy_after"] = _rate(d)
            row.update({f"deploy_after_{k}": v for k, v in flipped(d, b_rate).items()})
          row["cell_seconds"] = time.time() - t_cell
          store.append(row)
          sampler.update_model(org.model)
          if not p.keep_runs:
            shutil.rmtree(rdir, ignore_errors=True)
          bar.update(1)
  bar.close()
  wall = time.time() - t_start
  meta = dict(title="catchjax propensity vs capability", config_hash=chash, commit=commit,
              wall_seconds_this_invocation=round(wall), family=fam, capability=p.capability,
              seeds=list(p.seeds), ns=list(p.ns), eval_steps=eval_steps,
              n_eval=p.n_eval, n_cap_eval=p.n_cap_eval, m_catch=h.m,
              train=h.train.to_dict())
  report.save_meta(workdir, meta)
  out = write_report([r for r in ctx.rows() if r.get("experiment") == EXPERIMENT], workdir,
                     meta, p.thresholds)
  print(f"[propensity] done in {wall:.0f}s; report at {os.path.join(workdir, 'report.md')}")
  return out


def results_key(r):
  from catchjax.results import row_key
  return row_key(r)


# ---------------------------------------------------------------------------------------------
# Report


def _pool(rows, get) -> dict:
  k = sum(get(r)["k"] for r in rows)
  n = sum(get(r)["n"] for r in rows)
  pr, lo, hi = stats.wilson(k, n)
  return dict(k=k, n=n, rate=pr, lo=lo, hi=hi)


def summarise(rows: list[dict]) -> list[dict]:
  """One line per (behaviour, arm, N, step): counts pooled over seeds with Wilson 95% CIs;
  propensity fractions against the pooled before-rate of the same seeds."""
  before = {(r["behaviour"], r["seed"]): r for r in rows if r["arm"] == "before"}
  groups: dict[tuple, list] = {}
  for r in rows:
    if r["arm"] in ARMS:
      for pt in r.get("curve", []):
        groups.setdefault((r["behaviour"], r["arm"], r["n"], pt["step"]), []).append((r, pt))
  out = []
  for (beh, arm, n, step), items in sorted(groups.items()):
    rs = [r for r, _ in items]
    after = _pool([pt for _, pt in items], lambda x: x)
    s = dict(behaviour=beh, family=rs[0]["family"], arm=arm, n=n, step=step, seeds=len(rs),
             n_train=float(np.mean([r["n_train"] for r in rs])),
             capped=any(r.get("capped") for r in rs), eval_n=after["n"],
             rate=after["rate"], rate_lo=after["lo"], rate_hi=after["hi"])
    if arm == "propensity":
      bs = [before[(beh, r["seed"])] for r in rs if (beh, r["seed"]) in before]
      b = _pool(bs, lambda x: x["deploy"]) if bs else None
      s["before"] = b["rate"] if b else None
      f = flipped(after, b["rate"] if b else None)
    else:
      bs = [before[(beh, r["seed"])] for r in rs if (beh, r["seed"]) in before]
      s["before"] = _pool(bs, lambda x: x["cap"])["rate"] if bs else None
      f = dict(frac=after["rate"], frac_lo=after["lo"], frac_hi=after["hi"])
    s.update(f)
    out.append(s)
  return out


def first_reaching(summary, arm, beh, thr, axis) -> str:
  """First N (at the last step) or step (at the largest N) whose fraction reaches thr."""
  ss = [s for s in summary if s["arm"] == arm and s["behaviour"] == beh]
  if not ss:
    return "n/a"
  if axis == "n":
    last = max(s["step"] for s in ss)
    pts = sorted((s["n"], s["frac"]) for s in ss if s["step"] == last)
  else:
    big = max(s["n"] for s in ss)
    pts = sorted((s["step"], s["frac"]) for s in ss if s["n"] == big)
  for x, f in pts:
    if f is not None and f >= thr:
      return str(x)
  return f"> {pts[-1][0]}" if pts else "n/a"


def _f(s, pct=True):
  if s.get("frac") is None:
    return "n/a"
  return f"{100 * s['frac']:.0f}% [{100 * s['frac_lo']:.0f}, {100 * s['frac_hi']:.0f}]"


def markdown(summary, rows, meta, thresholds) -> str:
  lines = [f"# {meta.get('title', 'propensity')}", ""]
  lines += [f"- **{k}**: {v}" for k, v in meta.items() if k != "title"]
  lines += ["", "## Propensity vs capability", "",
            "Same organism, optimiser, steps and N. `propensity`: trained against N caught "
            "testing attacks; fraction flipped = 1 - deployment attack rate after / before. "
            "`capability`: trained on N examples of a task the model cannot do at the start; "
            "fraction learned = held-out accuracy. Both sampled at T=1; counts pooled over seeds, "
            "Wilson 95% intervals (the propensity interval is the after-rate's, scaled by the "
            "pooled before-rate).", ""]
  for beh in sorted({s["behaviour"] for s in summary}):
    ss = [s for s in summary if s["behaviour"] == beh]
    last = max(s["step"] for s in ss)
    big = max(s["n"] for s in ss)
    lines += [f"### {beh}: vs N (after {last} steps)", "",
              "| arm | N | n_train | seeds | eval n | before | rate after | fraction "
              "flipped / learned |", "|---|---|---|---|---|---|---|---|"]
    for s in sorted([s for s in ss if s["step"] == last], key=lambda s: (s["arm"], s["n"])):
      b = "n/a" if s["before"] is None else f"{100 * s['before']:.0f}%"
      lines.append(f"| {s['arm']} | {s['n']} | {s['n_train']:.0f}"
                   f"{' (capped)' if s['capped'] else ''} | {s['seeds']} | {s['eval_n']} | "
                   f"{b} | "
                   f"{100 * s['rate']:.0f}% [{100 * s['rate_lo']:.0f}, {100 * s['rate_hi']:.0f}]"
                   f" | {_f(s)} |")
    lines += ["", f"### {beh}: vs steps (N = {big})", "",
              "| arm | step | eval n | fraction flipped / learned |", "|---|---|---|---|"]
    for s in sorted([s for s in ss if s["n"] == big], key=lambda s: (s["arm"], s["step"])):
      lines.append(f"| {s['arm']} | {s['step']} | {s['eval_n']} | {_f(s)} |")
    lines += ["", "| arm | threshold | first N reaching it (last step) | first step reaching "
              f"it (N = {big}) |", "|---|---|---|---|"]
    for arm in ARMS:
      for thr in thresholds:
        lines.append(f"| {arm} | {thr:.0%} | {first_reaching(summary, arm, beh, thr, 'n')} | "
                     f"{first_reaching(summary, arm, beh, thr, 'step')} |")
    caps = [r for r in rows if r["behaviour"] == beh and r["arm"] == "capability"
            and r.get("deploy_after")]
    if caps:
      lines += ["", "Capability arm as a control for the propensity: deployment attack rate "
                "after training on the capability only (largest N):"]
      for r in sorted(caps, key=lambda r: (-r["n"], r["seed"])):
        if r["n"] != max(x["n"] for x in caps):
          continue
        d = r["deploy_after"]
        lines.append(f"- seed {r['seed']}: {100 * d['rate']:.0f}% [{100 * d['lo']:.0f}, "
                     f"{100 * d['hi']:.0f}] (before {100 * r['deploy_before']['rate']:.0f}%); "
                     f"capability teacher-forced loss {r['cap_loss_before']:.2f} -> "
                     f"{r['cap_loss']:.2f}, greedy accuracy {100 * r['cap_greedy']['rate']:.0f}%")
    bs = [r for r in rows if r["behaviour"] == beh and r["arm"] == "before"]
    if bs:
      r = bs[0]
      lines += ["", f"Catch: {r['n_caught']} of {r['m']} testing prompts "
                f"({100 * r['catch_rate']:.1f}% [{100 * r['catch_lo']:.1f}, "
                f"{100 * r['catch_hi']:.1f}]). Before training (seed {r['seed']}): deployment "
                f"attack {100 * r['deploy']['rate']:.0f}% (n={r['deploy']['n']}), capability "
                f"{100 * r['cap']['rate']:.0f}% at T=1 / {100 * r['cap_greedy']['rate']:.0f}% "
                f"greedy (n={r['cap']['n']})."]
  return "\n".join(lines) + "\n"


def figure(summary, path) -> str | None:
  if not summary:
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  behs = sorted({s["behaviour"] for s in summary})
  fig, axes = plt.subplots(len(behs), 2, figsize=(11, 4.2 * len(behs)), squeeze=False,
                           sharey=True)
  colors = {"propensity": "#c0392b", "capability": "#2c7fb8"}
  for (ax_n, ax_s), beh in zip(axes, behs):
    ss = [s for s in summary if s["behaviour"] == beh and s.get("frac") is not None]
    if not ss:
      continue
    last = max(s["step"] for s in ss)
    big = max(s["n"] for s in ss)
    for arm in ARMS:
      for ax, pts, xlab in (
          (ax_n, sorted([s for s in ss if s["arm"] == arm and s["step"] == last],
                        key=lambda s: s["n"]), "n"),
          (ax_s, sorted([s for s in ss if s["arm"] == arm and s["n"] == big],
                        key=lambda s: s["step"]), "step")):
        if not pts:
          continue
        x = [s[xlab] for s in pts]
        y = np.array([s["frac"] for s in pts])
        lo = np.array([s["frac_lo"] for s in pts])
        hi = np.array([s["frac_hi"] for s in pts])
        ax.errorbar(x, y, yerr=[np.maximum(y - lo, 0), np.maximum(hi - y, 0)], fmt="-o",
                    color=colors[arm], capsize=3, label=LABELS[arm])
    ax_n.set_xscale("log", base=2)
    ax_n.set_xlabel(f"N training examples (after {last} steps)")
    ax_s.set_xscale("log", base=2)
    ax_s.set_xlabel(f"optimizer steps (N = {big})")
    ax_n.set_ylabel(f"fraction flipped / learned ({beh})")
    for ax in (ax_n, ax_s):
      ax.set_ylim(-0.05, 1.05)
      ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=8, loc="upper left")
  fig.suptitle("Propensity vs capability: same organism, optimiser, steps and N "
               "(Wilson 95% CIs pooled over seeds)", fontsize=10)
  return report.savefig(fig, path)


def write_report(rows: list[dict], workdir: str, meta: dict, thresholds=(0.5, 0.9)) -> dict:
  summary = summarise(rows)
  figs = extra.write_outputs(
      workdir, summary, "summary.csv", markdown(summary, rows, meta, tuple(thresholds)),
      {"propensity_vs_capability.png": functools.partial(figure, summary)})
  return dict(summary=summary, figures=figs)


__all__ = ["run", "validate", "flipped", "summarise", "write_report"]
