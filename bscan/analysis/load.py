"""Loads run workdirs (local or gs:// via etils.epath) into a tidy table: one row per run.

Each row holds the run's scanned settings (from config.json "derived"), its status, and its
curves as 1-D numpy arrays aligned on logged steps. Damaged runs load with a RunWarning, never
an exception: a truncated last line of metrics.jsonl (a run killed mid-write), missing
metrics or status files, diverged or failed runs.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from etils import epath

PathLike = str | epath.PathLike

# Curves kept per run; arrays aligned with `step` (eval curves have their own steps).
CURVE_KEYS = ("tokens", "train_loss", "b_simple_tokens", "b_noise_tokens")
SETTING_KEYS = ("size", "n_params", "n_layer", "d_model", "seq_len", "batch_sequences",
                "batch_tokens", "learning_rate", "seed", "target_loss", "max_tokens",
                "vocab_size", "dataset", "tokenizer")


class RunWarning(UserWarning):
  """A run directory is incomplete or damaged; it was loaded as far as possible."""


def _warn(msg: str) -> None:
  warnings.warn(msg, RunWarning, stacklevel=3)


MAX_DEPTH = 6  # launchers nest workdirs as SWEEP_DIR/3m/b64/lr1e-3/s0


def find_run_dirs(root: PathLike) -> list[epath.Path]:
  """Run workdirs under `root` (or root itself): the sweep.json points, else a search.

  A launcher's SWEEP_DIR/sweep.json lists each point's relpath; they are resolved against
  `root`, so a sweep copied elsewhere (gs:// to local) still loads. Without it, directories
  holding config.json are searched up to MAX_DEPTH levels, ignoring any inside another run.
  """
  root = epath.Path(root)
  if (root / "config.json").exists():
    return [root]
  sweep = _read_json(root / "sweep.json") if (root / "sweep.json").exists() else None
  relpaths = [p.get("relpath") for p in (sweep or {}).get("points", []) if p.get("relpath")]
  if relpaths:
    dirs = []
    for rel in relpaths:
      if (root / rel / "config.json").exists():
        dirs.append(root / rel)
      else:
        _warn(f"{root / rel}: sweep point has no config.json (not started?); skipped")
    return dirs
  found = set()
  for depth in range(1, MAX_DEPTH + 1):
    found |= {p.parent for p in root.glob("*/" * depth + "config.json")}
  runs = []
  for d in sorted(found, key=lambda p: (len(p.parts), str(p))):
    if not any(r in d.parents for r in runs):  # e.g. a config.json inside a run's checkpoints
      runs.append(d)
  return sorted(runs, key=str)


def _float(v: Any) -> float:
  """JSON value to float: null (how the trainer writes NaN) and non-numbers become NaN."""
  try:
    return float(v) if v is not None else math.nan
  except (TypeError, ValueError):
    return math.nan


def parse_metrics(text: str, where: str = "metrics.jsonl") -> list[dict[str, Any]]:
  """Parses JSON lines; a truncated last line (killed mid-write) is skipped with a warning."""
  lines = text.splitlines()
  records = []
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      rec = json.loads(line)
    except json.JSONDecodeError:
      last = all(not l.strip() for l in lines[i + 1:])
      _warn(f"{where}: {'truncated last' if last else 'unreadable'} line {i + 1} skipped")
      continue
    if isinstance(rec, dict) and "step" in rec:
      records.append(rec)
  return records


def curves_from_records(records: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
  """Columns of the per-step records; a step logged twice (resumed run) keeps its last value."""
  by_step: dict[int, Mapping[str, Any]] = {}
  for rec in records:
    by_step[int(rec["step"])] = rec  # later lines win: a resumed run re-logs from its checkpoint
  steps = np.array(sorted(by_step), dtype=float)
  recs = [by_step[int(s)] for s in steps]
  out = {"step": steps}
  for key in CURVE_KEYS:
    out[key] = np.array([_float(r.get(key)) for r in recs], dtype=float)
  ev = [(float(s), _float(r.get("eval_loss"))) for s, r in zip(steps, recs)
        if r.get("eval_loss") is not None]
  out["eval_step"] = np.array([s for s, _ in ev], dtype=float)
  out["eval_loss"] = np.array([v for _, v in ev], dtype=float)
  return out


def run_row(config: Mapping[str, Any], curves: Mapping[str, np.ndarray],
            status: Mapping[str, Any] | None, workdir: str = "") -> dict[str, Any]:
  """One row of the runs table from config.json content, curves and status.json content."""
  derived = dict(config.get("derived", {}))
  row: dict[str, Any] = {"workdir": workdir, "name": workdir.rstrip("/").rsplit("/", 1)[-1],
                         "arg": config.get("arg", "")}
  for key in SETTING_KEYS:
    row[key] = derived.get(key)
  if row["batch_tokens"] is None and row["batch_sequences"] and row["seq_len"]:
    row["batch_tokens"] = row["batch_sequences"] * row["seq_len"]
  if row["size"] is None:
    row["size"] = config.get("config", {}).get("model", {}).get("size", "?")
  empty = np.zeros(0)
  for key in ("step", *CURVE_KEYS, "eval_step", "eval_loss"):
    row[key] = np.asarray(curves.get(key, empty), dtype=float)
  if len(row["tokens"]) and np.all(np.isnan(row["tokens"])) and row["batch_tokens"]:
    row["tokens"] = row["step"] * row["batch_tokens"]
  status = dict(status or {})
  row["status"] = status.get("status", "unknown")
  row["reason"] = status.get("reason", "")
  loss = row["train_loss"]
  finite = np.isfinite(loss)
  row["diverged"] = row["status"] == "diverged" or bool(len(loss) and not finite.all())
  row["last_step"] = float(row["step"][-1]) if len(row["step"]) else 0.0
  row["final_train_loss"] = float(loss[finite][-1]) if finite.any() else math.nan
  row["has_noise_scale"] = bool(np.isfinite(row["b_simple_tokens"]).any())
  return row


def _read_json(path: epath.Path) -> dict[str, Any] | None:
  try:
    return json.loads(path.read_text())
  except FileNotFoundError:
    return None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    _warn(f"{path}: unreadable JSON ({e})")
    return None


def load_run(workdir: PathLike) -> dict[str, Any] | None:
  """Loads one workdir as a row; None (with a warning) when it has no usable config.json."""
  workdir = epath.Path(workdir)
  config = _read_json(workdir / "config.json")
  if config is None:
    _warn(f"{workdir}: no readable config.json; not a run, skipped")
    return None
  status = _read_json(workdir / "status.json")
  if status is None:
    _warn(f"{workdir}: status.json missing; status 'unknown'")
  try:
    text = (workdir / "metrics.jsonl").read_text()
  except FileNotFoundError:
    _warn(f"{workdir}: metrics.jsonl missing; run has no curves")
    text = ""
  records = parse_metrics(text, where=f"{workdir}/metrics.jsonl")
  row = run_row(config, curves_from_records(records), status, workdir=str(workdir))
  if row["status"] in ("diverged", "failed"):
    _warn(f"{workdir}: run {row['status']} at step {status.get('step') if status else '?'} "
          f"({row['reason'] or 'no reason'}); targets after that count as never reached")
  return row


def runs_table(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
  """Rows to the runs table, sorted by model size, batch size, learning rate and seed."""
  df = pd.DataFrame(list(rows))
  if df.empty:
    return df
  # Numeric settings as floats, NaN where missing: fixed-budget runs write target_loss = null,
  # stop-at-target runs may write max_tokens = null, and a None column would break arithmetic.
  for key in ("n_params", "batch_sequences", "batch_tokens", "learning_rate", "seed",
              "target_loss", "max_tokens", "vocab_size", "seq_len"):
    df[key] = pd.to_numeric(df[key], errors="coerce")
  df = df.sort_values(["n_params", "batch_tokens", "learning_rate", "seed"], kind="stable")
  return df.reset_index(drop=True)


def load_runs(workdirs: PathLike | Sequence[PathLike]) -> pd.DataFrame:
  """Loads runs from sweep directories and/or run workdirs into the runs table."""
  if isinstance(workdirs, (str, os.PathLike)) or not isinstance(workdirs, Sequence):
    workdirs = [workdirs]
  rows = []
  for root in workdirs:
    dirs = find_run_dirs(root)
    if not dirs:
      _warn(f"{root}: no run workdirs (directories with config.json) found")
    for d in dirs:
      row = load_run(d)
      if row is not None:
        if d != epath.Path(root):  # name runs by their path in the sweep: '3m/b64/lr1e-3/s0'
          row["name"] = str(d.relative_to(epath.Path(root)))
        rows.append(row)
  return runs_table(rows)


def read_sweep_targets(root: PathLike) -> list[float] | None:
  """Target losses recorded by the launcher in ROOT/sweep.json ({"targets": [...]}), if any."""
  path = epath.Path(root) / "sweep.json"
  if not path.exists():
    return None
  data = _read_json(path) or {}
  targets = data.get("targets")
  return [float(t) for t in targets] if targets else None
