"""Experiment configs: one get_config(arg) per experiment (big_vision style)."""
