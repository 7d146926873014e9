"""The whole analysis of a sweep: runs -> steps to target -> S/E fits -> power laws."""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from collections.abc import Sequence

import pandas as pd

from bscan import workdir as wd
from bscan.analysis import fit as fit_lib
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
  critical: pd.DataFrame  # S/E fit per (size, target): S_min, E_min, B_crit with intervals
  pending: pd.DataFrame  # (size, target) not fitted yet: the unfinished runs it waits for
  power_laws: dict[str, powerlaw.PowerLawFit]  # per size name and 'pooled'
  cloud: pd.DataFrame  # noise-scale measurements vs train loss
  confidence: float
  window: float
  min_step: float

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
    }


def analyze(workdirs: load.PathLike | Sequence[load.PathLike] | pd.DataFrame,
            targets: Sequence[float] | None = None, loss: str = "train",
            confidence: float = 0.95, window: float = targets_lib.DEFAULT_WINDOW,
            min_step: float = targets_lib.DEFAULT_MIN_STEP, n_auto_targets: int = 5) -> Analysis:
  """Analyses a sweep (directories, or a runs table already loaded).

  Targets: `targets` if given, else those the launcher recorded in SWEEP_DIR/sweep.json, else
  chosen from the loss range that enough batch sizes reach (targets.choose_targets). A target
  that an unfinished run of a size may still reach is pending for that size, not fitted.
  Raises ConfigError for input that cannot be analysed (no runs, bad targets or confidence).
  """
  if isinstance(workdirs, pd.DataFrame):
    runs, roots = workdirs, []
  else:
    roots = [workdirs] if isinstance(workdirs, (str, os.PathLike)) else list(workdirs)
    runs = load.load_runs(roots)
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
  per_run = targets_lib.steps_to_targets(runs, targets, loss, window, min_step)
  best = targets_lib.best_steps(per_run)  # leaves out the pending (size, target) pairs
  critical = fit_lib.fit_targets(best, confidence)
  return Analysis(
      runs=runs, targets=targets, targets_source=source, loss=loss, per_run_steps=per_run,
      best_steps=best, critical=critical, pending=targets_lib.pending_targets(per_run),
      power_laws=powerlaw.fit_power_laws(critical, confidence),
      cloud=noise.noise_scale_cloud(runs, window, min_step=min_step), confidence=confidence,
      window=window,
      min_step=min_step)
