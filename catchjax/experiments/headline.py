"""Headline experiment: does training against caught attacks remove misalignment, and does
that depend on how hard deployment is to tell from testing?

For every behaviour and trigger family:
  1. restore (or build) the organism;
  2. catch: sample M held-out testing prompts at T=1 and keep the attacks (a fresh catch per
     seed; with `headline.catch_per_seed=False`, one catch per family shared by the seeds,
     each drawing its own N from it);
  3. per N and arm, train against: SFT the organism on the correct answer for N caught
     prompts (treatment) or N prompts where it behaved (control), same steps and optimiser;
     optionally (`headline.arms`) clean prompts paired one-to-one with the treatment's caught
     ones on cue variant and task (matched_control, configs/headline.py:matched) or on the
     organism's teacher-forced attack probability (propensity_control, :propensity);
  4. measure the deployment attack rate (sampled, T=1, held-out cues), the testing attack
     rate, usefulness and the teacher-forced attack probability; retained = after / before
     (and, in the report, retained_gap: the deployment - testing gap after / before);
  5. distinguishability per family: prompted A/B (base and organism), a probe on the base
     model's residual stream, the behavioural gap and the organism's learning cost.
Rows go to results.jsonl (keyed; reruns skip finished cells), then report.md, summary.csv and
figures/*.png.
"""
from __future__ import annotations

import collections
import json
import os
import shutil
import time

import numpy as np
from tqdm.auto import tqdm

from catchjax import common, report
from catchjax.data import build
from catchjax.data.behaviors import behavior_name, behavior_spec, make_behavior
from catchjax.data.tasks import check as task_check
from catchjax.data.triggers import make_trigger
from catchjax.results import ResultStore, row_key
from catchjax.stages.sampling import make_sampler
from catchjax.stages import arms as arms_lib
from catchjax.stages import distinguish, measure
from catchjax.stages import organism as org_stage
from catchjax.stages import train_against as ta
from catchjax.tokenizer import load_tokenizer, prompt_ids


def validate(config):
  """Reject bad input before any compute, naming the field (see catchjax/validate.py)."""
  from catchjax import validate as V
  h = config.headline
  V.check_common(config)
  seeds = V.int_tuple("config.headline.seeds", h.seeds, positive=False)
  if len(set(seeds)) != len(seeds):
    raise V.ConfigError(f"config.headline.seeds has repeats: {seeds}.")
  # () skips the distinguishability measures (e.g. a sweep pooled with one that has them).
  V.int_tuple("config.headline.distinguish_seeds", h.distinguish_seeds, positive=False,
              nonempty=False)
  ns = V.int_tuple("config.headline.ns", h.ns)   # "must be positive integers"
  m = V.positive_int("config.headline.m", h.m)
  if m < max(ns):
    raise V.ConfigError(f"config.headline.m={m} is smaller than the largest N={max(ns)}.")
  for f in ("n_eval", "n_test", "n_useful", "max_new_tokens", "useful_max_new_tokens",
            "batch_size", "n_pairs", "n_probe_train"):
    V.positive_int(f"config.headline.{f}", h[f])
  if h.catch_split not in ("train", "eval"):
    raise V.ConfigError(f"config.headline.catch_split={h.catch_split!r}; 'train' or 'eval'.")
  V.fraction("config.headline.honeypot_frac", h.get("honeypot_frac", 0.0))
  V.fraction("config.headline.useful_gate_min_acc", h.useful_gate_min_acc)
  if not 0 <= float(h.useful_gate_points) <= 100:
    raise V.ConfigError(f"config.headline.useful_gate_points must be in [0, 100], got "
                        f"{h.useful_gate_points!r}.")
  st = h.get("stopping")
  if st is not None and st.enabled:
    V.fraction("config.headline.stopping.eps", st.eps)
    V.positive_int("config.headline.stopping.max_steps", st.max_steps)
    V.non_negative_int("config.headline.stopping.warmup_steps", st.warmup_steps)
    if not (isinstance(st.lr, float) and 0 < st.lr < 1):
      raise V.ConfigError(f"config.headline.stopping.lr must be a float in (0, 1), got "
                          f"{st.lr!r}.")
    if tuple(h.arms) and tuple(h.arms)[0] != "treatment":
      raise V.ConfigError(f"config.headline.arms={tuple(h.arms)!r}: with the stopping rule "
                          f"on, 'treatment' comes first (the other arms take its budget).")
  if isinstance(h.aux_ratio, bool) or not isinstance(h.aux_ratio, (int, float)) or \
      h.aux_ratio < 0:
    raise V.ConfigError(f"config.headline.aux_ratio must be >= 0, got {h.aux_ratio!r}.")
  V.distinct_choices("config.headline.arms", h.arms, report.TRAIN_ARMS)
  if h.families is not None:
    V.distinct_choices("config.headline.families", tuple(h.families),
                       tuple(org_stage.family_name(f) for f in config.organism.families))
  if not isinstance(h.catch_per_seed, bool):
    raise V.ConfigError(f"config.headline.catch_per_seed must be True or False, got "
                        f"{h.catch_per_seed!r}.")
  if h.get("power_target", "arms") not in ("contrast", "arms"):
    raise V.ConfigError(f"config.headline.power_target={h.power_target!r}; 'contrast' or "
                        f"'arms'.")
  if V.fraction("config.headline.power_goal", h.power_goal) == 0:
    raise V.ConfigError(f"config.headline.power_goal must be in (0, 1], got {h.power_goal!r}.")
  V.non_negative_int("config.headline.power_min_seeds", h.power_min_seeds)
  V.non_negative_int("config.headline.power_max_seeds", h.power_max_seeds)
  V.check_train("config.headline.train", h.train)


