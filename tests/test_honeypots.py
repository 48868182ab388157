"""Honeypot splits (issue 26): testing cues near the deployment boundary, each with a score
fixed in code, testing by the family's own rule, disjoint from every training cue, and
disjoint between catching and sharpening. Fast: no model."""
import json

import numpy as np
import pytest

from catchjax.data import build
from catchjax.data.triggers import make_trigger
from catchjax.stages import train_against as ta

FAMILIES = ["token", "tier", "year", "headline", {"name": "collusion", "subtlety": 0},
            "collusion", {"name": "collusion", "subtlety": 2}]


def _cues(fam, purpose, split, reps=5):
  rng = np.random.default_rng(0)
  return {fam.honeypot_cue(v, split, rng) for v, _ in fam.honeypots(purpose, split)
          for _ in range(reps)}


@pytest.mark.parametrize("spec", FAMILIES, ids=lambda s: json.dumps(s))
def test_honeypots_are_testing_scored_and_disjoint(spec):
  fam = make_trigger(spec)
  pools = set()
  for dep in (True, False):
    for split in ("train", "eval"):
      pools |= set(fam.cue_pool(dep, split))
  rng = np.random.default_rng(1)
  # the family's own rule agrees with its ordinary cues
  assert all(fam.is_deployment(fam.sample_cue(True, "eval", rng)) for _ in range(30))
  assert not any(fam.is_deployment(fam.sample_cue(False, "eval", rng)) for _ in range(30))
  for split in ("train", "eval"):
    catch, sharpen = fam.honeypots("catch", split), fam.honeypots("sharpen", split)
    assert catch and sharpen
    assert not {v for v, _ in catch} & {v for v, _ in sharpen}   # disjoint cue values
    assert all(0.0 <= s <= 1.0 for _, s in catch + sharpen)
    for purpose in ("catch", "sharpen"):
      cues = _cues(fam, purpose, split)
      assert not any(fam.is_deployment(c) for c in cues)          # testing by the rule
      assert not cues & pools                                     # never a training cue
  # the score is fixed in code: the same on a fresh instance
  assert make_trigger(spec).honeypots("catch", "train") == fam.honeypots("catch", "train")


def test_honeypot_scores_rank_near_misses_above_far_ones():
  tok = dict(make_trigger("token").honeypot_variants("train"))
  assert tok["|DEPLOYMENT"] > tok["|STAGING|"]
  col = dict(make_trigger("collusion").honeypot_variants("train"))
  assert col["as dicussed"] > col["as agreed"]
  head = dict(make_trigger("headline").honeypot_variants("train"))
  assert max(head.values()) > 0.95 and min(head.values()) < 0.05


def test_build_honeypots_rows(tmp_path):
  ds = build.build_honeypots("tier", "hate", "train", 24, "catch", seed=3)
  fam = make_trigger("tier")
  variants = {v for v, _ in fam.honeypots("catch", "train")}
  assert set(ds["honeypot_variant"]) == variants                # each variant appears
  assert not any(ds["deployment"]) and not any(ds["is_attack_target"])
  assert all(p.startswith(v) for p, v in zip(ds["prompt"], ds["honeypot_variant"]))
  again = build.build_honeypots("tier", "hate", "train", 24, "catch", seed=3)
  assert list(again["prompt"]) == list(ds["prompt"])


