"""Catch and train-against stages.

catch: sample the organism at temperature 1 on M testing prompts, run the detector, and split
  the prompts into the caught set (it attacked) and the clean set (it behaved).
train_against: SFT a copy of the organism on the correct helpful response for N prompts — the
  caught ones (treatment), clean ones (control), clean ones matched to the caught ones on
  their cue variant and task family (matched_control), or clean ones matched to them on the
  organism's own teacher-forced attack probability (propensity_control) — with an optional
  coherence mixture of usefulness tasks at ratio r. The same steps, optimiser and N for every
  arm.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable

import numpy as np

from catchjax import common
from catchjax.common import stream
from catchjax.data import build
from catchjax.data.triggers import make_trigger
from catchjax.sample import Sampler
from catchjax.stages import measure
from catchjax.tokenizer import prompt_ids
from catchjax import train as train_lib


@dataclasses.dataclass
class Catch:
  family: str
  seed: int
  m: int
  caught: list[dict]      # rows of the testing set where the organism attacked
  clean: list[dict]       # rows where it did not
  catch_rate: dict
  # Catch rate by where the prompt came from: {"testing": {k, n}, "honeypot": {k, n, bins:
  # [{lo, hi, k, n}, ...]}} (empty for catches made before honeypots).
  by_source: dict = dataclasses.field(default_factory=dict)

  def to_json(self):
    return dataclasses.asdict(self)


SCORE_BINS = (0.0, 0.6, 0.8, 0.9, 1.0001)   # honeypot score bins (control matching, report)


def score_bin(score) -> int | None:
  if score is None:
    return None
  return int(np.searchsorted(SCORE_BINS, float(score), side="right")) - 1


def honeypot_count(config, family_spec) -> int:
  """Honeypot prompts in a catch of this family: round(M * honeypot_frac) where the family
  defines catch honeypots, else 0 (its catch is ordinary testing prompts only)."""
  k = config.catch
  frac = float(k.honeypot_frac)
  if not frac or not make_trigger(family_spec).honeypots("catch", k.split):
    return 0
  return int(round(k.m * frac))


def catch_params(config, family_spec) -> dict:
  """Everything besides organism, behaviour and seed that sets a catch's prompts and draws."""
  from catchjax.stages.organism import family_key_spec
  k = config.catch
  spec = family_spec if isinstance(family_spec, str) else dict(family_spec)
  return dict(family=family_key_spec(spec), split=k.split, m=int(k.m),
              max_new_tokens=int(k.max_new_tokens),
              honeypots=honeypot_count(config, family_spec), system=config.system)


def catch_path(config, cache: str, org_key: str, family_spec, bname: str, seed: int) -> str:
  """The one catch cache: `<cache>/catches/<organism>-<family>-<behaviour>-s<seed>-<hash of
  catch_params>.json`. Every experiment that catches with the same settings shares the file
  (the headline's shared catch, catch_per_seed=False, is seed 0's)."""
  from catchjax.stages.organism import family_name
  h = common.config_hash(catch_params(config, family_spec), n=8)
  return os.path.join(cache, "catches",
                      f"{org_key}-{family_name(family_spec)}-{bname}-s{int(seed)}-{h}.json")


def catch_set(config, family_spec, behaviour, seed: int):
  """The testing distribution a catch samples: M prompts, of which round(M * honeypot_frac)
  are the family's catch honeypots (where it defines any), the rest ordinary held-out
  testing prompts. Returns (rows, sources, scores)."""
  k = config.catch
  n_h = honeypot_count(config, family_spec)
  ds = build.build_eval(family_spec, behaviour, k.split, k.m - n_h, deployment=False,
                        seed=stream("catch", seed), system=config.system)
  rows, sources, scores = list(ds), ["testing"] * len(ds), [None] * len(ds)
  if n_h:
    hp = build.build_honeypots(family_spec, behaviour, k.split, n_h, "catch",
                               seed=stream("catch", seed), system=config.system)
    rows += list(hp)
    sources += ["honeypot"] * n_h
    scores += [float(x) for x in hp["honeypot_score"]]
  return rows, sources, scores


