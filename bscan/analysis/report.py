"""Writes an analysis to a directory: both figures (PNG, PDF), critical_batch.csv, summary.json.

All batch sizes are in tokens (sequences x seq_len), steps in optimizer steps, losses in nats per
token of the sweep's tokenizer; summary.json records the same ("batch_unit", "loss_unit") along
with the targets, the smoothing window, min_step and the power-law fits.

critical_batch.csv columns: one row per (model size, target loss) S/E fit, S(B) = S_min + E_min/B
(bscan.analysis.fit); intervals are two-sided at summary.json's "confidence".
  size: model size name.
  n_params: non-embedding parameters.
  target: target loss L (nats/token).
  n_batch_sizes: distinct batch sizes that reach L (>= 3).
  n_points: points in the fit (one best run per batch size).
  s_min: S_min, steps to reach L at infinite batch size.
  s_min_lo: lower end of its interval; s_min_hi: upper end.
  e_min: E_min, tokens to reach L at vanishing batch size.
  e_min_lo: lower end of its interval (tokens); e_min_hi: upper end.
  b_crit: B_crit = E_min/S_min, critical batch size in tokens; inf when S_min <= 0 < E_min.
  b_crit_lo: lower end of its Fieller interval (tokens); b_crit_hi: upper end, inf when S_min
    is not significantly positive; both empty (NaN) when the interval has no positive part.
  log_b_crit_se: delta-method standard error of ln B_crit (weights the power-law fit).
  sigma_log_steps: residual s.d. of ln S about the fit (relative scatter of steps).
  b_crit_flag: empty; "unbounded" (b_crit_hi is inf); or "no_positive_b_crit" (S_min
    significantly negative: no positive B_crit fits, b_crit_lo/hi are NaN).
  batch_sizes: the batch sizes (tokens) in the fit, space-separated.
"""

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
