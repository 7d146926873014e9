"""The batch-ramp figure: loss curves, steps against tokens to the target, and the batches."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from bscan.analysis import ramp as ramp_lib
from bscan.analysis import targets as targets_lib
from bscan.workdir import Col

RAMP_COLORS = ("#d62728", "#000000", "#ff7f0e", "#9467bd", "#8c564b")


def _colors(modes: list[str]) -> dict[str, object]:
  """Fixed batches along viridis (small to large), ramps in strong distinct colours."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  fixed = [m for m in modes if m.startswith(ramp_lib.FIXED + " ")]
  cmap = matplotlib.colormaps["viridis"]
  out = {m: cmap(i / max(len(fixed) - 1, 1) * 0.9) for i, m in enumerate(fixed)}
  ramps = [m for m in modes if m not in out]
  out.update({m: RAMP_COLORS[i % len(RAMP_COLORS)] for i, m in enumerate(ramps)})
  return out


def plot_ramp(runs: pd.DataFrame, rows: pd.DataFrame, target: float) -> Figure:
  """Three panels: smoothed train loss against steps (seed 0 of each mode); steps against
  tokens to `target` (every run, and each mode's geometric mean with its interval); the
  batch each ramp ran at against tokens."""
  modes = sorted(rows["mode"].unique(), key=ramp_lib.mode_order)
  colors = _colors(modes)
  fig = Figure(figsize=(15, 4.6), layout="constrained")
  ax_loss, ax_se, ax_batch = fig.subplots(1, 3)
  first_seed = runs["seed"].min()
  for _, run in runs.iterrows():
    mode = ramp_lib.mode_of(run)
    if run["seed"] != first_seed:
      continue
    step, loss = targets_lib.finite_prefix(run[Col.STEP], run[Col.TRAIN_LOSS])
    if len(step) < 3:
      continue
    ax_loss.plot(step, targets_lib.smooth_log_window(step, loss), color=colors[mode],
                 lw=2.0 if not mode.startswith(ramp_lib.FIXED) else 1.2, label=mode)
  ax_loss.axhline(target, color="0.5", ls=":", lw=1)
  ax_loss.set_xlim(left=10)
  ax_loss.set(xscale="log", xlabel="optimizer steps", ylabel="train loss (nats/byte, smoothed)",
              title=f"seed {first_seed}: loss against steps")
  lo = rows.loc[rows["target"] == target]
  ax_loss.set_ylim(target - 0.25, target + 1.0)
  ax_loss.legend(fontsize=7, frameon=False)

  means = ramp_lib.summary(lo).set_index("mode")
  for mode in modes:
    runs_of = lo[lo["mode"] == mode]
    ax_se.scatter(runs_of["total_tokens"], runs_of["steps"], s=10, color=colors[mode], alpha=0.4)
    m = means.loc[mode]
    xerr = np.abs(np.array([[m["tokens_lo"]], [m["tokens_hi"]]]) - m["tokens"])
    yerr = np.abs(np.array([[m["steps_lo"]], [m["steps_hi"]]]) - m["steps"])
    fixed = mode.startswith(ramp_lib.FIXED)
    ax_se.errorbar(m["tokens"], m["steps"], xerr=np.nan_to_num(xerr), yerr=np.nan_to_num(yerr),
                   fmt="o" if fixed else "D", ms=5 if fixed else 7, color=colors[mode],
                   capsize=2, label=mode)
  fit = ramp_lib.frontier(rows, target)
  if fit is not None:  # the fixed batches' S–E hyperbola: what any one batch can do
    e = np.geomspace(max(fit.e_min * 1.05, lo["total_tokens"].min() * 0.8),
                     lo["total_tokens"].max() * 1.2, 100)
    ax_se.plot(e, [ramp_lib.frontier_steps(fit, x) for x in e], color="0.6", lw=1, zorder=0,
               label=f"fixed-batch fit (B_crit {fit.b_crit:,.0f} tokens)")
  ax_se.set(xscale="log", yscale="log", xlabel=f"tokens to loss {target:g} (incl. overhead)",
            ylabel=f"steps to loss {target:g}",
            title="steps against tokens (geometric mean, 95% interval)")
  ax_se.legend(fontsize=7, frameon=False)

  for _, run in runs.iterrows():
    mode = ramp_lib.mode_of(run)
    batch = np.asarray(run[Col.BATCH], float)
    if mode.startswith(ramp_lib.FIXED) or not np.isfinite(batch).any():
      continue
    ok = np.isfinite(batch)
    ax_batch.step(run[Col.TOKENS][ok], batch[ok], where="post", color=colors[mode], lw=1.2,
                  alpha=0.8, label=mode if run["seed"] == first_seed else None)
  ax_batch.set(xscale="log", yscale="log", xlabel="tokens", ylabel="batch (sequences)",
               title="the ramps' batch (every seed)")
  used = np.concatenate([np.asarray(r, float) for r in runs[Col.BATCH]])
  used = used[np.isfinite(used)]
  if len(used):  # powers of two over the batches run
    ticks = [2**k for k in range(int(np.log2(used.min())), int(np.log2(used.max())) + 1)]
    ax_batch.set_yticks(ticks, [str(t) for t in ticks])
  ax_batch.minorticks_off()
  if ax_batch.get_legend_handles_labels()[0]:
    ax_batch.legend(fontsize=7, frameon=False)
  return fig
