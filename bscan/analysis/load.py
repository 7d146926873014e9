"""Loads run workdirs (local or gs:// via etils.epath) into a tidy table: one row per run.

Each row holds the run's plan (config.json `derived`: every bscan.workdir.RunPlan field), its
status, and its curves as 1-D numpy arrays aligned on logged steps. Every run file is read
through bscan.workdir. Damaged runs load with a RunWarning naming the file (and line), never an
exception: unreadable metric lines, missing metrics or status, a damaged status.json; a damaged
config.json skips the run.
"""

from __future__ import annotations

import math
import os
import typing
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from etils import epath

from bscan import sweep as sweep_lib
from bscan import workdir as wd
from bscan.errors import ConfigError

PathLike = str | epath.PathLike
Col = wd.Col

# Curves kept per run; arrays aligned with `step` (eval curves have their own steps).
CURVE_KEYS = (Col.TOKENS, Col.TRAIN_LOSS, Col.B_SIMPLE_TOKENS, Col.B_NOISE_TOKENS, Col.TRHS,
              Col.GHG, Col.BATCH, Col.OVERHEAD_TOKENS)
EVAL_STEP = "eval_step"  # runs-table column: the steps at which eval_loss was logged
UNKNOWN = "unknown"  # runs-table status of a run without status.json (not a workdir status)


def _numeric(hint: Any) -> bool:
  """Whether a RunPlan field holds a number (int, float, or either | None)."""
  return any(a in (int, float) for a in typing.get_args(hint) or (hint,))


SETTING_KEYS = wd.plan_fields()
NUMERIC_SETTINGS = tuple(k for k, h in typing.get_type_hints(wd.RunPlan).items() if _numeric(h))


class RunWarning(UserWarning):
  """A run directory is incomplete or damaged; it was loaded as far as possible."""


def _warn(msg: str) -> None:
  warnings.warn(msg, RunWarning, stacklevel=3)


MAX_DEPTH = 6  # launchers nest workdirs as SWEEP_DIR/3m/b64/lr1e-3/s0


def _sweep_record(root: epath.Path) -> dict[str, Any] | None:
  """ROOT/sweep.json, None when absent or damaged (with a warning)."""
  if not (root / sweep_lib.SWEEP_JSON).exists():
    return None
  try:
    data = sweep_lib.read_sweep_json(os.fspath(root))
  except (ValueError, OSError) as e:  # JSONDecodeError is a ValueError
    _warn(f"{root / sweep_lib.SWEEP_JSON}: unreadable ({e}); ignored")
    return None
  if not isinstance(data, dict):
    _warn(f"{root / sweep_lib.SWEEP_JSON}: not a JSON object; ignored")
    return None
  return data


def find_run_dirs(root: PathLike) -> list[epath.Path]:
  """Run workdirs under `root` (or root itself): the sweep.json points, else a search.

  A launcher's SWEEP_DIR/sweep.json lists each point's relpath; they are resolved against
  `root`, so a sweep copied elsewhere (gs:// to local) still loads. Without it, directories
  holding config.json are searched up to MAX_DEPTH levels, ignoring any inside another run.
  """
  root = epath.Path(root)
  if (root / wd.CONFIG).exists():
    return [root]
  points = (_sweep_record(root) or {}).get("points")
  relpaths = [p.get("relpath") for p in points if isinstance(p, dict) and p.get("relpath")
              ] if isinstance(points, list) else []
  if relpaths:
    dirs = []
    for rel in relpaths:
      if (root / rel / wd.CONFIG).exists():
        dirs.append(root / rel)
      else:
        _warn(f"{root / rel}: sweep point has no {wd.CONFIG} (not started?); skipped")
    return dirs
  found = set()
  for depth in range(1, MAX_DEPTH + 1):
    found |= {p.parent for p in root.glob("*/" * depth + wd.CONFIG)}
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


