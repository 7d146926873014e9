"""Sweeps: the points of a scan, their config args and their deterministic workdirs.

A scan config file defines, next to `get_config(arg)`, a pure `sweep()` that returns a
`Sweep`. Launchers only expand it: each point becomes the config arg
'size=3m,batch=64,lr=0.001,seed=0' and the workdir SWEEP_DIR/3m/b64/lr1e-3/s0.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import re
import shlex
import sys
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from etils import epath

from bscan import workdir as workdir_lib

Value = str | int | float | bool

# Scan axes come first, in this order, in args and workdirs; other keys follow sorted.
AXES = ("size", "batch", "lr", "seed")
_WORKDIR_PREFIX = {"size": "", "batch": "b", "lr": "lr", "seed": "s"}
_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")
_UNSAFE_RE = re.compile(r"[^A-Za-z0-9._-]")
SWEEP_JSON = workdir_lib.SWEEP_MARKER


@dataclasses.dataclass(frozen=True)
class Sweep:
  """The points of a scan (dicts of scan values) and the target losses it is for."""

  points: Sequence[Mapping[str, Value]]  # stored as a tuple of dicts
  # Stored as a tuple; none for sweeps that reach no target (branches: a fixed Δ each).
  targets: Sequence[float] = ()

  def __post_init__(self):
    # Config files pass lists; store tuples so a sweep cannot change after validation.
    object.__setattr__(self, "points", tuple(dict(p) for p in self.points))
    object.__setattr__(self, "targets", tuple(float(t) for t in self.targets))
    if not self.points:
      raise ValueError("sweep has no points")
    bad = [t for t in self.targets if not (math.isfinite(t) and t > 0)]
    if bad:
      raise ValueError(f"target losses must be positive and finite, got {bad}")
    args = [point_arg(p) for p in self.points]
    dirs = [point_relpath(p) for p in self.points]
    for name, items in (("config args", args), ("workdirs", dirs)):
      dups = sorted({x for x in items if items.count(x) > 1})
      if dups:
        raise ValueError(f"sweep has duplicate {name}: {dups}")


class ExpandedPoint(NamedTuple):
  """One point of a sweep, ready to run: its values, config arg and workdir."""

  point: dict[str, Value]
  arg: str
  workdir: str


def _ordered_keys(point: Mapping[str, Any]) -> list[str]:
  return [k for k in AXES if k in point] + sorted(k for k in point if k not in AXES)


def _format_value(key: str, value: Any) -> str:
  if not isinstance(value, (str, int, float)):  # bool is an int
    raise ValueError(f"point value {key}={value!r} must be a str, int, float or bool")
  text = repr(value) if isinstance(value, float) else str(value)
  if isinstance(value, str) and (not value or "," in value or "=" in value):
    raise ValueError(f"point value {key}={value!r} must be non-empty without ',' or '='")
  if isinstance(value, str) and parse_value(value) != value:
    raise ValueError(f"point value {key}={value!r} would not round-trip (it parses as a "
                     f"{type(parse_value(value)).__name__}); use that type instead")
  return text


def point_arg(point: Mapping[str, Value]) -> str:
  """Config arg of a point, e.g. 'size=3m,batch=64,lr=0.001,seed=0' (stable key order)."""
  parts = []
  for key in _ordered_keys(point):
    if not _KEY_RE.match(key):
      raise ValueError(f"point key {key!r} is not an identifier")
    parts.append(f"{key}={_format_value(key, point[key])}")
  return ",".join(parts)


def parse_value(text: str) -> Value:
  """Parses one arg value: int, then float, then bool, else the string itself."""
  for kind in (int, float):
    try:
      return kind(text)
    except ValueError:
      pass
  return {"True": True, "False": False}.get(text, text)


def parse_point_arg(arg: str) -> dict[str, Value]:
  """Inverse of `point_arg`: 'size=3m,batch=64' -> {'size': '3m', 'batch': 64}."""
  point: dict[str, Value] = {}
  for part in filter(None, arg.split(",")):
    key, sep, value = part.partition("=")
    if not sep:
      raise ValueError(f"arg part {part!r} of {arg!r} is not key=value")
    point[key.strip()] = parse_value(value.strip())
  return point


def _compact(value: Value) -> str:
  """Short filesystem-safe text: floats as 1e-3 / 2.5e-4, others sanitised."""
  if isinstance(value, float) and not isinstance(value, bool):
    mantissa, exponent = f"{value:.6e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"
  return _UNSAFE_RE.sub("_", str(value))


def point_relpath(point: Mapping[str, Value]) -> str:
  """Workdir of a point relative to the sweep dir, e.g. '3m/b64/lr1e-3/s0'."""
  parts = []
  for key in _ordered_keys(point):
    prefix = _WORKDIR_PREFIX.get(key, _UNSAFE_RE.sub("_", key))
    parts.append(prefix + _compact(point[key]))
  return "/".join(p.lstrip(".") or "_" for p in parts)  # no '.', '..' or hidden dirs


def point_workdir(sweep_dir: str, point: Mapping[str, Value]) -> str:
  """Deterministic workdir of a point under sweep_dir (a local path or gs:// URL)."""
  return f"{str(sweep_dir).rstrip('/')}/{point_relpath(point)}"


def expand(sweep: Sweep, sweep_dir: str) -> list[ExpandedPoint]:
  """The points of a sweep with their config args and workdirs, in sweep order."""
  return [ExpandedPoint(dict(p), point_arg(p), point_workdir(sweep_dir, p)) for p in sweep.points]


def trainer_command(python: str, trainer: str, config: str, point: ExpandedPoint,
                    multihost: str, overrides: Sequence[str] = (),
                    env: Mapping[str, str] | None = None,
                    flags: Sequence[str] = ()) -> list[str]:
  """argv of one point's trainer run; every launcher builds it here.

  `python` may be several shell words ('conda run -n x python'); `trainer` is a module run
  with -m, or a .py file. `overrides` ('data.data_dir=gs://b/tfds') become
  --config.data.data_dir=... after the point's own flags; `env` ({'NAME': 'VALUE'}) is set
  with `env NAME=VALUE` in front; `flags` ('--backend=gpu') follow --multihost. ValueError
  when `python` does not split into words.
  """
  words = shlex.split(python)
  if not words:
    raise ValueError(f"python command {python!r} is empty")
  target = [trainer] if trainer.endswith(".py") else ["-m", trainer]
  prefix = ["env", *(f"{k}={v}" for k, v in env.items())] if env else []
  return [*prefix, *words, *target, f"--config={config}:{point.arg}",
          f"--workdir={point.workdir}", f"--multihost={multihost}", *flags,
          *(f"--config.{o}" for o in overrides)]


def import_config(config_path: str) -> Any:
  """Imports a config file by path (its module); clear errors for a missing or broken file."""
  path = epath.Path(config_path.split(":", 1)[0])
  if not path.is_file():
    raise FileNotFoundError(f"config file {config_path!r} not found (cwd-relative path to a .py "
                            "file, e.g. experiments/configs/scan.py)")
  name = "_bscan_sweep_config_" + _UNSAFE_RE.sub("_", str(path))
  spec = importlib.util.spec_from_file_location(name, str(path))
  if spec is None or spec.loader is None:
    raise ValueError(f"config file {config_path!r} is not an importable Python file")
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # dataclasses in the config look their module up here
  try:
    spec.loader.exec_module(module)
  except Exception as e:
    raise ValueError(f"config file {config_path!r} failed to import: "
                     f"{type(e).__name__}: {e}") from e
  finally:
    sys.modules.pop(name, None)
  return module


def load_sweep(config_path: str) -> Sweep:
  """Imports a config file by path and returns its sweep(); clear errors otherwise."""
  module = import_config(config_path)
  if not callable(getattr(module, "sweep", None)):
    raise ValueError(f"config file {config_path!r} defines no sweep(): it is not a scan, so "
                     "there is nothing to launch (run it with experiments.train instead)")
  try:
    result = module.sweep()
  except Exception as e:  # the config's own code: any fault is the file's, so name it
    raise ValueError(f"sweep() of {config_path!r} raised {type(e).__name__}: {e}") from e
  if not isinstance(result, Sweep):
    raise TypeError(f"sweep() of {config_path!r} returned {type(result).__name__}, "
                    "expected bscan.sweep.Sweep")
  return result


def sweep_json(config_path: str, sweep: Sweep, sweep_dir: str) -> dict[str, Any]:
  """The content of SWEEP_DIR/sweep.json: config, targets and each point's arg and workdir."""
  return {
      "config": str(config_path),
      "targets": list(sweep.targets),
      "points": [{"arg": p.arg, "workdir": p.workdir, "relpath": point_relpath(p.point),
                  "point": p.point} for p in expand(sweep, sweep_dir)],
  }


def write_sweep_json(config_path: str, sweep: Sweep, sweep_dir: str) -> str:
  """Writes SWEEP_DIR/sweep.json (so the analysis finds the targets); returns its path."""
  path = epath.Path(sweep_dir) / SWEEP_JSON
  path.parent.mkdir(parents=True, exist_ok=True)
  # Atomic: a launcher killed mid-write must not leave the analysis a torn sweep.json.
  workdir_lib.write_text_atomic(
      path, json.dumps(sweep_json(config_path, sweep, sweep_dir), indent=1) + "\n")
  return str(path)


def read_sweep_json(sweep_dir: str) -> dict[str, Any]:
  """Reads SWEEP_DIR/sweep.json as written by a launcher."""
  return json.loads((epath.Path(sweep_dir) / SWEEP_JSON).read_text())