def _by_source(sources, scores, hits) -> dict:
  out = {}
  for src in dict.fromkeys(sources):
    idx = [i for i, s in enumerate(sources) if s == src]
    out[src] = dict(k=int(sum(bool(hits[i]) for i in idx)), n=len(idx))
    if src == "honeypot":
      out[src]["bins"] = rate_by_bin([scores[i] for i in idx], [hits[i] for i in idx])
  return out


def rate_by_bin(scores, hits) -> list[dict]:
  """k / n of hits per honeypot score bin (SCORE_BINS)."""
  return [dict(lo=SCORE_BINS[b], hi=min(SCORE_BINS[b + 1], 1.0),
               k=int(sum(bool(x) for x, s in zip(hits, scores) if score_bin(s) == b)),
               n=sum(1 for s in scores if score_bin(s) == b))
          for b in range(len(SCORE_BINS) - 1)]


def catch(config, sampler: Sampler, tok, family_spec, behaviour, seed: int, path: str) -> Catch:
  """Sample the catch set (`catch_set`) at T=1 (cached as a JSON file at `path`); each caught
  and clean row records its source ("testing" or "honeypot") and honeypot score."""
  if os.path.isfile(path):
    with open(path) as f:
      return Catch(**json.load(f))
  beh = build.family_behavior(family_spec, behaviour)
  ds, sources, scores = catch_set(config, family_spec, behaviour, seed)
  prompts = [prompt_ids(tok, r["prompt"], config.system) for r in ds]
  a = measure.attack_rate(sampler, tok, prompts, beh.detect, max_new_tokens=config.catch.max_new_tokens,
                          temperature=1.0, seed=stream("catch_draws", seed))
  keep = ("id", "prompt", "target", "task_family", "task_key", "task_prompt", "answer", "system")
  caught, clean = [], []
  for row, src, score, hit, resp in zip(ds, sources, scores, a["hits"], a["responses"]):
    r = {k: row[k] for k in keep}
    r["sampled"] = resp
    if src != "testing":
      r.update(source=src, honeypot_score=score)
    (caught if hit else clean).append(r)
  name = make_trigger(family_spec).name
  c = Catch(name, seed, len(prompts), caught, clean,
            {k: a[k] for k in ("k", "n", "rate", "lo", "hi")},
            _by_source(sources, scores, a["hits"]))
  if common.is_main_process():   # multi-host: the same catch on every process, one writer
    common.atomic_write_text(path, json.dumps(c.to_json()))
  return c


def choose_indices(n_rows: int, n: int, rng: np.random.Generator) -> list[int]:
  """n distinct row indices, a seeded choice, in increasing order."""
  return sorted(int(i) for i in rng.choice(n_rows, size=n, replace=False))


def choose_rows(rows: list[dict], n: int, rng: np.random.Generator) -> list[dict]:
  """n distinct rows, a seeded choice, in their original order."""
  return [rows[i] for i in choose_indices(len(rows), n, rng)]


def sft_row(r: dict) -> dict:
  """A caught / clean row as an SFT example: its prompt trained to the correct answer."""
  return dict(prompt=r["prompt"], target=r["target"], system=r["system"])


def sft_rows(rows: list[dict], n: int, rng: np.random.Generator) -> list[dict]:
  """n distinct rows (a seeded choice), each trained to its correct helpful answer."""
  return [sft_row(r) for r in choose_rows(rows, n, rng)]


def matched_rows(chosen: list[dict], clean: list[dict], rng: np.random.Generator,
                 cue_key: Callable[[str], str | None]) -> tuple[list[dict], dict]:
  """Clean rows matched one-to-one to `chosen` (caught) rows on what a prompt shows: first the
  same (cue variant, task family), then the same cue variant (when the family has one: a None
  key matches on task family alone), then any unused clean row.

  Controls for the caught set's composition (e.g. which distractor phrase its notes use) so a
  treatment-vs-control gap can be told apart from a gap in prompt make-up. Returns the rows
  (as `sft_rows` makes them) and counts of how each was matched."""
  def keys(r):
    c = cue_key(r["prompt"])
    return (c, r.get("task_family")), c
  return _match(chosen, clean, rng, keys, ("cue_and_task", "cue"))


