"""Writes an analysis to a directory: both figures (PNG, PDF), critical_batch.csv, summary.json."""

from __future__ import annotations

import json
import math

from etils import epath
from matplotlib import pyplot as plt

from bscan.analysis import figures
from bscan.analysis import pipeline

BATCH_SCAN = "batch_size_scan"
CRITICAL_BATCH = "critical_batch_vs_loss"


def _json_safe(value):
  """NaN/inf are not JSON: write them as null."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, dict):
    return {k: _json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_safe(v) for v in value]
  return value


def write_report(analysis: pipeline.Analysis, out_dir: epath.PathLike,
                 kaplan: bool = False) -> list[epath.Path]:
  """Writes figures, critical_batch.csv and summary.json into `out_dir`; returns the paths."""
  out = epath.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  written = []
  for name, draw in ((BATCH_SCAN, lambda: figures.plot_batch_scan(analysis)),
                     (CRITICAL_BATCH, lambda: figures.plot_critical_batch(analysis, kaplan))):
    fig = draw()
    written += figures.save_figure(fig, out / name)
    plt.close(fig)
  csv = out / "critical_batch.csv"
  csv.write_text(analysis.critical.to_csv(index=False, float_format="%.6g"))
  summary = out / "summary.json"
  summary.write_text(json.dumps(_json_safe(analysis.summary()), indent=2) + "\n")
  return written + [csv, summary]
