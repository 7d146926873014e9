"""The two figures: batch-size scan (Kaplan Fig. 18) and B_crit vs loss (Kaplan Fig. 10).

Batches in tokens, losses in nats/token. Functions return matplotlib Figures; save_figure writes
PNG and PDF. Nothing here selects a backend: the CLI uses Agg, notebooks their inline backend.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from etils import epath
from matplotlib import cm, colors, ticker
from matplotlib import pyplot as plt
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure

from bscan.analysis import pipeline
from bscan.analysis import powerlaw
from bscan.analysis import targets as targets_lib
from bscan.analysis.load import EVAL_STEP
from bscan.workdir import Col

CMAP = "viridis"
STYLE = {"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8,
         "xtick.labelsize": 8, "ytick.labelsize": 8, "axes.spines.top": False,
         "axes.spines.right": False}


def fmt_count(n: float) -> str:
  """Parameter counts: 3200000 -> '3.2M'."""
  for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
    if n >= div:
      return f"{n / div:.3g}{unit}"
  return f"{n:g}"


def fmt_tokens(b: float) -> str:
  """Batch sizes in tokens: powers of two in binary k (65536 -> '64k'), else decimal."""
  b = float(b)
  if b >= 1024 and float(b).is_integer() and int(b) & (int(b) - 1) == 0:
    return f"{int(b) // 1024}k" if b < 2**20 else f"{int(b) // 2**20}M"
  return fmt_count(b)


def mathtext_form(fit: powerlaw.PowerLawFit) -> str:
  """'3.2×10^5 tokens · L^-4.00' in matplotlib mathtext."""
  mantissa, exp10 = f"{fit.b_star:.1e}".split("e")
  return rf"${mantissa}{{\times}}10^{{{int(exp10)}}}$ tokens · $L^{{{-fit.exponent:.2f}}}$"


def size_label(analysis: pipeline.Analysis, size: str) -> str:
  """'3m (N = 3.2M)': ladder name and non-embedding parameters."""
  n = analysis.runs.loc[analysis.runs["size"] == size, "n_params"].iloc[0]
  return f"{size} (N = {fmt_count(n)})" if np.isfinite(n) else str(size)


def _sizes(analysis: pipeline.Analysis) -> list[str]:
  return list(dict.fromkeys(analysis.runs.sort_values("n_params")["size"]))


def nice_loss_ticks(lo: float, hi: float) -> np.ndarray:
  """4-8 round tick values in [lo, hi] for a log-scaled loss axis."""
  for step in (0.02, 0.05, 0.1, 0.2, 0.25, 0.5, 1.0, 2.0):
    ticks = np.arange(np.ceil(lo / step) * step, hi + 1e-9, step)
    if len(ticks) <= 8:
      return np.round(ticks, 3)
  return np.array([lo, hi])


def _representative_runs(analysis: pipeline.Analysis, size: str) -> pd.DataFrame:
  """One run per batch size: the (lr, seed) most often best over targets, else lowest loss."""
  runs = analysis.runs
  runs = runs[(runs["size"] == size) & (runs[Col.STEP].map(len) > 1)]
  best = analysis.best_steps[analysis.best_steps["size"] == size]
  picked = []
  for batch, group in runs.groupby("batch_tokens"):
    wins = best.loc[best["batch_tokens"] == batch, "run"].value_counts()
    if len(wins):
      picked.append(wins.index[0])
    else:
      picked.append(group["final_train_loss"].fillna(np.inf).idxmin())
  return analysis.runs.loc[picked]


def _colour_values(run: pd.Series, window: float) -> tuple[np.ndarray, np.ndarray, bool]:
  """(steps, loss used for colour, is_eval): eval loss interpolated in log step, else train."""
  step, train = targets_lib.finite_prefix(run[Col.STEP], run[Col.TRAIN_LOSS])
  ev_s, ev_l = targets_lib.finite_prefix(run[EVAL_STEP], run[Col.EVAL_LOSS])
  if len(ev_s) >= 2:
    return step, np.interp(np.log(step), np.log(ev_s), ev_l), True
  return step, targets_lib.smooth_log_window(step, train, window), False


def plot_batch_scan(analysis: pipeline.Analysis, sizes: Sequence[str] | None = None,
                    n_hyperbolas: int | None = None, ncols: int = 3) -> Figure:
  """Kaplan Fig. 18: tokens processed vs step per batch size, coloured by loss, S/E hyperbolas."""
  sizes = list(sizes or _sizes(analysis))
  targets = analysis.targets
  if n_hyperbolas and len(targets) > n_hyperbolas:
    targets = [targets[int(round(i))] for i in np.linspace(0, len(targets) - 1, n_hyperbolas)]
  span = max(targets) - min(targets) if len(targets) > 1 else 0.5
  decimals = max(len(f"{t:g}".partition(".")[2]) for t in targets)
  norm = colors.Normalize(min(targets) - 0.25 * span, max(targets) + 0.75 * span)
  cmap = plt.get_cmap(CMAP)
  ncols = min(ncols, len(sizes))
  nrows = int(np.ceil(len(sizes) / ncols))
  with plt.rc_context(STYLE):
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.3 * ncols + 1.0, 3.9 * nrows),
                             squeeze=False, constrained_layout=True)
    any_eval = any_flagged = False
    for ax, size in zip(axes.flat, sizes):
      reps = _representative_runs(analysis, size)
      lines = []  # (last step, batch tokens, last tokens) per drawn run
      for _, run in reps.iterrows():
        step, colour_loss, is_eval = _colour_values(run, analysis.window)
        any_eval |= is_eval
        tokens = step * run["batch_tokens"]
        pts = np.stack([step, tokens], axis=1)
        segs = np.stack([pts[:-1], pts[1:]], axis=1)
        lc = LineCollection(segs, cmap=cmap, norm=norm, linewidths=2.0, capstyle="round")
        lc.set_array(0.5 * (colour_loss[:-1] + colour_loss[1:]))
        ax.add_collection(lc)
        lines.append((float(step[-1]), float(run["batch_tokens"]), float(tokens[-1])))
      crit = analysis.critical[analysis.critical["size"] == size]
      best = analysis.best_steps[analysis.best_steps["size"] == size]
      batches = reps["batch_tokens"].to_numpy(float)
      ax.set_xscale("log")
      ax.set_yscale("log")
      # Start where the targets begin to be reached (earlier steps are warmup, all one
      # colour), at the same decade in every panel so panels compare at a glance.
      all_best = analysis.best_steps["steps"]
      first = all_best.min() if len(all_best) else 10.0
      x_lo = max(1.0, 10 ** np.floor(np.log10(first / 2)))
      x_hi = max(l[0] for l in lines) * 1.5 if lines else 10 * x_lo
      y_lo = x_lo * batches.min() / 1.5
      y_hi = max(l[2] for l in lines) * 1.5 if lines else 10 * y_lo
      ax.set_xlim(x_lo, x_hi)
      ax.set_ylim(y_lo, y_hi)
      for _, batch, _ in lines:  # batch labels along the left edge, where lines are evenly spaced
        ax.annotate(fmt_tokens(batch), (x_lo, x_lo * batch), xytext=(2, 4),
                    textcoords="offset points", fontsize=7, color="0.2", ha="left",
                    va="bottom", annotation_clip=True)
      for target in targets:
        row = crit[np.isclose(crit["target"], target)]
        hit = best[np.isclose(best["target"], target)]
        bad = bool(flagged(row).any())  # flagged, not fitted through: hollow points, dotted
        any_flagged |= bad
        if len(hit):
          ax.scatter(hit["steps"], hit["tokens"], s=22, zorder=4,
                     color="white" if bad else cmap(norm(target)),
                     edgecolor=cmap(norm(target)) if bad else "black",
                     linewidth=1.2 if bad else 0.6)
        if row.empty:
          continue
        s_min, e_min = float(row["s_min"].iloc[0]), float(row["e_min"].iloc[0])
        b = np.geomspace(batches.min() / 3, batches.max() * 3, 300)
        s_fit, e_fit = s_min + e_min / b, s_min * b + e_min
        inside = (s_fit > x_lo) & (s_fit < x_hi / 1.3) & (e_fit > y_lo) & (e_fit < y_hi)
        ax.plot(s_fit[inside], e_fit[inside], color="0.55" if bad else "black", lw=1.0,
                ls=":" if bad else "--", zorder=3)
        if inside.any():  # label the low-batch end (largest S still inside the axes)
          k = np.nonzero(inside)[0][0]
          ax.annotate(f"L={target:.{decimals}f}", (s_fit[k], e_fit[k]), xytext=(2, -2),
                      textcoords="offset points", fontsize=7, ha="left", va="top")
      ax.set_xlabel("step")
      ax.set_ylabel("tokens processed")
      ax.set_title(size_label(analysis, size))
      ax.grid(True, which="major", alpha=0.25)
    for ax in axes.flat[len(sizes):]:
      ax.set_visible(False)
    handles = [plt.Line2D([], [], color="black", ls="--", lw=1.0, label="fit S = S_min + E_min/B"),
               plt.Line2D([], [], marker="o", ls="", mfc="0.6", mec="black",
                          label=f"run first reaches L ({analysis.loss} loss)"),
               plt.Line2D([], [], ls="", label="line labels: batch size (tokens)")]
    if any_flagged:
      handles.insert(2, plt.Line2D([], [], marker="o", ls=":", color="0.55", mfc="white",
                                   label=HOLLOW_LABEL))
    axes.flat[0].legend(handles=handles, loc="lower right", frameon=False)
    cbar = fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=axes, extend="max",
                        shrink=0.9, pad=0.01)
    cbar.set_label("eval loss (nats/token)" if any_eval else "train loss, smoothed (nats/token)")
    fig.suptitle("Batch size scan: steps and tokens to reach target loss", fontsize=11)
  return fig


HOLLOW_LABEL = "hollow: S(B) is no hyperbola here (lack of fit),\n  flagged, left out of the fits"


def flagged(rows: pd.DataFrame) -> np.ndarray:
  """Which S/E fits are flagged for lack of fit (none when the column is absent)."""
  if "lack_of_fit" not in rows.columns:
    return np.zeros(len(rows), bool)
  return rows["lack_of_fit"].fillna(False).to_numpy(bool)


def draw_b_crit(ax, rows: pd.DataFrame, x: np.ndarray, color, label: str) -> tuple[bool, bool]:
  """Scan B_crit with its interval at x; flagged targets hollow; (any open above, any flagged).

  An interval unbounded above (no saturation at the largest batch) gets an arrowhead above.
  """
  y = rows["b_crit"].to_numpy(float)
  lo = np.clip(rows["b_crit_lo"].to_numpy(float), 1e-300, None)
  hi = rows["b_crit_hi"].to_numpy(float)
  yerr = np.array([y - np.minimum(lo, y), np.where(np.isfinite(hi), hi - y, 0)])
  yerr = np.where(np.isfinite(yerr), yerr, 0)
  bad = flagged(rows)
  for pick, face, text in ((~bad, color, label), (bad, "white", None)):
    if pick.any():
      ax.errorbar(x[pick], y[pick], yerr=yerr[:, pick], fmt="o", ms=5, color=color, mfc=face,
                  mec="black" if face is color else color, mew=0.5 if face is color else 1.2,
                  capsize=2.5, lw=1.2, zorder=4, label=text)
  open_up = ~np.isfinite(hi)
  if open_up.any():
    ax.scatter(x[open_up], y[open_up] * 1.6, marker="^", color=color, zorder=4)
  return bool(open_up.any()), bool(bad.any())


def plot_critical_batch(analysis: pipeline.Analysis, kaplan: bool = False,
                        show_cloud: bool = True) -> Figure:
  """Kaplan Fig. 10: B_crit vs loss (log-log, loss decreasing to the right), power law, cloud."""
  sizes = _sizes(analysis)
  palette = plt.get_cmap("tab10")
  crit = analysis.critical
  finite = crit[np.isfinite(crit["b_crit"])]
  targets = np.asarray(analysis.targets, float)
  span = np.log(targets.max() / targets.min()) if len(targets) > 1 else 0.2
  x_lo, x_hi = targets.min() * np.exp(-0.15 * span), targets.max() * np.exp(0.15 * span)
  with plt.rc_context(STYLE):
    fig, ax = plt.subplots(figsize=(9.6, 4.8), constrained_layout=True)
    y_vals = [finite["b_crit_lo"].to_numpy(), finite["b_crit"].to_numpy()]
    if show_cloud and len(analysis.cloud):
      cloud = analysis.cloud[(analysis.cloud[Col.TRAIN_LOSS] > x_lo)
                             & (analysis.cloud[Col.TRAIN_LOSS] < x_hi)]
      for k, size in enumerate(sizes):
        c = cloud[cloud["size"] == size]
        for col, marker in ((Col.B_SIMPLE_TOKENS, "."), (Col.B_NOISE_TOKENS, "x")):
          ok = c[np.isfinite(c[col])]
          if len(ok):
            ax.scatter(ok[Col.TRAIN_LOSS], ok[col], s=6, marker=marker, color=palette(k),
                       alpha=0.18, linewidths=0.5, zorder=1, rasterized=True)
            y_vals.append(np.quantile(ok[col], [0.02, 0.98]))
    any_open = any_flagged = False
    for k, size in enumerate(sizes):
      rows = finite[finite["size"] == size]
      if rows.empty:
        continue
      x = rows["target"].to_numpy() * (1 + 0.006 * (k - (len(sizes) - 1) / 2))  # dodge
      hi = rows["b_crit_hi"].to_numpy()
      y_vals.append(hi[np.isfinite(hi)])
      is_open, is_flagged = draw_b_crit(ax, rows, x, palette(k),
                                        f"B_crit, {size_label(analysis, size)}")
      any_open, any_flagged = any_open or is_open, any_flagged or is_flagged
    fit = analysis.power_laws.get(powerlaw.POOLED)
    grid = np.geomspace(x_lo, x_hi, 100)
    if fit is not None:
      lo_band, hi_band = fit.predict_interval(grid)
      ax.fill_between(grid, lo_band, hi_band, color="black", alpha=0.08, lw=0, zorder=2)
      pct = int(round(100 * analysis.confidence))
      ax.plot(grid, fit.predict(grid), color="black", lw=1.6, zorder=3,
              label=f"fit: B_crit = {mathtext_form(fit)}\n"
                    f"  α_B = {fit.alpha_b:.3f} [{fit.alpha_b_ci[0]:.3f}, {fit.alpha_b_ci[1]:.3f}]"
                    f" ({pct}% CI)")
    if any_open:
      ax.scatter([], [], marker="^", color="0.4",
                 label="interval open above: the largest batch\n  shows no saturation")
    if any_flagged:
      ax.scatter([], [], marker="o", facecolor="white", edgecolor="0.3", label=HOLLOW_LABEL)
    if show_cloud and len(analysis.cloud):
      ax.scatter([], [], s=12, marker=".", color="0.4",
                 label="noise scale B_simple during training\n  (colour = model size)")
    ys = np.concatenate([np.ravel(v).astype(float) for v in y_vals] + [np.zeros(0)])
    ys = ys[np.isfinite(ys) & (ys > 0)]
    ax.set_yscale("log")
    ax.set_ylim(ys.min() / 1.6 if len(ys) else 1e3, ys.max() * 1.6 if len(ys) else 1e6)
    if kaplan:  # drawn last so it cannot stretch the axes
      ylim = ax.get_ylim()
      ref = powerlaw.KAPLAN["b_star"] * grid ** -powerlaw.KAPLAN["exponent"]
      where = ("" if ((ref > ylim[0]) & (ref < ylim[1])).any()
               else " (above this range)" if ref.min() >= ylim[1] else " (below this range)")
      ax.plot(grid, ref, color="0.5", ls=":", lw=1.5, zorder=2,
              label="Kaplan et al. 2020: $2.1{\\times}10^{8}$ tokens · $L^{-4.8}$" + where +
                    "\n  (nats per GPT-2 token: other units, reference only)")
      ax.set_ylim(ylim)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(x_hi, x_lo)  # inverted: loss decreases to the right, as in Kaplan Fig. 10
    ticks = nice_loss_ticks(x_lo, x_hi)
    ax.xaxis.set_major_locator(ticker.FixedLocator(ticks))
    ax.xaxis.set_major_formatter(ticker.FixedFormatter([f"{t:g}" for t in ticks]))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: fmt_count(v)))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlabel(f"{analysis.loss} loss (nats/token)")
    ax.set_ylabel("critical batch size (tokens)")
    ax.set_title("Critical batch size vs performance")
    ax.grid(True, which="major", alpha=0.25)
    if finite.empty:
      ax.text(0.5, 0.5, "no target reached by >= 3 batch sizes", transform=ax.transAxes,
              ha="center", va="center", color="0.4")
    if ax.get_legend_handles_labels()[0]:
      ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, borderaxespad=0)
  return fig


def save_figure(fig: Figure, stem: epath.PathLike, dpi: int = 200) -> list[epath.Path]:
  """Writes STEM.png and STEM.pdf (local or gs://) and returns their paths."""
  stem = epath.Path(stem)
  stem.parent.mkdir(parents=True, exist_ok=True)
  paths = []
  for ext in ("png", "pdf"):
    path = stem.parent / f"{stem.name}.{ext}"
    with path.open("wb") as f:
      fig.savefig(f, format=ext, dpi=dpi)  # constrained layout already fits labels and legend
    paths.append(path)
  return paths