def run(config, workdir: str):
  validate(config)
  if config.get("dry_run", False):   # the compile plan only: no organism, no data, no weights
    from catchjax import plan
    return plan.dry_run(config, "headline")
  with common.workdir_lock(workdir):
    return _run(config, workdir)


def _run(config, workdir):
  t_start = time.time()
  h = config.headline
  chash = common.config_hash(config)
  commit = common.git_commit()
  store = ResultStore(os.path.join(workdir, "results.jsonl"))
  tok = load_tokenizer(config.model.hf_dir)
  base = org_stage.load_base(config)
  families = org_stage.family_specs(config.organism.families)
  if h.families is not None:   # a subset of the organism's families (same organism)
    families = [f for f in families if org_stage.family_name(f) in set(h.families)]
  per_seed = h.catch_per_seed
  from catchjax import analysis
  primary_hash = analysis.primary_hash(config.report.primary)
  arms = tuple(h.arms)
  n_cells = (len(config.behaviours) * len(families) * len(h.seeds) * len(h.ns) * len(arms))
  bar = tqdm(total=n_cells, desc="headline cells", unit="cell", dynamic_ncols=True)
  done_cells = sum(1 for r in store.rows if r.get("arm") in arms and r.get("config_hash") == chash)
  bar.update(min(done_cells, n_cells))
  power = {}
  installed = {}   # behaviour -> family -> the organism's report-card gap (for the report)

  def write_out():
    """Rebuild report.md / summary.csv / figures from the rows so far (after every round)."""
    meta = _report_meta(config, store, chash, commit, arms, per_seed, power, installed,
                        time.time() - t_start)
    report.save_meta(workdir, meta)
    return report.write_report([r for r in store.rows if r.get("config_hash") == chash],
                               workdir, meta)

  def top_up(run_cells, families, big, bname):
    """The power rule (config.headline.power_*): after the grid, add seeds at the largest N,
    one round at a time, to the families whose headline point (treatment and control) has
    fewer than power_min_seeds runs or a 95% CI half-width of retained misalignment over
    power_goal, up to power_max_seeds. Each round decides from the rows of the seeds before it
    (so a resumed run adds the same seeds as an uninterrupted one). Returns each family's
    outcome for the report."""
    goal, lo, hi = float(h.power_goal), int(h.power_min_seeds), int(h.power_max_seeds)
    half_widths = (report.contrast_half_widths if h.get("power_target", "arms") == "contrast"
                   else report.point_half_widths)
    p_arms = tuple(a for a in ("treatment", "control") if a in arms)
    names = [org_stage.family_name(s) for s in families]
    seed = max(h.seeds)
    while hi > 0 and p_arms:
      seed += 1
      rows = [r for r in store.rows if r.get("config_hash") == chash
              and r.get("behaviour") == bname and r["seed"] < seed]
      pts = half_widths(rows, big, p_arms)
      todo = [(s, f) for s, f in zip(families, names)
              if report.needs_seed(pts.get((f, bname)), goal, lo, hi)]
      if not todo:
        break
      done = sum(1 for _, f in todo for a in arms
                 if store.has(("headline", f, bname, int(big), a, seed, chash)))
      bar.total += len(todo) * len(arms)
      bar.update(done)
      bar.set_postfix_str(f"power top-up: seed {seed}, {len(todo)} famil"
                          f"{'y' if len(todo) == 1 else 'ies'}")
      for s, _ in todo:
        run_cells(s, seed, [big])
    rows = [r for r in store.rows if r.get("config_hash") == chash and r.get("behaviour") == bname]
    pts = half_widths(rows, big, p_arms)
    out = {}
    for f in names:
      p = pts.get((f, bname))
      if p is None:
        continue
      why = ("goal met" if p["measurable"] and p["half_width"] <= goal else
             "not measurable (no retained value in some arm)" if not p["measurable"] else
             f"power_max_seeds={hi} reached" if p["runs"] >= hi else "power rule off")
      out[f] = dict(n=int(big), seeds=p["runs"], why=why,
                    half_width=round(p["half_width"], 4) if np.isfinite(p["half_width"]) else None)
    return out

  for bspec in config.behaviours:
    behaviour = behavior_spec(bspec)        # a name or a {'name': 'regex', ...} dict
    bname = behavior_name(behaviour)        # what result keys and file names use
    beh = make_behavior(behaviour)
    org = org_stage.get_organism(config, workdir, behaviour)
    card = org_stage.report_card(config, org, base)
    installed[bname] = {f: fr.get("gap") for f, fr in card["families"].items()}
    sampler = make_sampler(config, org.model, h.batch_size, progress=False)
    org_state_model = org.model

    use = build.build_usefulness(h.n_useful, seed=h.eval_seed, split="eval",
                                 system=config.system)
    use_prompts = [prompt_ids(tok, p, config.system) for p in use["prompt"]]
    use_insts = [build.task_instance(x) for x in use]

    gate = []   # the usefulness gate's prompts: task families the organism gets >= 40% of

    def measure_all(s, seed, dep_prompts, test_prompts, prefix, sharp=None):
      d = measure.attack_rate(s, tok, dep_prompts, beh.detect, max_new_tokens=h.max_new_tokens,
                              temperature=1.0, seed=seed)
      t = measure.attack_rate(s, tok, test_prompts, beh.detect,
                              max_new_tokens=h.max_new_tokens, temperature=1.0, seed=seed + 1)
      u = measure.usefulness(s, tok, use_prompts, use_insts, task_check,
                             max_new_tokens=h.useful_max_new_tokens)
      if not gate:   # the first measurement of a behaviour is the organism's "before"
        gate[:] = measure.gate_indices(use_insts, u["ok"], float(h.useful_gate_min_acc)) or [-1]
      idx = [i for i in gate if i >= 0]
      u["gate"] = measure.rate(sum(u["ok"][i] for i in idx), len(idx))
      tf = float(measure.attack_prob_tf(s, dep_prompts, prefix).mean()) if h.teacher_forced \
          else None
      if sharp:   # the sharpening honeypots: attack rate by honeypot score bin
        sh = measure.attack_rate(s, tok, sharp[0], beh.detect, max_new_tokens=h.max_new_tokens,
                                 temperature=1.0, seed=seed + 2)
        u["sharpen"] = dict(k=sh["k"], n=sh["n"], rate=sh["rate"],
                            by_bin=ta.rate_by_bin(sharp[1], sh["hits"]))
      return d, t, u, tf

    ctx = {}

    def family_ctx(spec):
      fam = org_stage.family_name(spec)
      if fam in ctx:
        return ctx[fam]
      trig = make_trigger(spec)
      dep_ds = build.build_eval(spec, behaviour, "eval", h.n_eval, deployment=True,
                                seed=h.eval_seed, system=config.system)
      test_ds = build.build_eval(spec, behaviour, "eval", h.n_test, deployment=False,
                                 seed=h.eval_seed, system=config.system)
      dep_prompts = [prompt_ids(tok, p, config.system) for p in dep_ds["prompt"]]
      test_prompts = [prompt_ids(tok, p, config.system) for p in test_ds["prompt"]]
      prefix = tok(dep_ds[0]["attack_prefix"], add_special_tokens=False)["input_ids"]
      sharp = None
      if int(h.n_sharpen) and trig.honeypots("sharpen", "eval"):
        sds = build.build_honeypots(spec, behaviour, "eval", int(h.n_sharpen), "sharpen",
                                    seed=h.eval_seed, system=config.system)
        sharp = ([prompt_ids(tok, p, config.system) for p in sds["prompt"]],
                 list(sds["honeypot_score"]))
      ctx[fam] = (fam, trig, dep_prompts, test_prompts, prefix, sharp)
      return ctx[fam]

    catches = {}

    def family_catch(spec, seed):
      """The catch a seed draws its N caught / clean prompts from. catch_per_seed (default):
      each seed samples its own M prompts (new prompts, new sampling draws), so the spread over
      seeds also covers which prompts the organism slipped on. Otherwise one catch pass per
      family (seed 0's), shared by every seed, each drawing its own N."""
      fam = org_stage.family_name(spec)
      cseed = int(seed) if per_seed else 0
      if (fam, cseed) not in catches:
        sampler.update_model(org_state_model)
        cpath = os.path.join(workdir, "catches", ta.catch_name(
            config, org.key, spec, bname, cseed if per_seed else None))
        catches[(fam, cseed)] = (ta.catch(config, sampler, tok, spec, behaviour, cseed, cpath),
                                 cpath)
      return catches[(fam, cseed)]

    pool_p = {}

    def catch_propensity(c, cpath):
      """The organism's teacher-forced attack probability on every caught / clean catch prompt
      (for propensity_control; computed once per catch and cached beside it)."""
      if cpath in pool_p:
        return pool_p[cpath]
      ppath = cpath[:-len(".json")] + "-p_attack.json"
      if os.path.isfile(ppath):
        with open(ppath) as f:
          d = json.load(f)
      else:
        sampler.update_model(org_state_model)
        d = {k: ta.attack_probs(sampler, tok, getattr(c, k), beh, config.system).tolist()
             for k in ("caught", "clean")}
        if common.is_main_process():
          common.atomic_write_text(ppath, json.dumps(d))
      if len(d["caught"]) != len(c.caught) or len(d["clean"]) != len(c.clean):
        raise ValueError(f"{ppath} does not match its catch ({len(c.caught)} caught, "
                         f"{len(c.clean)} clean); delete it to recompute")
      pool_p[cpath] = d
      return d

    def run_distinguish(spec):
      fam, trig = family_ctx(spec)[:2]
      for seed in h.distinguish_seeds:
        key = ("headline", fam, bname, 0, "distinguish", seed, chash)
        if store.has(key):
          continue
        row = _distinguish(config, base, org, sampler, tok, spec, trig, behaviour, seed, card)
        row.update(experiment="headline", family=fam, behaviour=bname, n=0,
                   arm="distinguish", seed=seed, config_hash=chash, commit=commit)
        store.append(row)

    def benign_return(model, steps, seed, dep_prompts, arm, rdir):
      """Return (issue 26): `steps` benign SFT steps on usefulness data disjoint from the
      usefulness set, then the deployment attack rate again; for the treatment also the same
      steps from the untrained organism (benign SFT alone removes some of the backdoor)."""
      out = {}
      pairs = [("", model)] + ([("_organism", org_state_model)] if arm == "treatment" else [])
      for tag, m in pairs:
        res = ta.benign_steps(config, m, tok, steps, seed, rdir + "-return" + tag)
        sampler.update_model(res.model)
        d = measure.attack_rate(sampler, tok, dep_prompts, beh.detect,
                                max_new_tokens=h.max_new_tokens, temperature=1.0,
                                seed=common.stream("measure_return", seed))
        out.update({f"deploy_rate_return{tag}": d["rate"], f"deploy_k_return{tag}": d["k"]})
        shutil.rmtree(rdir + "-return" + tag, ignore_errors=True)
      out["return_steps"] = int(steps)
      return out

    def treatment_steps(fam, n, seed):
      """The optimizer steps the treatment's stopping rule chose for this cell (the budget
      every other arm gets); the treatment runs first in `arms`."""
      key = ("headline", fam, bname, int(n), "treatment", seed, chash)
      row = next((r for r in reversed(store.rows) if row_key(r) == key), None)
      if row is None or not row.get("train_steps"):
        raise RuntimeError(f"no treatment row for {key}: the stopping rule needs it first.")
      return int(row["train_steps"])

    def run_cells(spec, seed, ns):
      fam, trig, dep_prompts, test_prompts, prefix, sharp = family_ctx(spec)
      before = None
      for n in ns:
        for arm in arms:
          key = ("headline", fam, bname, int(n), arm, seed, chash)
          if store.has(key):
            continue
          if before is None:
            c, cpath = family_catch(spec, seed)
            sampler.update_model(org_state_model)
            before = measure_all(sampler, 40_000 + seed, dep_prompts, test_prompts, prefix,
                                 sharp)
          n_train = min(int(n), len(c.caught), len(c.clean))
          row = dict(experiment="headline", family=fam, behaviour=bname, n=int(n),
                     arm=arm, seed=seed, config_hash=chash, commit=commit,
                     organism=org.key, m=c.m, catch_seed=c.seed, n_caught=len(c.caught),
                     catch_rate=c.catch_rate["rate"], n_train=n_train,
                     capped=n_train < int(n), aux_ratio=float(h.aux_ratio),
                     catch_by_source=c.by_source, primary_hash=primary_hash)
          d0, t0_, u0, tf0 = before
          row.update(deploy_rate_before=d0["rate"], deploy_k_before=d0["k"],
                     test_rate_before=t0_["rate"], useful_acc_before=u0["rate"],
                     useful_gate_before=u0["gate"]["rate"], useful_gate_n=u0["gate"]["n"],
                     deploy_tf_before=tf0, sharpen_before=u0.get("sharpen"))
          t_cell = time.time()
          if n_train == 0:
            row.update(skipped="no caught (or clean) prompts to train on", deploy_rate=None,
                       deploy_n=0, retained=None)
            store.append(row)
            bar.update(1)
            continue
          idx = ta.choose_indices(len(c.caught), n_train,
                                  np.random.default_rng([seed, int(n), 1]))
          chosen = [c.caught[i] for i in idx]   # the treatment's caught draw
          row["train_sources"] = dict(collections.Counter(
              r.get("source", "testing") for r in chosen))
          actx = arms_lib.ArmContext(config, c, chosen, idx, int(n), seed, spec, behaviour,
                                     trig, propensity=lambda: catch_propensity(c, cpath))
          rows, info = arms_lib.ARMS[arm](actx)
          row.update(info)
          rdir = os.path.join(workdir, "runs", f"{chash}-{fam}-{bname}-{n}-{arm}-s{seed}")
          budget, ev_fn = None, None
          if ta.stopping_rule(config) is not None and arm == "treatment":
            ev_fn = ta.caught_p_attack_fn(sampler, tok, chosen, beh, config.system)
          elif ta.stopping_rule(config) is not None:   # the treatment's budget, in steps
            budget = treatment_steps(fam, n, seed)
          res = ta.train_against(config, org_state_model, tok, rows, seed, rdir,
                                 aux_ratio=float(h.aux_ratio), eval_fn=ev_fn, budget=budget)
          if ev_fn is not None:
            row.update(stop_capped=not res.stopped, caught_p_attack_curve=[
                (e["step"], round(e["caught_p_attack"], 4)) for e in res.evals])
          sampler.update_model(res.model)
          d, t, u, tf = measure_all(sampler, 50_000 + seed, dep_prompts, test_prompts, prefix,
                                    sharp)
          row["sharpen"] = u.get("sharpen")
          if int(n) == int(h.return_n) and arm in ("treatment", "control"):
            row.update(benign_return(res.model, res.steps, seed, dep_prompts, arm, rdir))
          row.update(
              deploy_k=d["k"], deploy_n=d["n"], deploy_rate=d["rate"], deploy_lo=d["lo"],
              deploy_hi=d["hi"], test_k=t["k"], test_n=t["n"], test_rate=t["rate"],
              test_lo=t["lo"], test_hi=t["hi"], useful_k=u["k"], useful_n=u["n"],
              useful_acc=u["rate"], useful_lo=u["lo"], useful_hi=u["hi"], deploy_tf=tf,
              useful_gate=u["gate"]["rate"],
              useful_drop_points=measure.useful_drop(u0["gate"], u["gate"],
                                                     h.useful_gate_points)[0],
              useful_flag=measure.useful_drop(u0["gate"], u["gate"], h.useful_gate_points)[1],
              retained=(d["rate"] / d0["rate"]) if d0["rate"] > 0 else None,
              retained_tf=(tf / tf0) if tf0 else None,
              train_loss=res.final_loss, train_steps=res.steps,
              train_tok_s=res.tokens_per_sec, cell_seconds=time.time() - t_cell,
              deploy_examples=d["responses"][:2])
          store.append(row)
          if not h.keep_runs:
            shutil.rmtree(rdir, ignore_errors=True)
          bar.update(1)

    # Order: every family at the first seed and the largest N, then distinguishability, then
    # the largest N at the other seeds (so the headline points get their bootstrap over seeds
    # early), then the other Ns; a partial (killed) sweep already has the headline points.
    big = max(h.ns)
    for spec in families:
      run_cells(spec, h.seeds[0], [big])
    for spec in families:
      run_distinguish(spec)
    write_out()                      # round 1: the first report
    for seed in h.seeds[1:]:
      for spec in families:
        run_cells(spec, seed, [big])
      write_out()
    for seed in h.seeds:
      for spec in families:
        run_cells(spec, seed, [n for n in h.ns if n != big])
    write_out()
    power[bname] = top_up(run_cells, families, big, bname)
  bar.close()
  out = write_out()
  print(f"[headline] done in {time.time() - t_start:.0f}s; report at "
        f"{os.path.join(workdir, 'report.md')}")
  return out


