"""Every estimate of the critical batch size on one figure, a row of two panels per model size.

Left (Kaplan Fig. 10's axes: loss, decreasing to the right, against tokens): the scan's B_crit(L)
with its intervals; the branched local CBS at each checkpoint's loss with its interval (an open
arrow up where only a lower bound is known); B_simple(L) and B_noise(L) averaged over the runs
(geometric mean, min-max over runs shaded). Right: B_crit against E_min with the fitted power
law and its band. Flagged targets (lack of fit) are hollow everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib import pyplot as plt
from matplotlib import ticker
from matplotlib.figure import Figure

from bscan.analysis import figures
from bscan.analysis import noise
from bscan.analysis import pipeline

SCAN, BRANCH, SIMPLE, NOISE = "tab:blue", "tab:red", "tab:green", "tab:purple"
GRID_POINTS = 24  # losses at which the noise-scale curves are drawn
MIN_RUN_SHARE = 0.5  # a noise-scale curve is drawn where at least this share of runs reach L


def comparison_sizes(analysis: pipeline.Analysis) -> list[str]:
  """Sizes with branch or B_noise data; else the size with the most scan fits; else none."""
  sizes = list(dict.fromkeys(analysis.runs.sort_values("n_params")["size"]))
  with_branches = set() if analysis.branches is None else set(analysis.branches.cbs["size"])
  at = analysis.noise_at_targets
  with_noise = set(at.loc[at["b_noise_n_runs"] > 0, "size"])
  picked = [s for s in sizes if s in with_branches | with_noise]
  fits = analysis.critical["size"].value_counts()
  # Else the size with the most fitted targets (the larger one on a tie): the longest curve.
  fitted = sorted((s for s in sizes if s in fits), key=lambda s: (fits[s], sizes.index(s)))
  return picked or fitted[-1:]


def _branch_rows(analysis: pipeline.Analysis, size: str) -> pd.DataFrame:
  if analysis.branches is None:
    return pd.DataFrame(columns=["ref_loss", "cbs", "cbs_lo", "cbs_hi"])
  cbs = analysis.branches.cbs
  return cbs[(cbs["size"] == size) & np.isfinite(cbs["ref_loss"].astype(float))]


def _loss_range(analysis: pipeline.Analysis, size: str) -> tuple[float, float]:
  """(low, high) loss of the left panel: the size's fitted targets and its checkpoints'
  losses (all targets when it has neither), padded."""
  fitted = analysis.critical.loc[analysis.critical["size"] == size, "target"].to_numpy(float)
  losses = np.concatenate([fitted, _branch_rows(analysis, size)["ref_loss"].to_numpy(float)])
  if not len(losses):
    losses = np.asarray(analysis.targets, float)
  lo, hi = losses.min(), losses.max()
  span = np.log(hi / lo) if hi > lo else 0.2
  return lo * np.exp(-0.12 * span), hi * np.exp(0.12 * span)


def _draw_noise(ax, analysis: pipeline.Analysis, size: str, lo: float, hi: float) -> list:
  """B_simple(L) and B_noise(L) over runs of the size: geometric mean, min-max shaded."""
  runs = analysis.runs[analysis.runs["size"] == size]
  grid = np.geomspace(lo, hi, GRID_POINTS)
  table = noise.run_average(noise.noise_at_losses(runs, grid, analysis.window,
                                                  analysis.min_step))
  drawn = []
  for name, colour, label in (
      ("b_simple", SIMPLE, "B_simple = tr Σ / |G|²"),
      ("b_noise", NOISE, "B_noise = tr(HΣ) / GᵀHG")):
    # Only losses that most runs reach: where one run is left, its value is no average.
    enough = max(2, math.ceil(MIN_RUN_SHARE * len(runs)))
    ok = table[np.isfinite(table[name]) & (table[f"{name}_n_runs"] >= min(enough, len(runs)))]
    if ok.empty:
      continue
    x = ok["target"].to_numpy(float)
    ax.fill_between(x, ok[f"{name}_lo"], ok[f"{name}_hi"], color=colour, alpha=0.15, lw=0,
                    zorder=1)
    ax.plot(x, ok[name], color=colour, lw=1.6, zorder=2,
            label=f"{label}: mean over {int(ok[f'{name}_n_runs'].max())} runs, min–max shaded")
    drawn.append(ok[[f"{name}_lo", f"{name}_hi"]].to_numpy(float).ravel())
  return drawn


def _draw_branches(ax, analysis: pipeline.Analysis, size: str) -> list:
  """The branched local CBS per checkpoint: interval bars; an open arrow up for lower bounds."""
  rows = _branch_rows(analysis, size)
  if rows.empty:
    return []
  x = rows["ref_loss"].to_numpy(float)
  y, lo, hi = (rows[c].to_numpy(float) for c in ("cbs", "cbs_lo", "cbs_hi"))
  bounded = np.isfinite(lo) & np.isfinite(hi)
  pct = int(round(100 * (1 - analysis.branch_alpha)))
  label = f"branched local CBS (ε = {analysis.epsilon:g} nats), {pct}% interval"
  if bounded.any():
    ax.errorbar(x[bounded], y[bounded], yerr=[y[bounded] - lo[bounded], hi[bounded] - y[bounded]],
                fmt="s", ms=5, color=BRANCH, mec="black", mew=0.5, capsize=3, lw=1.4, zorder=5,
                label=label)
  single = ~np.isfinite(lo) & ~np.isfinite(hi)  # one replicate: a point, no interval
  if single.any():
    ax.scatter(x[single], y[single], marker="s", s=25, color=BRANCH, zorder=5,
               label=None if bounded.any() else label)
  lower = np.isfinite(lo) & np.isposinf(hi)
  for xi, li in zip(x[lower], lo[lower]):  # only a lower bound: every k tested stayed within ε
    ax.annotate("", xy=(xi, li * 3.0), xytext=(xi, li), zorder=5,
                arrowprops={"arrowstyle": "->", "color": BRANCH, "lw": 1.6})
  if lower.any():
    ax.scatter(x[lower], lo[lower], marker="s", s=25, facecolor="white", edgecolor=BRANCH,
               zorder=5, label="branched CBS, lower bound only:\n  every k tested within ε")
  return [lo[np.isfinite(lo)], hi[np.isfinite(hi)], y[np.isfinite(y)], lo[lower] * 3.0]


def _loss_panel(ax, analysis: pipeline.Analysis, size: str) -> None:
  """Left panel: every estimate against the loss."""
  lo, hi = _loss_range(analysis, size)
  crit = analysis.critical
  rows = crit[(crit["size"] == size) & np.isfinite(crit["b_crit"])]
  pct = int(round(100 * analysis.confidence))
  ys = [rows["b_crit"].to_numpy(float), rows["b_crit_lo"].to_numpy(float),
        rows["b_crit_hi"].to_numpy(float)]
  if len(rows):
    is_open, is_flagged = figures.draw_b_crit(ax, rows, rows["target"].to_numpy(float), SCAN,
                                              f"scan B_crit = E_min/S_min, {pct}% interval")
    if is_flagged:
      ax.scatter([], [], marker="o", facecolor="white", edgecolor=SCAN,
                 label=figures.HOLLOW_LABEL)
    if is_open:
      ax.scatter([], [], marker="^", color=SCAN, label="scan interval open above")
  ys += _draw_branches(ax, analysis, size)
  ys += _draw_noise(ax, analysis, size, lo, hi)
  values = np.concatenate([np.ravel(v) for v in ys] + [np.zeros(0)])
  values = values[np.isfinite(values) & (values > 0)]
  ax.set_xscale("log")
  ax.set_yscale("log")
  if len(values):
    ax.set_ylim(values.min() / 1.6, values.max() * 1.6)
  ax.set_xlim(hi, lo)  # loss decreases to the right, as in Kaplan Fig. 10
  ticks = figures.nice_loss_ticks(lo, hi)
  ax.xaxis.set_major_locator(ticker.FixedLocator(ticks))
  ax.xaxis.set_major_formatter(ticker.FixedFormatter([f"{t:g}" for t in ticks]))
  ax.xaxis.set_minor_formatter(ticker.NullFormatter())
  _count_ticks(ax.yaxis)
  scan_loss = "" if analysis.loss == "train" else f" (scan targets: {analysis.loss} loss)"
  ax.set_xlabel(f"train loss (nats/token){scan_loss}")
  ax.set_ylabel("batch size (tokens)")
  ax.set_title(f"{figures.size_label(analysis, size)}: critical batch size vs loss")
  ax.grid(True, which="major", alpha=0.25)
  _legend(ax)


def _count_ticks(axis) -> None:
  """Log ticks at 1, 2, 5 per decade, labelled as counts (20k, 1.5M)."""
  axis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
  axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: figures.fmt_count(v)))
  axis.set_minor_formatter(ticker.NullFormatter())


def _legend(ax) -> None:
  """The legend with the estimates in a fixed order: scan, branches, noise scales."""
  handles, labels = ax.get_legend_handles_labels()
  if not handles:
    return
  order = ("scan", "hollow", "fit", "branched", "B_simple", "B_noise")
  rank = [next((i for i, o in enumerate(order) if label.startswith(o)), len(order))
          for label in labels]
  pairs = sorted(zip(rank, range(len(labels)), handles, labels))
  ax.legend([p[2] for p in pairs], [p[3] for p in pairs], loc="upper left", frameon=False,
            fontsize=7)


def _e_min_panel(ax, analysis: pipeline.Analysis, size: str) -> None:
  """Right panel: B_crit against E_min, the fitted power law and its band."""
  crit = analysis.critical
  rows = crit[(crit["size"] == size) & np.isfinite(crit["b_crit"]) & (crit["e_min"] > 0)]
  if len(rows):
    e = rows["e_min"].to_numpy(float)
    e_lo = np.where(rows["e_min_lo"] > 0, rows["e_min_lo"], e)
    xerr = np.array([e - e_lo, np.maximum(rows["e_min_hi"].to_numpy(float) - e, 0)])
    ax.errorbar(e, rows["b_crit"], xerr=xerr, fmt="none", ecolor=SCAN, lw=0.8, alpha=0.6,
                zorder=3)
    figures.draw_b_crit(ax, rows, e, SCAN, "scan targets (one per loss)")
  law = analysis.e_min_law.get(str(size))
  if law is not None:
    grid = np.geomspace(law.e_min_range[0] / 1.5, law.e_min_range[1] * 1.5, 100)
    band_lo, band_hi = law.predict_interval(grid)
    ax.fill_between(grid, band_lo, band_hi, color="black", alpha=0.08, lw=0, zorder=1)
    pct = int(round(100 * law.confidence))
    ax.plot(grid, law.predict(grid), color="black", lw=1.4, zorder=2,
            label=f"fit: B_crit = {law.c:.2g} · E_min^β\n  β = {law.beta:.2f} "
                  f"[{law.beta_ci[0]:.2f}, {law.beta_ci[1]:.2f}] ({pct}% CI, "
                  f"{law.n_points} targets)")
  else:
    ax.text(0.5, 0.5, "fewer than 2 unflagged targets:\nno power law", transform=ax.transAxes,
            ha="center", va="center", color="0.4")
  ax.set_xscale("log")
  ax.set_yscale("log")
  _count_ticks(ax.xaxis)
  _count_ticks(ax.yaxis)
  ax.set_xlabel("E_min: tokens to reach L at small batch")
  ax.set_ylabel("scan B_crit (tokens)")
  ax.set_title("B_crit against data (E_min)")
  ax.grid(True, which="major", alpha=0.25)
  _legend(ax)


def plot_comparison(analysis: pipeline.Analysis, size: str | Sequence[str] | None = None
                    ) -> Figure:
  """One row per model size (default: comparison_sizes): estimates vs loss, B_crit vs E_min."""
  sizes = [size] if isinstance(size, str) else list(size or comparison_sizes(analysis))
  if not sizes:
    raise ValueError("no model size to draw: the analysis has no scan fit, branch or B_noise")
  with plt.rc_context(figures.STYLE):
    fig, axes = plt.subplots(len(sizes), 2, figsize=(12.5, 4.9 * len(sizes)), squeeze=False,
                             constrained_layout=True, gridspec_kw={"width_ratios": [1.45, 1]})
    for (left, right), name in zip(axes, sizes):
      _loss_panel(left, analysis, name)
      _e_min_panel(right, analysis, name)
    fig.suptitle("Every estimate of the critical batch size", fontsize=11)
  return fig
