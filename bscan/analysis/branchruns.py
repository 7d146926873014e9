"""Branch runs to the tidy table of bscan.analysis.branches: one row per branch, with its reference.

A branch run (bscan.branching) restores its reference run's checkpoint at branch.from_step and
trains a fixed Δ tokens at k times the reference's batch; the trainer evaluates its last step.
Per branch:
  checkpoint_step = from_step; checkpoint_tokens = from_step x the reference's batch (tokens);
  ref_loss = the reference's smoothed train loss at from_step (targets' smoothing, interpolated
    in log step), the loss at which the local CBS is drawn next to the scan's B_crit(L);
  k = batch / the reference's batch (a whole number); final_loss = the last eval loss, NaN when
    the branch diverged (analyze_branches counts its k as beyond ε).
Unfinished branches, and finished ones without an eval loss, are left out (a RunWarning names
them): a NaN would read as diverged. The reference is found among the loaded scan runs by its
path, else read from its workdir; a branch without one is a ConfigError.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import numpy as np
import pandas as pd

from bscan import workdir as wd
from bscan.analysis import branches as branches_lib
from bscan.analysis import load
from bscan.analysis import targets as targets_lib
from bscan.errors import ConfigError

Col = wd.Col
COLUMNS = (*branches_lib.INPUT_COLUMNS, "workdir", "reference")


def normalized(path: load.PathLike) -> str:
  """The path with '..' and '.' resolved (a URL's scheme kept)."""
  text = os.fspath(path)
  if "://" in text:
    scheme, rest = text.split("://", 1)
    return f"{scheme}://{os.path.normpath(rest)}"
  return os.path.normpath(text)


def path_key(path: load.PathLike) -> str:
  """One spelling of a path (normalized, absolute when local), to match workdirs."""
  text = normalized(path)
  return text if "://" in text else os.path.abspath(text)


def _missing(branch: pd.Series, ref: str, why: str) -> ConfigError:
  return ConfigError(
      f"branch run {branch['workdir']}: its reference {ref} (branch.from_workdir="
      f"{branch['branch_from_workdir']!r}) {why}; pass the sweep that holds the reference "
      "together with the branches, or remove the branch runs")


def _reference_loader(scan_runs: pd.DataFrame) -> Callable[[pd.Series], pd.Series]:
  """Reference run of a branch: a loaded scan run by path, else its workdir read once."""
  loaded = {path_key(w): run for _, run in scan_runs.iterrows() for w in [run["workdir"]]}

  def reference(branch: pd.Series) -> pd.Series:
    ref = wd.branch_reference(branch["workdir"], branch["branch_from_workdir"])
    key = path_key(ref)
    if key not in loaded:
      try:
        config = wd.read_config(ref)
      except ConfigError as e:
        raise _missing(branch, normalized(ref), f"cannot be read ({e})") from e
      if config is None:
        raise _missing(branch, normalized(ref), f"holds no run ({wd.CONFIG} missing)")
      row = load.load_run(normalized(ref))
      loaded[key] = pd.Series(row)
    return loaded[key]

  return reference


def smoothed_loss_at(run: pd.Series, step: float,
                     window: float = targets_lib.DEFAULT_WINDOW) -> float:
  """The run's smoothed train loss at `step` (interpolated in log step); NaN outside its curve."""
  s, loss = targets_lib.finite_prefix(run[Col.STEP], run[Col.TRAIN_LOSS])
  if not len(s) or not s[0] <= step <= s[-1]:
    return np.nan
  smoothed = targets_lib.smooth_log_window(s, loss, window)
  return float(np.interp(np.log(step), np.log(s), smoothed))


def _final_loss(branch: pd.Series) -> float | None:
  """The branch's last eval loss; NaN when it diverged; None when it cannot count (yet)."""
  if branch["diverged"]:
    return np.nan
  if branch["status"] != wd.DONE:
    return None
  evals = np.asarray(branch[Col.EVAL_LOSS], float)
  return float(evals[-1]) if len(evals) else None


def branch_table(branch_runs: pd.DataFrame, scan_runs: pd.DataFrame,
                 window: float = targets_lib.DEFAULT_WINDOW) -> pd.DataFrame:
  """The input of branches.analyze_branches (and workdir, reference) from branch runs.

  Raises:
    ConfigError: a branch's reference is missing or damaged, its batch is not a whole multiple
      of the reference's, or one (size, checkpoint step) has branches of two references.
  """
  reference = _reference_loader(scan_runs)
  rows, left_out = [], []
  ref_loss_cache: dict[tuple[str, int], float] = {}
  for _, branch in branch_runs.iterrows():
    ref = reference(branch)
    at = int(branch["branch_from_step"])
    ratio = float(branch["batch_tokens"]) / float(ref["batch_tokens"])
    k = int(round(ratio))
    if k < 1 or abs(ratio - k) > 1e-9 * ratio:
      raise ConfigError(
          f"branch run {branch['workdir']}: its batch of {branch['batch_tokens']:g} tokens is "
          f"not a whole multiple of its reference {ref['workdir']}'s {ref['batch_tokens']:g}; a "
          "branch trains at k times the reference's batch (set batch_size accordingly)")
    final = _final_loss(branch)
    if final is None:
      left_out.append(f"{branch['name']} ({branch['status']})")
      continue
    key = (path_key(ref["workdir"]), at)
    if key not in ref_loss_cache:
      ref_loss_cache[key] = smoothed_loss_at(ref, at, window)
      if not np.isfinite(ref_loss_cache[key]):
        warnings.warn(f"{ref['workdir']}: no train loss logged around step {at}, where branches "
                      "start; their checkpoint has no loss (ref_loss NaN)", load.RunWarning,
                      stacklevel=2)
    rows.append({"size": branch["size"], "checkpoint_step": at,
                 "checkpoint_tokens": float(at * ref["batch_tokens"]),
                 "ref_loss": ref_loss_cache[key], "k": k,
                 "batch_tokens": float(branch["batch_tokens"]),
                 "replicate": int(branch["branch_replicate"]), "final_loss": final,
                 "workdir": str(branch["workdir"]), "reference": str(ref["workdir"])})
  if left_out:
    warnings.warn(f"{len(left_out)} branch run(s) left out until they finish with an eval loss: "
                  f"{', '.join(left_out[:4])}{' and more' if len(left_out) > 4 else ''}",
                  load.RunWarning, stacklevel=2)
  table = pd.DataFrame(rows, columns=list(COLUMNS))
  no_base = table.groupby(["size", "checkpoint_step"], sort=False)["k"].transform(
      lambda k: not (k == 1).any()).astype(bool)
  if no_base.any():  # every k is compared with k = 1 of its replicate
    lost = table[no_base].drop_duplicates(["size", "checkpoint_step"])
    warnings.warn(f"{len(lost)} checkpoint(s) left out, no k = 1 branch finished yet: "
                  + ", ".join(f"size {r.size} step {r.checkpoint_step}" for r in lost.itertuples()),
                  load.RunWarning, stacklevel=2)
    table = table[~no_base]
  for (size, step), group in table.groupby(["size", "checkpoint_step"], sort=False):
    refs = sorted(group["reference"].unique())
    if len(refs) > 1:
      raise ConfigError(
          f"branches of size {size} from step {step} come from {len(refs)} reference runs "
          f"({', '.join(refs)}); analyse each reference's branches separately")
  # Sizes in the runs table's order (by N); analyze_branches keeps the order it is given.
  table["_size"] = pd.factorize(table["size"])[0]
  table = table.sort_values(["_size", "checkpoint_step", "k", "replicate"], kind="stable")
  return table.drop(columns="_size").reset_index(drop=True)
