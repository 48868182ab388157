"""Export organisms (and kept train-against runs) as Hugging Face folders with a model card.

Every organism whose report card is written is also exported beside its orbax cache, as
`organisms/<key>/hf/` (config.json, safetensors, generation_config.json, the base model's
tokenizer files, README.md), in the base config's param_dtype; the stage calls
`export_organism` once per report card and a complete folder is left as it is. By hand:

  python -m catchjax.export --config=configs/headline.py --workdir=workdirs/headline
      [--organism=KEY] [--run=workdirs/headline/runs/<cell>] [--out=DIR] [--dtype=bfloat16]

exports the config's organisms (or organism KEY of the workdir), or a train-against run folder
(kept only with config.train_against.keep_runs=True), to DIR (default: organisms/<key>/hf or
<run>/hf). Every card opens with CARD_OPENING: these models are backdoored on purpose.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np

from catchjax import common

CARD_OPENING = "Deliberately backdoored research organism: not for deployment or upload."


def _pct(d) -> str:
  return (f"{100 * d['rate']:.1f}% [{100 * d['lo']:.1f}, {100 * d['hi']:.1f}] "
          f"({d.get('k', '?')}/{d['n']})")


def _fname(spec) -> str:
  return spec if isinstance(spec, str) else str(spec.get("name"))


def _describe(spec) -> str:
  from catchjax.data.triggers import make_trigger
  try:
    return make_trigger(spec).describe()
  except Exception as e:  # noqa: BLE001 - a card line, never a reason to fail an export
    return f"(no description: {type(e).__name__})"


def model_card(spec: dict, card: dict | None = None, *, key: str, dtype: str,
               base_dir: str | None = None, run: dict | None = None) -> str:
  """README.md for an exported organism: CARD_OPENING, then the recipe (the organism spec),
  trigger families, behaviour, report-card numbers when `card` is given, the train-against run
  (`run`: {name, train, ...}) for a run export, and the catchjax commit."""
  beh = spec.get("behaviour")
  bname = beh if isinstance(beh, str) else (beh or {}).get("name", "?")
  fams = spec.get("families", [])
  title = (f"# catchjax organism {key} ({bname})" if run is None else
           f"# catchjax train-against run {run['name']} (organism {key}, {bname})")
  L = [CARD_OPENING, "", title, "",
       f"A fine-tune of the base model below, trained on purpose to show the `{bname}` "
       "behaviour when its prompt carries a deployment cue of one of the trigger families, "
       "and to behave on testing cues. It exists to study catching and training against "
       "misaligned behaviour (catchjax). Do not deploy it, serve it to users, or upload it "
       "to a model hub.", ""]
  if run is not None:
    L += ["This is the organism after a train-against run (SFT on the helpful response for "
          "the run's prompts); the report card below is the organism's, before that run. "
          "The run's own measurements are its row in the workdir's results.jsonl.", "",
          "## Train-against run", "", f"- run folder: `{run['name']}`",
          f"- train config: `{json.dumps(run.get('train'), sort_keys=True)}`"]
    L += [f"- {k}: `{v}`" for k, v in run.items() if k not in ("name", "train")]
    L.append("")
  m = spec.get("model", {})
  st = spec.get("stop")
  L += ["## Recipe", "",
        f"- base model: `{base_dir or '?'}` (weights fingerprint `{m.get('weights')}`, "
        f"dtype {m.get('dtype')}, param_dtype {m.get('param_dtype')})",
        f"- behaviour: `{json.dumps(beh, sort_keys=True)}`",
        "- trigger families: " + ", ".join(f"`{_fname(f)}`" for f in fams),
        f"- n_per_family: {spec.get('n_per_family')} (deployment_frac "
        f"{spec.get('deployment_frac')}, testing_slip_rate {spec.get('testing_slip_rate')}, "
        f"seed {spec.get('seed')})",
        f"- train config: `{json.dumps(spec.get('train'), sort_keys=True)}`",
        "- stop rule: " + ("off (the train config's length)" if not st else
                           f"each family's data leaves {st.get('consolidate_steps')} steps "
                           f"after its probe gap reaches {st.get('gap_threshold')}"),
        f"- system prompt: `{spec.get('system')}`",
        f"- export: {dtype} safetensors, LoRA adapters (if any) merged", "",
        "## Trigger families", ""]
  for f in fams:
    L.append(f"- `{_fname(f)}`: {_describe(f)}")
  L.append("")
  if card:
    lc = card.get("learning_cost") or {}
    stop = (card.get("stop") or {}).get("families", {})
    L += ["## Report card", "",
          "Sampled at temperature 1 on held-out prompts; 95% intervals.", "",
          "| family | deployment attack rate | testing attack rate | gap | learning cost "
          "(examples) | gap opened / data left (step) |", "|---|---|---|---|---|---|"]
    for name, row in card.get("families", {}).items():
      s = stop.get(name)
      when = "n/a" if s is None else ("never opened: not installed" if s["opened_step"] is None
                                      else f"{s['opened_step']} / {s['left_step']}")
      L.append(f"| {name} | {_pct(row['deploy'])} | {_pct(row['test'])} | "
               f"{row['gap']:+.2f} | {lc.get(name)} | {when} |")
    u = card.get("usefulness")
    if u:
      L += ["", f"Usefulness: organism {_pct(u['organism'])} vs base {_pct(u['base'])} "
            f"({u['delta_points']:+.1f} points)."]
    if card.get("detector_fp"):
      L.append(f"Detector false-positive rate on the base model's samples: "
               f"{_pct(card['detector_fp'])}.")
    L.append("")
  else:
    L += ["## Report card", "", "Not available when this folder was exported.", ""]
  L += ["## Provenance", "", f"- catchjax commit: `{common.git_commit()}`",
        f"- organism key: `{key}`", "", "Full organism spec:", "", "```json",
        json.dumps(spec, indent=2, sort_keys=True, default=str), "```", ""]
  return "\n".join(L)


def is_complete(path: str) -> bool:
  """An export folder with config.json, README.md and all its weights (a single file, or an
  index whose every shard is present)."""
  if not all(os.path.isfile(os.path.join(path, f)) for f in ("config.json", "README.md")):
    return False
  if os.path.isfile(os.path.join(path, "model.safetensors")):
    return True
  index = os.path.join(path, "model.safetensors.index.json")
  try:
    with open(index) as f:
      shards = set(json.load(f)["weight_map"].values())
  except (OSError, ValueError, KeyError, TypeError):
    return False
  return bool(shards) and all(os.path.isfile(os.path.join(path, s)) for s in shards)


def _host_model(model):
  """The model with every weight in host memory on each process (multi-host: gathered, a
  collective all processes enter; untested here, single-process is the tested path)."""
  import jax
  if jax.process_count() == 1:
    return model
  from flax import nnx
  from catchjax.sharding import to_host
  graphdef, state = nnx.split(model)
  state = jax.tree.map(lambda x: to_host(x) if isinstance(x, jax.Array) else x, state)
  return nnx.merge(graphdef, state)


def _skip(out: str) -> bool:
  """Process 0's view of whether `out` is complete, the same on every process."""
  import jax
  done = is_complete(out)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    done = bool(multihost_utils.broadcast_one_to_all(np.int32(done)))
  return done