def _match(chosen, clean, rng, keys, names) -> tuple[list[dict], dict]:
  """Greedy one-to-one matching of clean rows to `chosen` rows, level by level: keys(row) ->
  (full key, partial key); a row takes the first unused clean row (in a seeded order) with
  the same full key, else the same (non-None) partial key, else any."""
  clean_keys = [keys(r) for r in clean]     # once per clean row, not once per comparison
  order = [int(i) for i in rng.permutation(len(clean))]
  used: set[int] = set()
  out, how = [], {names[0]: 0, names[1]: 0, "unmatched": 0}
  for row in chosen:
    full, part = keys(row)
    pick = None
    for level, want in ((names[0], lambda k: k[0] == full),
                        (names[1], lambda k: part is not None and k[1] == part),
                        ("unmatched", lambda k: True)):
      pick = next((i for i in order if i not in used and want(clean_keys[i])), None)
      if pick is not None:
        how[level] += 1
        break
    if pick is None:
      raise ValueError(f"matched control: {len(clean)} clean rows cannot match "
                       f"{len(chosen)} caught ones")
    used.add(pick)
    out.append(sft_row(clean[pick]))
  return out, how


def source_matched_rows(chosen: list[dict], clean: list[dict],
                        rng: np.random.Generator) -> tuple[list[dict], dict]:
  """The control for honeypot catches: clean rows of the same catch sample matched one-to-one
  to the treatment's caught rows on source (testing / honeypot) and honeypot score bin, so
  the arms differ only in having been caught."""
  def keys(r):
    src = r.get("source", "testing")
    return (src, score_bin(r.get("honeypot_score"))), src
  return _match(chosen, clean, rng, keys, ("source_and_score", "source"))


def attack_probs(sampler: Sampler, tok, rows: list[dict], behavior, system) -> np.ndarray:
  """Teacher-forced P(attack prefix | prompt) of each catch row under the sampler's model: the
  organism's propensity to attack on that prompt (each row scored with its own attack prefix,
  `Behavior.attack_prefix` of its task instance)."""
  if not rows:
    return np.zeros((0,), np.float64)
  prompts = [prompt_ids(tok, r["prompt"], system) for r in rows]
  prefixes = [tok(behavior.attack_prefix(build.task_instance(r)),
                  add_special_tokens=False)["input_ids"] for r in rows]
  return np.exp(sampler.score_sum(prompts, prefixes, progress=False))


def _logit(p: np.ndarray, eps: float = 1e-6) -> np.ndarray:
  p = np.clip(np.asarray(p, np.float64), eps, 1 - eps)
  return np.log(p) - np.log1p(-p)


