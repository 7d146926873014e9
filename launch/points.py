"""What every launcher checks before it creates or submits anything: each point's config.

A point is checked as the trainer will check it (bscan.config.validate) on the target's
device and process count, with the launcher's --config_override values applied, so a batch
that the slice cannot split fails here, naming the point, and not on paid-for workers.
The launchers' --config_override and --env values are checked for form here too.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import ml_collections

from bscan import sweep as sweep_lib
from bscan.errors import ConfigError
from launch import cli

DEFAULT_TRAINER = "experiments.train"
_FIELD_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse_overrides(values: Sequence[str]) -> list[str]:
  """--config_override values ('data.data_dir=gs://b/tfds'), checked for form."""
  for value in values:
    cli.check_one_line("config_override", value)
    field, sep, _ = value.partition("=")
    if not sep or not _FIELD_RE.fullmatch(field):
      raise ConfigError(f"--config_override={value!r}: give FIELD=VALUE with a dotted config "
                        "field, e.g. data.data_dir=gs://BUCKET/tensorflow_datasets")
  return list(values)


def parse_env(values: Sequence[str]) -> dict[str, str]:
  """--env values ('NAME=VALUE') as a dict, checked for form."""
  env = {}
  for value in values:
    cli.check_one_line("env", value)
    name, sep, text = value.partition("=")
    if not sep or not _ENV_RE.fullmatch(name):
      raise ConfigError(f"--env={value!r}: give NAME=VALUE, e.g. TFDS_DATA_DIR=gs://BUCKET/tfds")
    env[name] = text
  return env


def _typed(field: str, old: object, text: str) -> object:
  """text as the type of the field's current value (what config_flags does on the trainer)."""
  if isinstance(old, bool):
    if text.lower() not in ("true", "false"):
      raise ConfigError(f"--config_override={field}={text}: {field} is a bool; give true/false")
    return text.lower() == "true"
  try:
    return type(old)(text) if isinstance(old, (int, float, str)) else text
  except ValueError as e:
    raise ConfigError(f"--config_override={field}={text}: {field} is a "
                      f"{type(old).__name__}") from e


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
  """Sets each FIELD=VALUE on cfg; ConfigError naming a field the config does not have."""
  for override in overrides:
    field, _, text = override.partition("=")
    *parents, leaf = field.split(".")
    node = cfg
    for part in parents:
      node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
      raise ConfigError(f"--config_override={override}: the config has no field {field}; see "
                        "experiments/configs/base.py for every field")
    with node.ignore_type():
      node[leaf] = _typed(field, node[leaf], text)


def point_config(config_path: str, arg: str,
                 overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """The config a point's trainer will run: get_config(arg) with the overrides applied."""
  module = sweep_lib.import_config(config_path)
  try:
    cfg = module.get_config(arg)
  except ConfigError:
    raise
  except Exception as e:  # the config file's own code
    raise ConfigError(f"get_config({arg!r}) of {config_path} raised {type(e).__name__}: "
                      f"{e}") from e
  apply_overrides(cfg, overrides)
  return cfg


def check_points(config_path: str, points: Sequence[sweep_lib.ExpandedPoint], *,
                 num_devices: int, num_processes: int, overrides: Sequence[str] = (),
                 trainer: str = DEFAULT_TRAINER, target: str = "") -> None:
  """Validates every point as the trainer will on `num_devices` in `num_processes` processes.

  Points of another trainer (a custom --trainer) are not checked: their configs are theirs.
  ConfigError names the point, the target and the trainer's own message.
  """
  if trainer != DEFAULT_TRAINER:
    return
  from bscan import config as config_lib  # pylint: disable=g-import-not-at-top  (imports JAX)
  where = target or f"{num_devices} device(s) in {num_processes} process(es)"
  for point in points:
    cfg = point_config(config_path, point.arg, overrides)
    try:
      config_lib.validate(cfg, num_devices, num_processes)
    except ConfigError as e:
      raise ConfigError(f"point {point.arg} cannot run on {where}: {e}") from e