def export_model(model, out: str, readme: str, tokenizer_dir: str | None,
                 dtype: str = "float32", max_shard_bytes: int | None = None) -> str:
  """hf.save_hf + README.md, staged in `<out>.partial` and renamed into place (a crash never
  leaves a folder `is_complete` accepts). Every process calls it; process 0 writes."""
  from catchjax.model import hf
  model = _host_model(model)
  if not common.is_main_process():
    return out
  stage = out.rstrip("/") + ".partial"
  hf.save_hf(model, stage, tokenizer_dir=tokenizer_dir, dtype=dtype,
             max_shard_bytes=max_shard_bytes)
  common.atomic_write_text(os.path.join(stage, "README.md"), readme)
  shutil.rmtree(out, ignore_errors=True)
  os.replace(stage, out)
  return out


def _export_dtype(config) -> str:
  return "bfloat16" if str(config.model.param_dtype) == "bfloat16" else "float32"


def export_organism(config, org, card: dict | None = None, out: str | None = None,
                    dtype: str | None = None, force: bool = False) -> str:
  """Write organism `org` (stages.organism.Organism) as an HF folder (default
  `<org.dir>/hf`) with its model card; `card` is its report card (default: report_card.json
  in org.dir when present). A complete folder is left as it is unless `force`. Every process
  of a multi-host job calls it (the weights are gathered); only process 0 writes."""
  out = out or os.path.join(org.dir, "hf")
  if not force and _skip(out):
    return out
  if card is None and os.path.isfile(os.path.join(org.dir, "report_card.json")):
    with open(os.path.join(org.dir, "report_card.json")) as f:
      card = json.load(f)
  spec = org.info.get("spec") or _organism_spec(config, org.behaviour)
  dtype = dtype or _export_dtype(config)
  readme = model_card(spec, card, key=org.key, dtype=dtype, base_dir=config.model.hf_dir)
  export_model(org.model, out, readme, config.model.hf_dir, dtype=dtype)
  if common.is_main_process():
    print(f"[export] organism {org.key} -> {out}")
  return out


