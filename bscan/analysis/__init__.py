"""Critical batch size from batch-size scans: load workdirs, fit S/E and B_crit(L), draw figures.

Reads run workdirs (local or gs://) only; imports no JAX, so it is quick to import in Colab.
Batches are in tokens and losses in nats/token throughout.

  analysis = bscan.analysis.analyze("gs://bucket/sweep")
  bscan.analysis.plot_critical_batch(analysis)
  bscan.analysis.fit_critical_batch(batch_sizes, steps).b_crit
"""

from bscan.analysis import synthetic
from bscan.analysis.figures import plot_batch_scan
from bscan.analysis.figures import plot_critical_batch
from bscan.analysis.figures import save_figure
from bscan.analysis.fit import CriticalBatchFit
from bscan.analysis.fit import fit_critical_batch
from bscan.analysis.fit import fit_targets
from bscan.analysis.fit import FitWarning
from bscan.analysis.fit import TooFewBatchSizesError
from bscan.analysis.load import find_run_dirs
from bscan.analysis.load import load_runs
from bscan.analysis.load import read_sweep_targets
from bscan.analysis.load import RunWarning
from bscan.analysis.noise import noise_scale_cloud
from bscan.analysis.pipeline import Analysis
from bscan.analysis.pipeline import analyze
from bscan.analysis.powerlaw import fit_power_law
from bscan.analysis.powerlaw import fit_power_laws
from bscan.analysis.powerlaw import power_law_table
from bscan.analysis.powerlaw import PowerLawFit
from bscan.analysis.report import write_report
from bscan.analysis.targets import best_steps
from bscan.analysis.targets import choose_targets
from bscan.analysis.targets import steps_to_target
from bscan.analysis.targets import steps_to_targets

__all__ = [
    "Analysis", "CriticalBatchFit", "FitWarning", "PowerLawFit", "RunWarning",
    "TooFewBatchSizesError", "analyze", "best_steps", "choose_targets", "find_run_dirs",
    "fit_critical_batch", "fit_power_law", "fit_power_laws", "fit_targets", "load_runs",
    "noise_scale_cloud", "plot_batch_scan", "plot_critical_batch", "power_law_table",
    "read_sweep_targets", "save_figure", "steps_to_target", "steps_to_targets", "synthetic",
    "write_report",
]
