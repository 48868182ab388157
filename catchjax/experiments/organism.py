"""Organism experiment: build (or restore) every organism and write its report card."""
from __future__ import annotations

import json
import os

from catchjax import common
from catchjax.data.behaviors import behavior_name, behavior_spec
from catchjax.stages import organism as org_stage


def validate(config):
  """Reject bad input before any compute, naming the field."""
  from catchjax import validate as V
  V.check_common(config)


def run(config, workdir: str):
  validate(config)
  if config.get("dry_run", False):   # the compile plan only: no organism, no data, no weights
    from catchjax import plan
    return plan.dry_run(config, "organism")
  cards = {}
  with common.workdir_lock(workdir):
    base = org_stage.load_base(config)
    for beh in config.behaviours:
      org = org_stage.get_organism(config, workdir, behavior_spec(beh))
      card = org_stage.report_card(config, org, base)
      cards[behavior_name(beh)] = card
      print(org_stage.card_markdown(card))
    if common.is_main_process():
      common.atomic_write_text(os.path.join(workdir, "organism_cards.json"),
                               json.dumps(cards, indent=2))
  return cards