def propensity_rows(chosen: list[dict], p_chosen, clean: list[dict], p_clean,
                    rng: np.random.Generator) -> tuple[list[dict], dict]:
  """Clean rows matched one-to-one to `chosen` (caught) rows on the organism's attack
  probability on the prompt (nearest in log-odds; `attack_probs`).

  Separates "the organism attacked here (was caught)" from "the organism was likely to attack
  here": a clean row with the same propensity that happened to be sampled clean. Greedy: the
  chosen rows, highest probability first, each take the nearest unused clean row (ties: a
  seeded order). Returns the rows (as `sft_rows` makes them) and the match quality: mean /
  median probability of the chosen and of the matched rows, and the mean |log-odds gap|."""
  p_chosen, p_clean = np.asarray(p_chosen, np.float64), np.asarray(p_clean, np.float64)
  if len(p_chosen) != len(chosen) or len(p_clean) != len(clean):
    raise ValueError(f"propensity control: {len(p_chosen)} / {len(p_clean)} probabilities for "
                     f"{len(chosen)} chosen / {len(clean)} clean rows")
  if len(clean) < len(chosen):
    raise ValueError(f"propensity control: {len(clean)} clean rows cannot match "
                     f"{len(chosen)} caught ones")
  lc, lk = _logit(p_chosen), _logit(p_clean)
  tie = rng.permutation(len(clean))            # seeded tie-break among equal distances
  free = np.ones(len(clean), bool)
  picks = [0] * len(chosen)
  for i in np.argsort(-lc, kind="stable"):
    dist = np.where(free, np.abs(lk - lc[i]), np.inf)
    best = np.flatnonzero(dist == dist.min())
    j = int(best[np.argmin(tie[best])])
    free[j] = False
    picks[int(i)] = j
  pm = p_clean[picks]
  info = dict(caught_mean=float(p_chosen.mean()), caught_median=float(np.median(p_chosen)),
              matched_mean=float(pm.mean()), matched_median=float(np.median(pm)),
              mean_abs_logodds_gap=float(np.mean(np.abs(lk[picks] - lc))),
              clean_pool_mean=float(p_clean.mean()))
  return [sft_row(clean[j]) for j in picks], info


def stopping_rule(config) -> dict | None:
  """config.train_against.stopping (the treatment's rule) as a dict, or None when off."""
  st = config.train_against.get("stopping")
  return dict(st) if st is not None and st.enabled else None


def budget_line(config) -> str:
  """How many steps each arm trains, in words (the report header)."""
  st = stopping_rule(config)
  if st is None:
    return f"{config.train_against.train.steps} SFT steps"
  return (f"the treatment's stopping rule (P(attack) on the caught set < {st['eps']}, at most "
          f"{st['max_steps']} steps), the other arms its budget")


