"""The whole analysis of a sweep: runs -> steps to target -> S/E fits -> power laws.

Beside the scan: each target's lack of fit (flagged targets stay in `critical`, out of the power
laws), the noise scales at each target, B_crit against E_min, and the branched local critical
batch size from branch runs passed along with the scan (told apart by their config).
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from collections.abc import Sequence

import pandas as pd

from bscan import workdir as wd
from bscan.analysis import branches as branches_lib
from bscan.analysis import branchruns
from bscan.analysis import eminlaw
from bscan.analysis import fit as fit_lib
from bscan.analysis import lackoffit
from bscan.analysis import load
from bscan.analysis import noise
from bscan.analysis import powerlaw
from bscan.analysis import targets as targets_lib
from bscan.errors import ConfigError


@dataclasses.dataclass
class Analysis:
  """Everything the figures and the report need; batches in tokens, losses in nats/token."""

  runs: pd.DataFrame  # one row per run (load.load_runs)
  targets: list[float]
  targets_source: str  # 'given', 'sweep.json' or 'auto'
  loss: str  # 'train' or 'eval': the curve steps-to-target are read from
  per_run_steps: pd.DataFrame  # steps to each target, per run
  best_steps: pd.DataFrame  # best over learning rates and seeds, per (size, batch, target)
  critical: pd.DataFrame  # S/E fit per (size, target) with intervals, and its lack of fit
  pending: pd.DataFrame  # (size, target) not fitted yet: the unfinished runs it waits for
  power_laws: dict[str, powerlaw.PowerLawFit]  # per size name and 'pooled'
  cloud: pd.DataFrame  # noise-scale measurements vs train loss
  confidence: float
  window: float
  min_step: float
  lack_of_fit: pd.DataFrame = dataclasses.field(  # lackoffit.lack_of_fit_table
      default_factory=lambda: pd.DataFrame(columns=list(lackoffit.TABLE_COLUMNS)))
  noise_at_targets: pd.DataFrame = dataclasses.field(  # noise.noise_at_targets
      default_factory=lambda: pd.DataFrame(columns=list(noise.AT_TARGET_COLUMNS)))
  e_min_law: dict[str, eminlaw.EMinLaw] = dataclasses.field(default_factory=dict)
  branch_table: pd.DataFrame = dataclasses.field(  # one row per branch run (branchruns)
      default_factory=lambda: pd.DataFrame(columns=list(branchruns.COLUMNS)))
  branches: branches_lib.BranchAnalysis | None = None  # None without branch runs
  epsilon: float = branches_lib.DEFAULT_EPSILON
  branch_alpha: float = branches_lib.DEFAULT_ALPHA

  def per_target(self) -> pd.DataFrame:
    """Per (size, target): scan B_crit with its interval and lack of fit, and the noise scales."""
    keys = ["size", "n_params", "target"]
    crit = self.critical[[*keys, "b_crit", "b_crit_lo", "b_crit_hi", "b_crit_flag",
                          *lackoffit.FLAG_COLUMNS]]
    keyed = {"n_params": float, "target": float}  # object dtype when a table is empty
    table = crit.astype(keyed).merge(self.noise_at_targets.astype(keyed), on=keys, how="outer")
    return table.sort_values(["n_params", "target"], kind="stable").reset_index(drop=True)

  def summary(self) -> dict:
    """JSON-friendly summary: power laws (B*, alpha_B with intervals) and the inputs used."""
    return {
        "loss": self.loss, "confidence": self.confidence, "targets": self.targets,
        "targets_source": self.targets_source, "batch_unit": "tokens", "loss_unit": "nats/token",
        "window": self.window, "min_step": self.min_step,
        "n_runs": int(len(self.runs)),
        "runs_by_status": {str(k): int(v) for k, v in
                           self.runs["status"].value_counts().items()} if len(self.runs) else {},
        "n_fits": int(len(self.critical)),
        "pending": [{"size": str(p.size), "target": float(p.target), "runs": list(p.runs)}
                    for p in self.pending.itertuples()],
        "power_law": {name: fit.as_dict() for name, fit in self.power_laws.items()},
        "kaplan_reference": dict(powerlaw.KAPLAN),
        "lack_of_fit": {"alpha": lackoffit.DEFAULT_ALPHA, "min_log_sigma": lackoffit.MIN_LOG_SIGMA,
                        "flagged": [{"size": str(r.size), "target": float(r.target),
                                     "p_value": float(r.lack_of_fit_p),
                                     "reason": r.lack_of_fit_reason}
                                    for r in self.critical.itertuples() if r.lack_of_fit]},
        "per_target": [_target_record(r) for _, r in self.per_target().iterrows()],
        "e_min_law": {name: law.as_dict() for name, law in self.e_min_law.items()},
        "branches": None if self.branches is None else {
            "epsilon": self.epsilon, "alpha": self.branch_alpha,
            "n_branch_runs": int(len(self.branch_table)),
            "checkpoints": [_checkpoint_record(r) for _, r in self.branches.cbs.iterrows()]},
    }


def _num(value) -> float:
  """A table value as a float (NaN stays NaN: written as null)."""
  return float(value) if value is not None and not pd.isna(value) else math.nan


def _target_record(r: pd.Series) -> dict:
  """One (size, target) of Analysis.per_target for summary.json."""
  fitted = not pd.isna(r["b_crit_flag"])
  return {
      "size": str(r["size"]), "target": float(r["target"]), "fitted": fitted,
      "b_crit": _num(r["b_crit"]), "b_crit_ci": [_num(r["b_crit_lo"]), _num(r["b_crit_hi"])],
      "b_crit_flag": str(r["b_crit_flag"]) if fitted else "",
      "lack_of_fit": bool(r["lack_of_fit"]) if fitted else False,
      "lack_of_fit_p": _num(r["lack_of_fit_p"]),
      "lack_of_fit_reason": str(r["lack_of_fit_reason"]) if fitted else "",
      **{f"{name}{suffix}": value for name in ("b_simple", "b_noise") for suffix, value in (
          ("", _num(r[name])), ("_range", [_num(r[f"{name}_lo"]), _num(r[f"{name}_hi"])]),
          ("_n_runs", int(0 if pd.isna(r[f"{name}_n_runs"]) else r[f"{name}_n_runs"])))}}


def _checkpoint_record(r: pd.Series) -> dict:
  """One checkpoint of the branched local CBS for summary.json."""
  return {"size": str(r["size"]), "checkpoint_step": int(r["checkpoint_step"]),
          "checkpoint_tokens": float(r["checkpoint_tokens"]), "ref_loss": _num(r["ref_loss"]),
          "batch_tokens": float(r["batch_tokens"]), "cbs": _num(r["cbs"]),
          "cbs_ci": [_num(r["cbs_lo"]), _num(r["cbs_hi"])],
          "n_replicates": int(r["n_replicates"]), "k_max": float(r["k_max"]),
          "flag": str(r["flag"])}


def _check_branch_settings(epsilon: float, alpha: float) -> None:
  if not (math.isfinite(epsilon) and epsilon > 0):
    raise ConfigError(f"epsilon {epsilon} must be a positive loss difference in nats/token "
                      "(e.g. 0.01)")
  if not 0 < alpha < 1:
    raise ConfigError(f"branch_alpha {alpha} is not a level between 0 and 1 (e.g. 0.1)")


def _branch_analysis(table: pd.DataFrame, epsilon: float, alpha: float
                     ) -> branches_lib.BranchAnalysis | None:
  """analyze_branches on the branch table; None without rows; its ValueErrors as ConfigErrors."""
  if table.empty:
    return None
  try:
    return branches_lib.analyze_branches(table, epsilon, alpha)
  except ValueError as e:
    raise ConfigError(f"branch runs cannot be analysed: {e}") from e


def analyze(workdirs: load.PathLike | Sequence[load.PathLike] | pd.DataFrame,
            targets: Sequence[float] | None = None, loss: str = "train",
            confidence: float = 0.95, window: float = targets_lib.DEFAULT_WINDOW,
            min_step: float = targets_lib.DEFAULT_MIN_STEP, n_auto_targets: int = 5,
            epsilon: float = branches_lib.DEFAULT_EPSILON,
            branch_alpha: float = branches_lib.DEFAULT_ALPHA,
            branch_table: pd.DataFrame | None = None) -> Analysis:
  """Analyses a sweep (directories, or a runs table already loaded) and its branch runs.

  Targets: `targets` if given, else those the launcher recorded in SWEEP_DIR/sweep.json, else
  chosen from the loss range that enough batch sizes reach (targets.choose_targets). A target
  that an unfinished run of a size may still reach is pending for that size, not fitted.
  Branch runs among the directories (config.branch.from_workdir set) give the branched local
  CBS (within `epsilon` nats, intervals at 1 - `branch_alpha`); a `branch_table` (the input of
  branches.analyze_branches, branchruns.COLUMNS) is used instead of them when given.
  Raises ConfigError for input that cannot be analysed (no runs, bad targets or confidence).
  """
  _check_branch_settings(epsilon, branch_alpha)
  if isinstance(workdirs, pd.DataFrame):
    runs, branch_runs, roots = workdirs, pd.DataFrame(), []
  else:
    roots = [workdirs] if isinstance(workdirs, (str, os.PathLike)) else list(workdirs)
    runs, branch_runs = load.load_sweeps(roots)
  if runs.empty and not branch_runs.empty:
    raise ConfigError(f"only branch runs found in {', '.join(map(str, roots))} "
                      f"({len(branch_runs)}, config.branch set), no scan run; pass the scan "
                      "sweep too, e.g. --workdir=SCAN_DIR,BRANCH_DIR")
  if runs.empty:
    raise ConfigError(f"no runs found in {', '.join(map(str, roots))} (no directory holds a "
                      f"readable {wd.CONFIG}); pass a sweep directory or run workdirs")
  if loss not in targets_lib.LOSS_COLUMNS:
    raise ConfigError(f"loss {loss!r} is not one of {sorted(targets_lib.LOSS_COLUMNS)}")
  if not 0 < confidence < 1:
    raise ConfigError(f"confidence {confidence} is not a level between 0 and 1 (e.g. 0.95)")
  source = "given"
  if targets is None:
    recorded = next((t for t in map(load.read_sweep_targets, roots) if t), None)
    if recorded:
      targets, source = recorded, "sweep.json"
    else:
      targets, source = targets_lib.choose_targets(runs, n_auto_targets, loss, window=window,
                                                   min_step=min_step), "auto"
      warnings.warn(f"no targets given or recorded; chose {targets} from the loss range",
                    UserWarning, stacklevel=2)
  targets = sorted({float(t) for t in targets})
  bad = [t for t in targets if not (math.isfinite(t) and t > 0)]
  if bad or not targets:
    raise ConfigError(f"target losses must be positive and finite (nats/token), got {bad or '[]'}")
  if branch_table is None:
    branch_table = (branchruns.branch_table(branch_runs, runs, window) if len(branch_runs)
                    else pd.DataFrame(columns=list(branchruns.COLUMNS)))
  per_run = targets_lib.steps_to_targets(runs, targets, loss, window, min_step)
  best = targets_lib.best_steps(per_run)  # leaves out the pending (size, target) pairs
  lack_of_fit = lackoffit.lack_of_fit_table(runs, best, loss, window, min_step)
  critical = lackoffit.flag_fits(fit_lib.fit_targets(best, confidence), lack_of_fit)
  return Analysis(
      runs=runs, targets=targets, targets_source=source, loss=loss, per_run_steps=per_run,
      best_steps=best, critical=critical, pending=targets_lib.pending_targets(per_run),
      power_laws=powerlaw.fit_power_laws(critical[~critical["lack_of_fit"]], confidence),
      cloud=noise.noise_scale_cloud(runs, window, min_step=min_step), confidence=confidence,
      window=window, min_step=min_step, lack_of_fit=lack_of_fit,
      noise_at_targets=noise.noise_at_targets(runs, targets, window, min_step),
      e_min_law=eminlaw.fit_e_min_laws(critical, confidence), branch_table=branch_table,
      branches=_branch_analysis(branch_table, epsilon, branch_alpha), epsilon=epsilon,
      branch_alpha=branch_alpha)
