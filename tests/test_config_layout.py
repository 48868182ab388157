"""The per-stage config sections (issue 23 item 2): a config written in the old layout (stage
fields under config.headline) reads as today's; moved override names point at the new place.
Fast: no model."""
import copy
import json

from catchjax import config_layout, report
from configs import headline as headline_cfg


def _old_layout(c: dict) -> dict:
  """Today's resolved config put back into the pre-section layout (as config.json files
  written before the change hold it)."""
  old = copy.deepcopy(c)
  for path, news in config_layout.MOVED.items():
    section, field = news[0].split(".")
    value = old[section].pop(field)
    for extra in news[1:]:
      s2, f2 = extra.split(".")
      assert old[s2].pop(f2) == value
    old["headline"][path.split(".", 1)[1]] = value
  for s in ("catch", "train_against", "measure", "distinguish"):
    if not old[s]:
      del old[s]
  return old


def test_old_layout_upgrades_to_todays():
  c = json.loads(json.dumps(headline_cfg.get_config().to_dict(), default=str))
  c["train_against"].pop("curve_every")        # a field added after the move (off)
  old = _old_layout(c)
  assert "m" in old["headline"] and "catch" not in old
  assert config_layout.upgrade(old) == c
  assert config_layout.upgrade(c) == c          # today's layout: unchanged
  assert report.config_differences(old, c) == []
  c2 = copy.deepcopy(c)
  c2["catch"]["m"] = 200
  assert report.config_differences(old, c2) == ["catch.m"]
  c2["train_against"]["curve_every"] = 4        # a later field, on in one: a difference
  assert "train_against.curve_every" in report.config_differences(old, c2)


def test_moved_override_names_the_new_field():
  msg = config_layout.moved_message("headline.stopping.lr")
  assert msg.startswith("config.headline.stopping has moved") and \
      "--config.train_against.stopping.lr=" in msg
  both = config_layout.moved_message("headline.max_new_tokens")
  assert "config.catch.max_new_tokens and config.measure.max_new_tokens" in both
  assert config_layout.moved_message("headline.seeds") is None
  assert config_layout.moved_message("organism.n_per_family") is None