def curves_from_records(records: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
  """Columns of the per-step records; a step logged twice (resumed run) keeps its last value."""
  by_step: dict[int, Mapping[str, Any]] = {}
  for rec in records:
    by_step[int(rec[Col.STEP])] = rec  # later lines win: a resumed run re-logs from its checkpoint
  steps = np.array(sorted(by_step), dtype=float)
  recs = [by_step[int(s)] for s in steps]
  out = {Col.STEP: steps}
  for key in CURVE_KEYS:
    out[key] = np.array([_float(r.get(key)) for r in recs], dtype=float)
  ev = [(float(s), _float(r.get(Col.EVAL_LOSS))) for s, r in zip(steps, recs)
        if r.get(Col.EVAL_LOSS) is not None]
  out[EVAL_STEP] = np.array([s for s, _ in ev], dtype=float)
  out[Col.EVAL_LOSS] = np.array([v for _, v in ev], dtype=float)
  return out


def run_row(derived: Mapping[str, Any], curves: Mapping[str, np.ndarray],
            status: wd.Status | None, workdir: str = "", arg: str = "") -> dict[str, Any]:
  """One row of the runs table from a run plan (config.json `derived`), curves and status."""
  row: dict[str, Any] = {"workdir": workdir, "name": workdir.rstrip("/").rsplit("/", 1)[-1]}
  for key in SETTING_KEYS:
    row[key] = derived.get(key)
  row["arg"] = row["arg"] or arg
  if row["batch_tokens"] is None and row["batch_sequences"] and row["seq_len"]:
    row["batch_tokens"] = row["batch_sequences"] * row["seq_len"]
  if row["size"] is None:
    row["size"] = "?"
  empty = np.zeros(0)
  for key in (Col.STEP, EVAL_STEP, Col.EVAL_LOSS):
    row[key] = np.asarray(curves.get(key, empty), dtype=float)
  for key in CURVE_KEYS:  # a column the curves lack is NaN at every step, as on disk
    row[key] = np.asarray(curves.get(key, np.full(len(row[Col.STEP]), np.nan)), dtype=float)
  if len(row[Col.TOKENS]) and np.all(np.isnan(row[Col.TOKENS])) and row["batch_tokens"]:
    row[Col.TOKENS] = row[Col.STEP] * row["batch_tokens"]
  row["status"] = status.status if status else UNKNOWN
  row["reason"] = status.reason if status else ""
  loss = row[Col.TRAIN_LOSS]
  finite = np.isfinite(loss)
  row["diverged"] = row["status"] == wd.DIVERGED or bool(len(loss) and not finite.all())
  row["last_step"] = float(row[Col.STEP][-1]) if len(row[Col.STEP]) else 0.0
  row["final_train_loss"] = float(loss[finite][-1]) if finite.any() else math.nan
  row["has_noise_scale"] = bool(np.isfinite(row[Col.B_SIMPLE_TOKENS]).any())
  row["ramp"] = ""  # one batch; load_run reads a ramp's label from its config
  return row


def _read_status(workdir: epath.Path) -> wd.Status | None:
  try:
    status = wd.read_status(workdir)
  except ConfigError as e:
    _warn(f"{e}; status '{UNKNOWN}'")
    return None
  if status is None:
    _warn(f"{workdir}: {wd.STATUS} missing; status '{UNKNOWN}'")
  return status


def _read_metrics(workdir: epath.Path) -> list[dict[str, Any]]:
  """Metric rows; every unreadable line is reported with its file and line number."""
  try:
    rows, bad = wd.read_metrics(workdir)
  except (OSError, UnicodeDecodeError) as e:
    _warn(f"{workdir}: metrics cannot be read ({type(e).__name__}: {e}); run has no curves")
    return []
  for line in bad:
    kind = "truncated last line (killed mid-write?)" if wd.torn_tail([line]) else line.problem
    _warn(f"{line.path}:{line.line}: {kind}; line skipped")
  if not rows:
    _warn(f"{workdir}: no metric rows in {wd.METRICS}; run has no curves")
  return rows


# Runs-table columns of a branch run only (config.branch: bscan.branching), beside its plan.
BRANCH_COLUMNS = ("branch_from_workdir", "branch_from_step", "branch_replicate")


def branch_fields(config: Mapping[str, Any]) -> dict[str, Any] | None:
  """A branch run's config.branch as BRANCH_COLUMNS; None for a scan run (no from_workdir)."""
  branch = config.get("branch")
  if not isinstance(branch, Mapping) or not branch.get("from_workdir"):
    return None
  return {"branch_from_workdir": str(branch["from_workdir"]),
          "branch_from_step": int(branch.get("from_step") or 0),
          "branch_replicate": int(branch.get("replicate") or 0)}


def ramp_label(config: Mapping[str, Any]) -> str:
  """How a run's batch grows (config.ramp): '' for one batch, else 'schedule 0:4,150k:8',
  'noise 1×b_simple' or 'branched ε=0.01'."""
  ramp = config.get("ramp")
  if not isinstance(ramp, Mapping):
    return ""
  if ramp.get("schedule"):
    return f"schedule {ramp['schedule']}"
  if ramp.get("controller") == "noise":
    return f"noise {ramp.get('factor', 1.0):g}×{ramp.get('estimate', 'b_simple')}"
  if ramp.get("controller") == "branched":
    return f"branched ε={ramp.get('epsilon', 0.01):g}"
  return str(ramp.get("controller") or "")


def load_run(workdir: PathLike) -> dict[str, Any] | None:
  """Loads one workdir as a row; None (with a warning) when config.json is missing or damaged.

  A branch run's row also has BRANCH_COLUMNS (from its config.branch), and every row a
  `ramp` column (ramp_label: '' for a run at one batch).
  """
  workdir = epath.Path(workdir)
  try:
    config = wd.read_config(workdir)
  except ConfigError as e:
    _warn(f"{str(e).replace('; ' + wd.CONFIG_FIX, '')}; run skipped")
    return None
  if config is None:
    _warn(f"{workdir}: no {wd.CONFIG}; not a run, skipped")
    return None
  status = _read_status(workdir)
  curves = curves_from_records(_read_metrics(workdir))
  row = run_row(config.derived, curves, status, workdir=str(workdir), arg=config.arg)
  row.update(branch_fields(config.config) or {})
  row["ramp"] = ramp_label(config.config)
  if status and status.status in (wd.DIVERGED, wd.FAILED):
    diverged = ("its batch counts as beyond the local critical batch size" if
                "branch_from_workdir" in row else "targets after that count as never reached")
    _warn(f"{workdir}: run {status.describe()}; {diverged}" if status.status == wd.DIVERGED else
          f"{workdir}: run {status.describe()}; it resumes when its command runs again")
  return row


def runs_table(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
  """Rows to the runs table, sorted by model size, batch size, learning rate and seed."""
  df = pd.DataFrame(list(rows))
  if df.empty:
    return df
  # Numeric settings as floats, NaN where missing: fixed-budget runs write target_loss = null,
  # stop-at-target runs may write max_tokens = null, and a None column would break arithmetic.
  for key in NUMERIC_SETTINGS:
    df[key] = pd.to_numeric(df[key], errors="coerce")
  df = df.sort_values(["n_params", "batch_tokens", "learning_rate", "seed"], kind="stable")
  return df.reset_index(drop=True)


def load_sweeps(workdirs: PathLike | Sequence[PathLike]) -> tuple[pd.DataFrame, pd.DataFrame]:
  """(scan runs, branch runs) from sweep directories and/or run workdirs, told apart by config.

  Branch runs (config.branch.from_workdir set) train a fixed Δ from another run's checkpoint:
  they are no points of a batch-size scan, so they get their own table (with BRANCH_COLUMNS).
  Runs whose batch grows (config.ramp) are in neither: bscan.analysis.ramp reads them.
  """
  rows = _load_rows(workdirs)
  ramps = [r["name"] for r in rows if r.get("ramp")]
  if ramps:
    _warn(f"{len(ramps)} run(s) whose batch grows ({', '.join(ramps[:3])}"
          f"{', …' if len(ramps) > 3 else ''}) are no scan points and are left out; "
          "python -m experiments.ramp_table reads them")
  rows = [r for r in rows if not r.get("ramp")]
  branch = [r for r in rows if r.get("branch_from_workdir")]
  return runs_table([r for r in rows if not r.get("branch_from_workdir")]), runs_table(branch)


def load_all_runs(workdirs: PathLike | Sequence[PathLike]) -> pd.DataFrame:
  """Every run under the workdirs, ramps and branches included (the `ramp` column tells)."""
  return runs_table(_load_rows(workdirs))


def load_runs(workdirs: PathLike | Sequence[PathLike]) -> pd.DataFrame:
  """Loads the scan runs (not branch runs) of sweep directories and/or run workdirs."""
  return load_sweeps(workdirs)[0]


def _load_rows(workdirs: PathLike | Sequence[PathLike]) -> list[dict[str, Any]]:
  """A row per run under the given sweep directories and/or run workdirs."""
  if isinstance(workdirs, (str, os.PathLike)) or not isinstance(workdirs, Sequence):
    workdirs = [workdirs]
  rows = []
  for root in workdirs:
    dirs = find_run_dirs(root)
    if not dirs:
      _warn(f"{root}: no run workdirs (directories with {wd.CONFIG}) found")
    for d in dirs:
      row = load_run(d)
      if row is not None:
        if d != epath.Path(root):  # name runs by their path in the sweep: '3m/b64/lr1e-3/s0'
          row["name"] = str(d.relative_to(epath.Path(root)))
        rows.append(row)
  return rows


def read_sweep_targets(root: PathLike) -> list[float] | None:
  """Target losses recorded by the launcher in ROOT/sweep.json ({"targets": [...]}), if any."""
  targets = (_sweep_record(epath.Path(root)) or {}).get("targets")
  if not targets:
    return None
  try:
    if not isinstance(targets, list):
      raise TypeError
    return [float(t) for t in targets]
  except (TypeError, ValueError):
    _warn(f"{epath.Path(root) / sweep_lib.SWEEP_JSON}: 'targets' is not a list of numbers "
          f"({targets!r}); ignored")
    return None