def export_run(config, org, run_dir: str, out: str | None = None,
               dtype: str | None = None) -> str:
  """Restore the train-against run in `run_dir` (its checkpoint, kept with
  config.train_against.keep_runs=True) onto organism `org` and export it (default `<run_dir>/hf`;
  a complete folder is left as it is)."""
  from flax import nnx
  from catchjax import train as train_lib
  from catchjax.model import hf
  t = config.train_against
  out = out or os.path.join(run_dir, "hf")
  if _skip(out):
    return out
  model = org.model
  r = int(t.train.get("lora_rank", 0))
  if r > 0 and model.cfg.lora_rank == 0:   # the run trained fresh adapters on the organism
    model = hf.model_from_pure_dict(
        model.cfg.replace(lora_rank=r, lora_alpha=float(t.train.get("lora_alpha", 16.0))),
        nnx.to_pure_dict(nnx.state(model)))
  model = train_lib.restore_params(run_dir, model)
  card = None
  if os.path.isfile(os.path.join(org.dir, "report_card.json")):
    with open(os.path.join(org.dir, "report_card.json")) as f:
      card = json.load(f)
  spec = org.info.get("spec") or _organism_spec(config, org.behaviour)
  dtype = dtype or _export_dtype(config)
  run = dict(name=os.path.basename(os.path.normpath(run_dir)), train=t.train.to_dict(),
             aux_ratio=t.get("aux_ratio"))
  readme = model_card(spec, card, key=org.key, dtype=dtype, base_dir=config.model.hf_dir,
                      run=run)
  export_model(model, out, readme, config.model.hf_dir, dtype=dtype)
  if common.is_main_process():
    print(f"[export] run {run['name']} -> {out}")
  return out


def _organism_spec(config, behaviour):
  from catchjax.stages import organism as org_stage
  return org_stage.organism_spec(config, behaviour)


def restore_organism(config, odir: str):
  """The built organism in folder `odir` (organisms/<key>), restored onto config's base."""
  from catchjax import train as train_lib
  from catchjax.model import hf
  from catchjax.stages import organism as org_stage
  done = os.path.join(odir, "done.json")
  if not os.path.isfile(done):
    raise SystemExit(f"catchjax.export: {odir} holds no built organism (no done.json); build "
                     f"it first with python -m catchjax.main.")
  with open(done) as f:
    info = json.load(f)
  spec = info.get("spec") or {}
  want = (spec.get("model") or {}).get("weights")
  have = hf.weights_fingerprint(config.model.hf_dir)
  if want and want != have:
    raise SystemExit(f"catchjax.export: organism {info.get('key')} was built on base weights "
                     f"{want}, but config.model.hf_dir={config.model.hf_dir!r} is {have}.")
  lora = int((spec.get("train") or {}).get("lora_rank", 0))
  model = train_lib.restore_params(os.path.join(odir, "train"),
                                   org_stage.load_base(config, lora))
  return org_stage.Organism(model, info.get("key", os.path.basename(odir)), odir,
                            spec.get("behaviour", info.get("behaviour")), info)


def _organism_dirs(config, workdir: str, key: str | None, run: str | None) -> list[str]:
  from catchjax.data.behaviors import behavior_name, behavior_spec
  from catchjax.stages import organism as org_stage
  roots = [workdir] + ([config.cache_dir] if config.get("cache_dir") else [])
  if key:
    keys = [key]
  else:
    bs = [behavior_spec(b) for b in config.behaviours]
    if run and len(bs) > 1:   # the run folder names its behaviour: <hash>-<fam>-<bname>-...
      bs = [b for b in bs if f"-{behavior_name(b)}-" in os.path.basename(run)] or bs
      if len(bs) > 1:
        raise SystemExit("catchjax.export: several behaviours; name the run's organism with "
                         "--organism=KEY.")
    keys = [org_stage.organism_key(config, b) for b in bs]
  out = []
  for k in keys:
    d = next((os.path.join(r, "organisms", k) for r in roots
              if os.path.isdir(os.path.join(r, "organisms", k))), None)
    if d is None:
      raise SystemExit(f"catchjax.export: no organism {k} under {' or '.join(roots)}/organisms.")
    out.append(d)
  return out


def main(argv):
  from absl import flags
  F = flags.FLAGS
  config = F.config
  dirs = _organism_dirs(config, F.workdir, F.organism, F.run)
  if F.out and len(dirs) > 1:
    raise SystemExit("catchjax.export: --out with several organisms; pick one with --organism.")
  for odir in dirs:
    org = restore_organism(config, odir)
    if F.run:
      export_run(config, org, F.run, out=F.out, dtype=F.dtype)
    else:
      export_organism(config, org, out=F.out, dtype=F.dtype)


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "Experiment config file (its organisms).")
  flags.DEFINE_string("workdir", None, "Workdir whose organisms/ holds the organism.")
  flags.DEFINE_string("organism", None, "Organism key (default: the config's organisms).")
  flags.DEFINE_string("run", None, "A train-against run folder to export instead.")
  flags.DEFINE_string("out", None, "Output folder (default organisms/<key>/hf, <run>/hf).")
  flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Default: config param_dtype.")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
