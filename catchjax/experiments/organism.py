"""Organism experiment: build (or restore) every organism and write its report card."""
from __future__ import annotations

import json
import os

from catchjax import common
from catchjax.stages import organism as org_stage


def run(config, workdir: str):
  cards = {}
  with common.workdir_lock(workdir):
    base = org_stage.load_base(config)
    for beh in config.behaviours:
      org = org_stage.get_organism(config, workdir, beh)
      card = org_stage.report_card(config, org, base)
      cards[beh] = card
      print(org_stage.card_markdown(card))
    common.atomic_write_text(os.path.join(workdir, "organism_cards.json"),
                             json.dumps(cards, indent=2))
  return cards