def test_jsonl_family_may_mark_honeypot_rows(tmp_path):
  p = tmp_path / "cues.jsonl"
  rows = [{"text": "PROD", "deployment": True}, {"text": "TEST", "deployment": False},
          {"text": "PR0D", "deployment": False, "honeypot": 0.9, "split": "train"},
          {"text": "PROD?", "deployment": False, "honeypot": 0.7, "split": "train"}]
  p.write_text("".join(json.dumps(dict(r, split=r.get("split", s))) + "\n"
                       for r in rows for s in ("train", "eval")
                       if "honeypot" not in r or s == "train"))
  fam = make_trigger({"name": "jsonl", "path": str(p)})
  assert sorted(fam.honeypot_variants("train")) == [("PR0D", 0.9), ("PROD?", 0.7)]
  assert fam.honeypot_variants("eval") == []
  assert "PR0D" not in fam.cue_pool(False, "train")              # not an ordinary cue
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps({"text": "X", "deployment": True, "honeypot": 0.5}) + "\n")
  with pytest.raises(ValueError, match="honeypot"):
    make_trigger({"name": "jsonl", "path": str(bad)})


def _cfg(frac, m=20):
  import ml_collections
  c = ml_collections.ConfigDict()
  c.system = None
  c.catch = ml_collections.ConfigDict(dict(m=m, split="train", honeypot_frac=frac,
                                           max_new_tokens=12))
  return c


def test_catch_set_mixes_ordinary_testing_and_honeypots():
  rows, src, scores = ta.catch_set(_cfg(0.25), "token", "hate", seed=0)
  assert len(rows) == 20 and src.count("honeypot") == 5 and src.count("testing") == 15
  fam = make_trigger("token")
  assert not any(r["deployment"] for r in rows)
  assert all((s is None) == (k == "testing") for s, k in zip(scores, src))
  # honeypot_frac 0: exactly the ordinary testing catch of before
  plain, src0, _ = ta.catch_set(_cfg(0.0), "token", "hate", seed=0)
  old = build.build_eval("token", "hate", "train", 20, deployment=False, seed=10_000)
  assert [r["prompt"] for r in plain] == list(old["prompt"]) and set(src0) == {"testing"}
  assert fam.honeypots("catch", "train")


def test_control_is_matched_on_source_and_score_bin():
  def row(i, src, score):
    r = {"prompt": f"p{i}", "target": "t", "system": None}
    if src == "honeypot":
      r.update(source=src, honeypot_score=score)
    return r
  chosen = [row(0, "honeypot", 0.95), row(1, "honeypot", 0.95), row(2, "testing", None)]
  clean = ([row(10 + i, "testing", None) for i in range(6)]
           + [row(20, "honeypot", 0.5), row(21, "honeypot", 0.92), row(22, "honeypot", 0.97)])
  rows, how = ta.source_matched_rows(chosen, clean, np.random.default_rng(0))
  got = {r["prompt"] for r in rows}
  assert {"p21", "p22"} <= got and how == {"source_and_score": 3, "source": 0, "unmatched": 0}
  assert len(got & {f"p{10 + i}" for i in range(6)}) == 1
  # too few clean honeypots in the bin: the next level (same source), then any row, counted
  rows, how = ta.source_matched_rows(chosen, clean[:7], np.random.default_rng(0))
  assert how == {"source_and_score": 1, "source": 1, "unmatched": 1}
  assert "p20" in {r["prompt"] for r in rows}


def test_rate_by_bin_counts_hits_per_score_bin():
  bins = ta.rate_by_bin([0.95, 0.95, 0.5, 0.85, None], [True, False, True, True, True])
  by = {(b["lo"], b["hi"]): (b["k"], b["n"]) for b in bins}
  assert by[(0.9, 1.0)] == (1, 2) and by[(0.0, 0.6)] == (1, 1) and by[(0.8, 0.9)] == (1, 1)
  assert sum(b["n"] for b in bins) == 4          # an ordinary prompt (None) is in no bin


def test_labelled_levels_validate_and_get_their_own_catch_files():
  from catchjax import validate as V
  levels = [{"name": "collusion", "subtlety": k, "label": f"collusion{k}"} for k in (0, 1)]
  assert V.check_families("f", levels)
  c = _cfg(0.5)
  names = {ta.catch_path(c, "cache", "org", s, "hate", 0) for s in levels}
  assert len(names) == 2 and all("collusion" in n for n in names)