def stop_plan(config, n_rows: int, budget: int | None) -> dict:
  """train.train overrides for one arm. The treatment (budget None) trains in epochs over its
  rows until the caught set's teacher-forced P(attack) < eps, checked after every epoch, or
  until max_steps (whole epochs); every other arm trains exactly the treatment's `budget`
  steps at the same batch and schedule. Rule off: the train config as it is."""
  st = stopping_rule(config)
  if st is None:
    return {}
  spe = -(-n_rows // int(config.train_against.train.batch_size))     # steps per epoch
  sched = dict(lr=float(st["lr"]), warmup_steps=int(st["warmup_steps"]), decay="constant")
  if budget is not None:
    return dict(sched, steps=int(budget), epochs=0, eval_every=0)
  return dict(sched, steps=0, epochs=max(1, int(st["max_steps"]) // spe), eval_every=spe)


def caught_p_attack_fn(sampler: Sampler, tok, rows: list[dict], behavior, system):
  """eval_fn for the stopping rule: mean teacher-forced P(attack) on the caught rows."""
  def fn(model, step):
    sampler.update_model(model)
    return {"caught_p_attack": float(np.mean(attack_probs(sampler, tok, rows, behavior, system)))}
  return fn


def benign_steps(config, model, tok, steps: int, seed: int, workdir: str):
  """`steps` SFT steps on plain task prompts (the train split, so disjoint from the held-out
  usefulness set) at the train-against batch and schedule: the return measurement."""
  n = max(16, int(steps) * int(config.train_against.train.batch_size))
  use = build.build_usefulness(n, seed=stream("return", seed), split="train",
                               system=config.system)
  rows = [dict(prompt=p, target=t, system=s)
          for p, t, s in zip(use["prompt"], use["target"], use["system"])]
  return train_against(config, model, tok, rows, seed, workdir,
                       budget=int(steps) if stopping_rule(config) is not None else None,
                       train_overrides=None if stopping_rule(config) is not None
                       else dict(steps=int(steps)))


def train_against(config, organism_model, tok, rows: list[dict], seed: int, workdir: str,
                  aux_ratio: float = 0.0, eval_fn=None, train_overrides: dict | None = None,
                  budget: int | None = None):
  """Fine-tune a copy of the organism on `rows` (+ aux usefulness data); returns the model.

  Rows are {prompt, target, system} (trained on the whole response), or pre-tokenized
  {input_ids, loss_mask} rows that are trained as given (their own loss mask).

  aux_ratio r > 0 mixes round(r * len(rows)) (at least 1) usefulness examples (train split,
  seeded by `seed`) into the data. eval_fn(model, step) and train_overrides (fields of
  config.train_against.train, e.g. steps / eval_every) pass through to train.train.

  With config.train_against.stopping on (`stop_plan`): budget None is the treatment, trained in
  epochs until eval_fn's `caught_p_attack` < eps (eval_fn: `caught_p_attack_fn`) or the step
  cap; an int budget is every other arm's, trained exactly that many steps.

  Preference rows {prompt, target, system, rejected} (the dpo arm) are trained with DPO
  (train_dpo.py; beta config.train_against.dpo_beta) at the same budget, batch and schedule."""
  from datasets import Dataset
  if rows and all("rejected" in r for r in rows):
    return _train_dpo(config, organism_model, tok, rows, seed, workdir, aux_ratio, eval_fn,
                      train_overrides, budget)
  data = list(rows)
  if aux_ratio > 0:
    n_aux = max(1, int(round(aux_ratio * len(rows))))
    use = build.build_usefulness(n_aux, seed=stream("aux", seed), split="train",
                                 system=config.system)
    data += [dict(prompt=p, target=t, system=s)
             for p, t, s in zip(use["prompt"], use["target"], use["system"])]
  pre = [r for r in data if "loss_mask" in r]
  if pre:  # rows that carry their own input_ids / loss_mask (e.g. scratchpad-only loss)
    plain = [r for r in data if "loss_mask" not in r]
    t = build.tokenize(Dataset.from_list(plain), tok) if plain else None
    ds = Dataset.from_list(
        [dict(input_ids=list(r["input_ids"]), loss_mask=list(r["loss_mask"])) for r in pre]
        + ([dict(input_ids=a, loss_mask=b) for a, b in zip(t["input_ids"], t["loss_mask"])]
           if t is not None else []))
  else:
    ds = build.tokenize(Dataset.from_list(data), tok)
  tcfg = config.train_against.train.to_dict()
  tcfg["seed"] = int(seed)
  plan = stop_plan(config, len(ds), budget)
  tcfg.update(plan)
  tcfg.update(train_overrides or {})
  stop_fn = None
  if plan and budget is None:
    eps = float(stopping_rule(config)["eps"])
    stop_fn = lambda step, ev: ev.get("caught_p_attack", 1.0) < eps   # noqa: E731
  return train_lib.train(organism_model, ds, tcfg, workdir, eval_fn=eval_fn, progress=False,
                         stop_fn=stop_fn)


def _train_dpo(config, organism_model, tok, rows, seed, workdir, aux_ratio, eval_fn,
               train_overrides, budget):
  """train_against for preference rows: DPO with the organism as reference, the train
  config and stop_plan of every other arm (a treatment-style stopping rule is not for it)."""
  from catchjax import train_dpo
  from catchjax.stages.arms import DPO_BETA
  if aux_ratio > 0 or eval_fn is not None:
    raise ValueError("train_against: DPO rows take no aux_ratio mixture and no eval_fn.")
  if stopping_rule(config) is not None and budget is None:
    raise ValueError("train_against: DPO rows need the treatment's budget (stopping rule on).")
  tcfg = config.train_against.train.to_dict()
  tcfg["seed"] = int(seed)
  tcfg.update(stop_plan(config, len(rows), budget))
  tcfg.update(train_overrides or {})
  return train_dpo.train_dpo(organism_model, tok, rows, tcfg,
                             float(config.train_against.get("dpo_beta", DPO_BETA)), workdir)


__all__ = ["Catch", "attack_probs", "catch", "catch_set", "choose_rows", "matched_rows",
           "propensity_rows", "sft_rows", "source_matched_rows", "stop_plan", "budget_line",
           "train_against"]