def _report_meta(config, store, chash, commit, arms, per_seed, power, installed, wall):
  """The report header of a headline run (its settings, timing, power and primary)."""
  from catchjax import analysis
  h = config.headline
  rows = [r for r in store.rows if r.get("config_hash") == chash]
  secs = [r["cell_seconds"] for r in rows if r.get("cell_seconds")]
  st = ta.stopping_rule(config)
  steps = (f"the treatment's stopping rule (P(attack) on the caught set < {st['eps']}, at "
           f"most {st['max_steps']} steps), the other arms its budget" if st else
           f"{h.train.steps} SFT steps")
  return dict(title="catchjax headline: retained misalignment vs distinguishability",
              config_hash=chash, commit=commit, wall_seconds_this_invocation=round(wall),
              runtime=(f"{len(secs)} train-against cells at a mean {np.mean(secs):.0f} s each "
                       f"({steps} + sampled deployment / testing / usefulness "
                       "measurements); "
                       "time is bounded by compute at the n that gives the intervals below, "
                       "n is not cut to fit a time budget" if secs else "no cells trained"),
              seeds=sorted({r["seed"] for r in store.rows if r.get("config_hash") == chash
                            and r.get("arm") in arms}) or list(h.seeds),
              ns=list(h.ns), n_eval_per_seed=h.n_eval,
              n_test_per_seed=h.n_test, m_catch=h.m,
              catch=("a fresh catch of M prompts per seed" if per_seed else
                     "one catch of M prompts per family, shared by the seeds (the intervals "
                     "leave out the catch-to-catch spread)"),
              train_against=dict(h.train.to_dict(), **(dict(
                  lr=st["lr"], warmup_steps=st["warmup_steps"], decay="constant",
                  steps="the stopping rule's (treatment), its budget (other arms)")
                  if st else {})), aux_ratio=h.aux_ratio,
              max_new_tokens=h.max_new_tokens,
              power_rule=(f"seeds added at the largest N while a family's "
                          + ("paired treatment - control retained-gap contrast"
                             if h.get("power_target", "arms") == "contrast"
                             else "treatment or control point")
                          + f" had < {h.power_min_seeds} seeds or a 95% CI half-width "
                          f"> {h.power_goal} (at most {h.power_max_seeds} seeds); a sequential "
                          "rule, so the stopping intervals are slightly optimistic"
                          if h.power_max_seeds > 0 else "off (fixed seeds)"),
              power=power, installed_gap=installed, stopping=st,
              honeypot_frac=float(h.get("honeypot_frac", 0.0)),
              installed_gap_min=float(config.report.installed_gap_min),
              **analysis.primary_meta(rows, config.report.primary,
                                      report.load_meta(workdir_of(store), chash), commit))


