"""Entry point: `python -m catchjax.main --config=configs/headline.py[:variant] [--workdir=DIR]
[--config.seed=1 ...]`. Looks up `config.experiment` and runs it (kept tiny, as in nanodo).

A bad config is refused before any compute as one line on stderr, exit status 2: an unknown
config variant (`configs/common.py` check_variant), an unknown override field (with the nearest
valid fields), an override of the wrong type (flag parsing), or a value the experiment's
validation rejects (`catchjax.validate.ConfigError`)."""
import difflib
import os
import re
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (default workdirs/<experiment>).")
flags.mark_flags_as_required(["config"])

EXIT_CONFIG_ERROR = 2
_OVERRIDE = re.compile(r"^--?(?:no)?config\.([^=]+)(?:=(.*))?$", re.S)


def _config_error(message: str):
  """Print `catchjax: config error: <message>` (one line) and exit with status 2."""
  message = "; ".join(line.strip() for line in str(message).splitlines() if line.strip())
  sys.stderr.write(f"catchjax: config error: {message}\n")
  sys.exit(EXIT_CONFIG_ERROR)


def _config_path(argv):
  """The value of --config in argv (None if absent)."""
  path = None
  for i, a in enumerate(argv):
    if a in ("--config", "-config") and i + 1 < len(argv):
      path = argv[i + 1]
    elif a.startswith(("--config=", "-config=")):
      path = a.split("=", 1)[1]
  return path


def _missing_config_file(path):
  """The message for a --config file that does not exist, else None."""
  if path is not None and not os.path.isfile(path.split(":", 1)[0]):
    return f"--config={path}: no such file."
  return None


def _base_config(argv):
  """The config file's config without the overrides (None if it cannot be loaded)."""
  path = _config_path(argv)
  if path is None:
    return None
  try:
    config = flags.FLAGS["config"].parser.parse(path)   # loads the file, applies nothing
    config.keys()   # an unreadable file loads as a placeholder that raises when used
    return config
  except Exception:  # noqa: BLE001 - only a diagnosis: the original error is raised instead
    return None


def _is_section(x) -> bool:
  return hasattr(x, "keys") and hasattr(x, "__getitem__")


def _all_paths(node, prefix="config"):
  for k in node.keys():
    yield f"{prefix}.{k}", k
    if _is_section(node[k]):
      yield from _all_paths(node[k], f"{prefix}.{k}")


def _moved_field(path: str):
  """The message for an override of a field that moved to a stage section (issue 23), e.g.
  --config.headline.m -> config.catch.m; None for any other path."""
  from catchjax.config_layout import moved_message
  return moved_message(path)


def _unknown_field(config, path: str):
  """The message for the first part of override `path` (e.g. 'organism.n_per_famliy') that is
  not a field of `config`, naming the nearest valid fields; None if every part exists."""
  moved = _moved_field(path)
  if moved:
    return moved
  node, where = config, "config"
  for part in path.split("."):
    if not _is_section(node):
      return f"{where} is a value, not a section: there is no {where}.{part}."
    keys = list(node.keys())
    if part in keys:
      node, where = node[part], f"{where}.{part}"
      continue
    near = [f"{where}.{k}" for k in difflib.get_close_matches(part, keys, n=3)]
    # The same (or a close) name elsewhere, e.g. config.families -> config.organism.families.
    names = {name for _, name in _all_paths(config)}
    close = set(difflib.get_close_matches(part, names, n=3, cutoff=0.8))
    near += [p for p, name in _all_paths(config) if name in close and p not in near]
    if near:
      hint = "did you mean " + " or ".join(near[:4]) + "?"
    else:
      hint = f"the fields of {where} are: {', '.join(sorted(keys))}."
    field = f"{where}.{part}"
    given = "" if f"config.{path}" == field else f" (in --config.{path})"
    return f"unknown field {field}{given}; {hint}"
  return None


def _describe_field(config, path: str):
  """' (config.X is an int, default 3)' for a known field, else ''."""
  node = config
  try:
    for part in path.split("."):
      node = node[part]
  except Exception:  # noqa: BLE001
    return ""
  if _is_section(node):
    return f" (config.{path} is a section)"
  kind = type(node).__name__
  return f" (config.{path} is {'an' if kind[0] in 'aeiou' else 'a'} {kind}, default {node!r})"


def _config_file_refusal(exc):
  """The message of a `catchjax.validate.ConfigError` that the config file's get_config raised
  (e.g. an unknown variant, configs/common.py check_variant), else None. ml_collections
  re-raises it with its traceback in the message and absl wraps that again, so the original is
  the innermost ConfigError in the exception's context chain."""
  from catchjax.validate import ConfigError   # no JAX: flag parsing stays fast
  found, seen = None, set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    if isinstance(exc, ConfigError):
      found = exc
    exc = exc.__cause__ or exc.__context__
  return str(found) if found is not None else None


def parse_flags(argv):
  """absl's flag parsing (app.run's `flags_parser`), with a bad `--config.*` override reported
  as one line (exit 2) instead of a traceback or absl's 'FATAL Flags parsing error'."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:   # a value of the wrong type, an unknown flag, a missing --config
    refused = _config_file_refusal(e)
    if refused:
      _config_error(refused)
    message = str(e)
    m = re.match(r"flag --(?:no)?config\.([^=]+)=", message)
    if m:
      config = _base_config(argv)
      message += _describe_field(config, m.group(1)) if config is not None else ""
    if "Traceback" in message:   # the config file itself failed: keep its traceback readable
      sys.stderr.write(f"catchjax: config error: {message}\n")
      sys.exit(EXIT_CONFIG_ERROR)
    _config_error(message)
  except (AttributeError, KeyError, TypeError, ValueError, OSError):
    # ml_collections raises these while applying overrides; name an unknown field if that is
    # what it was, else keep the traceback (e.g. a bug in the config file itself).
    missing = _missing_config_file(_config_path(argv))
    if missing:
      _config_error(missing)
    config = _base_config(argv)
    if config is not None:
      for a in flags.FLAGS.read_flags_from_files(argv[1:], force_gnu=False):
        m = _OVERRIDE.match(a)
        message = m and _unknown_field(config, m.group(1))
        if message:
          _config_error(message)
    raise


def main(argv):
  del argv
  import logging as pylogging
  from absl import logging
  logging.set_verbosity(logging.WARNING)   # orbax logs every save at INFO
  pylogging.getLogger("catchjax").setLevel(pylogging.INFO)
  from catchjax.validate import ConfigError
  try:
    config = _CONFIG.value
    config.keys()   # a config file that cannot be read raises here (ml_collections defers it)
  except OSError as e:
    _config_error(_missing_config_file(_config_path(sys.argv)) or f"--config: {e}")
  from catchjax import sharding
  sharding.maybe_initialize_distributed()   # TPU VM / Slurm / JAX_COORDINATOR_ADDRESS
  from catchjax import experiments
  try:
    experiments.run(config, _WORKDIR.value)
  except ConfigError as e:   # raised only by validation, before the workdir or any compute
    _config_error(e)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
