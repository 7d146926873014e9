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

(size, target) pairs that an unfinished run may still reach are not fitted: summary.json lists
them under "pending" with the runs they wait for, and the CLI prints them.
"""

from __future__ import annotations

import json
import math

import numpy as np
from etils import epath

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
  # Imported here: matplotlib takes seconds to load, and the text tables above need none of it.
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  from bscan.analysis import figures  # pylint: disable=g-import-not-at-top
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


def _g(x: float) -> str:
  return f"{x:.3g}" if np.isfinite(x) else ("inf" if x > 0 else "nan")


def name_list(runs: list[str], most: int = 4) -> str:
  """Run names, the first `most` of them and how many more."""
  return ", ".join(runs[:most]) + (f" and {len(runs) - most} more" if len(runs) > most else "")


def pending_lines(analysis: pipeline.Analysis) -> list[str]:
  """One line per model size with pending targets: which targets, and the runs they wait for."""
  status = dict(zip(analysis.runs["name"], analysis.runs["status"]))
  lines = []
  for (size, _), group in analysis.pending.groupby(["size", "n_params"], sort=False):
    runs = sorted({r for rs in group["runs"] for r in rs})
    targets = ", ".join(str(t) for t in group["target"])
    lines.append(f"pending: size {size}, targets {targets}: waiting for {len(runs)} unfinished "
                 f"run(s): {name_list([f'{r} ({status.get(r)})' for r in runs])}")
  return lines


def b_crit_table(analysis: pipeline.Analysis) -> str:
  """Every (model size, target): B_crit (tokens) with its interval, S_min, E_min, or why not."""
  level = f"{analysis.confidence:.0%}"
  head = ("size", "target", "B_crit", f"{level} interval", "S_min", "E_min", "batch sizes")
  rows = [head]
  fits = {(r.size, r.target): r for r in analysis.critical.itertuples()}
  waits = {(r.size, r.target): r.runs for r in analysis.pending.itertuples()}
  reach = analysis.best_steps.groupby(["size", "target"])["batch_tokens"].nunique().to_dict()
  sizes = analysis.runs.drop_duplicates("size").sort_values("n_params")["size"]
  for size in sizes:
    for target in analysis.targets:
      fit = fits.get((size, target))
      if fit is not None:
        rows.append((str(size), str(target), _g(fit.b_crit),
                     f"[{_g(fit.b_crit_lo)}, {_g(fit.b_crit_hi)}]", _g(fit.s_min), _g(fit.e_min),
                     str(int(fit.n_batch_sizes))))
      elif (size, target) in waits:
        rows.append((str(size), str(target), f"pending on {name_list(waits[size, target], 2)}"))
      else:
        n = reach.get((size, target), 0)
        rows.append((str(size), str(target), f"not fitted: {n} batch size(s) reach it, need 3"))
  full = [r for r in rows if len(r) == len(head)]
  widths = [max(len(r[i]) for r in full) for i in range(len(head))]
  text = [f"B_crit per model size and target ({level} intervals; B_crit and E_min in tokens, "
          "S_min in steps):"]
  for r in rows:  # a shorter row is a note after the size and target
    cells = [c.ljust(w) for c, w in zip(r, widths)] if len(r) == len(head) else [
        r[0].ljust(widths[0]), r[1].ljust(widths[1]), r[2]]
    text.append("  ".join(cells).rstrip())
  return "\n".join(text)