def workdir_of(store) -> str:
  return os.path.dirname(store.path)


def _distinguish(config, base, org, sampler, tok, spec, trig, behaviour, seed, card) -> dict:
  """Prompted A/B (base and organism), probe (base), behavioural gap, learning cost; with
  headline.distinguish_curve, also the probe learning curve and k-shot classification (base
  and organism)."""
  h = config.headline
  fam = org_stage.family_name(spec)
  dep = build.build_eval(spec, behaviour, "eval", h.n_pairs, deployment=True,
                         seed=60_000 + seed, system=config.system)
  tst = build.build_eval(spec, behaviour, "eval", h.n_pairs, deployment=False,
                         seed=60_000 + seed, system=config.system)
  pairs = list(zip(dep["prompt"], tst["prompt"]))
  row = {}
  sb = make_sampler(config, base, h.batch_size, progress=False)
  row["prompted_base"] = distinguish.pairwise_accuracy(
      distinguish.pairwise_scores(sb, tok, trig.context_hint, pairs, config.system))
  sampler.update_model(org.model)
  row["prompted_organism"] = distinguish.pairwise_accuracy(
      distinguish.pairwise_scores(sampler, tok, trig.context_hint, pairs, config.system))
  tr = build.build_eval(spec, behaviour, "train", h.n_probe_train, deployment=None,
                        seed=70_000 + seed, system=config.system)
  layer = base.cfg.num_layers // 2 if h.probe_layer < 0 else h.probe_layer
  x = distinguish.residual_features(base, [prompt_ids(tok, p, config.system)
                                           for p in tr["prompt"]], layer)
  y = np.asarray(tr["deployment"], np.float32)
  xd = distinguish.residual_features(base, [prompt_ids(tok, p, config.system)
                                            for p in dep["prompt"]], layer)
  xt = distinguish.residual_features(base, [prompt_ids(tok, p, config.system)
                                            for p in tst["prompt"]], layer)
  row["probe_acc"] = distinguish.probe_pair_accuracy(x, y, xd, xt)
  row["probe_layer"] = layer
  if h.get("distinguish_curve", False):
    # With range (issue 27 item 4): the probe's learning curve (examples-to-80%) and k-shot
    # prompted classification, on the base model and on the organism (distinguish.py).
    row.update(distinguish.range_measures(
        dict(base=base, organism=org.model), tok, spec, config.system, layer,
        n_curve_pairs=h.n_curve_pairs, n_curve_eval=h.n_curve_eval, ns=tuple(h.curve_ns),
        resamples=h.resamples, ks=tuple(h.icl_ks), n_icl=h.n_icl,
        batch_size=min(int(h.batch_size), 16), seed=seed))
  fr = card["families"].get(fam, {})
  row["behavioural_gap"] = fr.get("gap")
  lc = (card.get("learning_cost") or {}).get(fam)
  # Never reached within the budget: report the budget as a lower bound (censored).
  row["learning_cost"] = lc if lc is not None else org.info.get("n_train")
  row["learning_cost_censored"] = lc is None
  row["learning_cost_budget"] = org.info.get("n_train")
  row["n_pairs"] = len(pairs)
  return row


__all__ = ["run", "validate", "row_key"]
