"""Critical batch size from batch-size scans: load workdirs, fit S/E and B_crit(L), draw figures.

Reads run workdirs (local or gs://) only, through bscan.workdir; imports no JAX, and imports its
submodules (pandas, scipy, matplotlib) on first use, so the CLI answers a bad flag at once.
Batches are in tokens and losses in nats/token throughout.

  analysis = bscan.analysis.analyze("gs://bucket/sweep")
  bscan.analysis.plot_critical_batch(analysis)
  bscan.analysis.plot_comparison(bscan.analysis.analyze(["runs/scan", "runs/branches"]))
  bscan.analysis.fit_critical_batch(batch_sizes, steps).b_crit
"""

import importlib
from typing import TYPE_CHECKING, Any

# name -> submodule that defines it
_EXPORTS = {
    "plot_batch_scan": "figures", "plot_critical_batch": "figures", "save_figure": "figures",
    "CriticalBatchFit": "fit", "fit_critical_batch": "fit", "fit_targets": "fit",
    "FitWarning": "fit", "TooFewBatchSizesError": "fit",
    "find_run_dirs": "load", "load_runs": "load", "read_sweep_targets": "load",
    "RunWarning": "load", "noise_scale_cloud": "noise", "Analysis": "pipeline",
    "analyze": "pipeline", "fit_power_law": "powerlaw", "fit_power_laws": "powerlaw",
    "power_law_table": "powerlaw", "PowerLawFit": "powerlaw", "write_report": "report",
    "best_steps": "targets", "choose_targets": "targets", "pending_targets": "targets",
    "steps_to_target": "targets", "steps_to_targets": "targets",
    "plot_comparison": "comparison", "load_sweeps": "load", "noise_at_targets": "noise",
    "lack_of_fit_table": "lackoffit", "EMinLaw": "eminlaw", "fit_e_min_laws": "eminlaw",
    "analyze_branches": "branches", "BranchAnalysis": "branches", "branch_table": "branchruns",
}
_SUBMODULES = ("branches", "branchruns", "comparison", "eminlaw", "figures", "fit", "lackoffit",
               "load", "noise", "pipeline", "powerlaw", "report", "synthetic", "targets")

__all__ = sorted([*_EXPORTS, "synthetic"])

if TYPE_CHECKING:
  from bscan.analysis import synthetic  # noqa: F401
  from bscan.analysis.fit import fit_critical_batch  # noqa: F401
  from bscan.analysis.pipeline import Analysis, analyze  # noqa: F401


def __getattr__(name: str) -> Any:
  """Imports the submodule that defines `name` on first use (PEP 562)."""
  if name in _SUBMODULES:
    return importlib.import_module(f"{__name__}.{name}")
  if name in _EXPORTS:
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted([*globals(), *_EXPORTS, *_SUBMODULES])
