"""Data: task families (usefulness), trigger families (deployment vs testing cues), attack
behaviours with detectors, and the dataset builders that combine them.

  tasks      short program-checkable tasks, disjoint train/eval instances, usefulness.
  triggers   trigger-family registry (token, year, tier, headline, collusion, jsonl, and
             completions: a user's own prompt/completion organism data).
  behaviors  attack-behaviour registry (hate, exfiltrate, regex, python, from_data) with
             detectors.
  build      Example rows -> HF Datasets (organism SFT, eval, usefulness), tokenization, I/O.
"""
