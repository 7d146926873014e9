"""Steps to target: the first (interpolated) step at which a smoothed loss curve reaches L.

Smoothing: a centred local linear fit whose window has a constant width in log(step) (+-10% of
the step by default), shrunk symmetrically at the ends of the curve. Why not an EMA over steps:
an EMA lags by ~1/(1-decay) steps, a constant offset that inflates S most for the large-batch
runs whose S is small, i.e. it biases S_min and hence B_crit. A centred window has no lag, and a
window of constant relative width resolves every part of the curve equally, matching the
log(step) interpolation and the log-space S/E fit. Keeping the window centred at the ends (rather
than one-sided) matters because scan runs stop right after reaching the lowest target. The
smoothed curve is then replaced by its best non-increasing fit (isotonic regression), so "first
reaches L" is well defined (curves reach targets only going down). Not a running minimum: the
running minimum of a noisy curve crosses L early by about noise/slope, which shortens S most
for the noisy small-batch runs and biased B_crit low by ~5% in the synthetic scans; isotonic
regression pools flat, noisy stretches instead of following their dips. Runs that never reach
L get NaN (they are excluded, never extrapolated), as do runs that reach it before `min_step`
(warmup and the first logged points say little about S).

Nothing after a crossing may move it. Two guards: (1) isolated outliers (a loss spike, a bad
batch: one or two logged points), which a least-squares line follows into every window they fall
in, are dropped: a pilot curve is the same local line through a running median over 5 logged
points, and points more than 6 robust s.d. (1.4826 MAD of the residuals) from it get weight 0;
the rest are fitted by plain least squares. Without it, one logged value +2 nats after the
crossing moved S ~28% later (loss 4*step^-0.15 logged every 10 steps, target 1.5). Not the
running median itself, nor downweighting (Tukey's bisquare at 4.685 s.d.): per-batch losses are
right-skewed at small batches, so both sit below the mean; on the first real sweep they lowered
small-batch curves by 0.004-0.01 nats and, on flat stretches, moved crossings up to 24% earlier.
Its residuals reach at most 5.2 robust s.d., so the 6 s.d. rule leaves real curves untouched.
(2) The isotonic fit covers only the curve up to the minimum of the smoothed loss: first reaching
L never needs later points, and a run that blew up after reaching L (or just drifted up) would
otherwise pool its end with the crossing, delaying it or hiding it altogether.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import optimize

from bscan import workdir as wd
from bscan.errors import ConfigError
from bscan.analysis.load import EVAL_STEP

DEFAULT_WINDOW = 0.1  # half-width of the smoothing window in log(step)
DEFAULT_MIN_STEP = 10.0  # targets reached earlier are unreliable
MEDIAN_POINTS = 5  # running median over this many logged points: the robust pilot curve
OUTLIER_SIGMAS = 6.0  # a logged loss this many robust s.d. off the pilot curve is dropped
MIN_NOISE = 1e-3  # nats: floor of the robust s.d. (noise-free curves), far below real noise
# Settings of a run that make its loss a different quantity: runs that differ in any of them are
# not points of one batch-size scan, and their losses are not comparable.
COMPARABLE_KEYS = ("dataset", "tokenizer", "vocab_size", "seq_len")
LOSS_COLUMNS = {"train": (wd.Col.STEP, wd.Col.TRAIN_LOSS), "eval": (EVAL_STEP, wd.Col.EVAL_LOSS)}


def finite_prefix(step: np.ndarray, loss: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The curve up to its first non-finite loss: a diverged run reaches nothing after that."""
  step, loss = np.asarray(step, float), np.asarray(loss, float)
  bad = ~np.isfinite(loss) | ~np.isfinite(step) | (step <= 0)
  end = int(np.argmax(bad)) if bad.any() else len(loss)
  return step[:end], loss[:end]


def running_median(values: np.ndarray, points: int = MEDIAN_POINTS) -> np.ndarray:
  """Median over `points` consecutive values (odd), shrunk symmetrically at the ends."""
  values = np.asarray(values, float)
  out = values.copy()
  for k in range(1, points // 2 + 1):  # half-width k wherever the ends allow it
    if len(values) < 2 * k + 1:
      break
    windows = np.lib.stride_tricks.sliding_window_view(values, 2 * k + 1)
    out[k:len(values) - k] = np.median(windows, axis=1)
  return out


def _local_linear(xc: np.ndarray, y: np.ndarray, w: np.ndarray, lo: np.ndarray, hi: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
  """Weighted least-squares line over each window [lo, hi) at its centre; (fit, sum of weights)."""

  def window_sum(v: np.ndarray) -> np.ndarray:
    c = np.concatenate([[0.0], np.cumsum(v)])
    return c[hi] - c[lo]

  n = window_sum(w)
  safe_n = np.where(n > 0, n, 1.0)
  sx, sy = window_sum(w * xc), window_sum(w * y)
  sxx = window_sum(w * xc * xc) - sx * sx / safe_n
  sxy = window_sum(w * xc * y) - sx * sy / safe_n
  slope = np.where(sxx > 1e-12 * np.maximum(n, 1), sxy / np.where(sxx > 0, sxx, 1.0), 0.0)
  return sy / safe_n + slope * (xc - sx / safe_n), n


def smooth_log_window(step: np.ndarray, loss: np.ndarray, window: float = DEFAULT_WINDOW,
                      robust: bool = True) -> np.ndarray:
  """Local linear fit in log(step) over |log s' - log s| <= window, shrunk symmetrically at ends.

  A local line rather than a plain mean: with unevenly logged steps (integer steps early on,
  sparse logging later) a window's points are not symmetric about its centre, and a mean would
  lag; a local line is exact for curves linear in log(step) whatever the spacing.

  With `robust`, isolated outliers are dropped (see the module docstring): a pilot curve is the
  same fit of the running median over MEDIAN_POINTS logged points, and points further than
  OUTLIER_SIGMAS robust s.d. (from the MAD of the residuals) from the pilot get weight 0.
  """
  loss = np.asarray(loss, float)
  if len(step) == 0 or window <= 0:
    return loss.copy()
  ls = np.log(np.asarray(step, float))
  half = np.minimum(window, np.minimum(ls - ls[0], ls[-1] - ls))
  lo = np.searchsorted(ls, ls - half - 1e-12, side="left")
  hi = np.searchsorted(ls, ls + half + 1e-12, side="right")
  xc = ls - ls.mean()  # centred for numerical stability of the sums
  ones = np.ones_like(loss)
  if not robust or len(loss) < 3:
    return _local_linear(xc, loss, ones, lo, hi)[0]
  pilot = _local_linear(xc, running_median(loss), ones, lo, hi)[0]
  resid = loss - pilot
  sigma = max(1.4826 * float(np.median(np.abs(resid))), MIN_NOISE)
  weights = (np.abs(resid) <= OUTLIER_SIGMAS * sigma).astype(float)
  fit, total = _local_linear(xc, loss, weights, lo, hi)
  return np.where(total > 1e-9, fit, pilot)


def envelope(step: np.ndarray, loss: np.ndarray, window: float = DEFAULT_WINDOW
             ) -> tuple[np.ndarray, np.ndarray]:
  """(steps, best non-increasing fit of the smoothed loss) up to the smoothed curve's minimum.

  Only the finite prefix of the curve counts, and of it only the part up to where the smoothed
  loss is lowest: whatever comes later cannot change where a loss is first reached.
  """
  step, loss = finite_prefix(step, loss)
  if len(loss) == 0:
    return step, loss
  smoothed = smooth_log_window(step, loss, window)
  end = int(np.argmin(smoothed)) + 1
  return step[:end], optimize.isotonic_regression(smoothed[:end], increasing=False).x


def _first_reach(s: np.ndarray, env: np.ndarray, target: float, min_step: float) -> float:
  """Step (interpolated in log step) where the envelope first reaches `target`, else NaN."""
  below = np.nonzero(env <= target)[0]
  if len(below) == 0 or below[0] == 0:  # never reached, or already at the first logged point
    return np.nan
  k = int(below[0])
  frac = (env[k - 1] - target) / (env[k - 1] - env[k])
  reached = float(np.exp(np.log(s[k - 1]) + frac * (np.log(s[k]) - np.log(s[k - 1]))))
  return reached if reached >= min_step else np.nan


def steps_to_target(step: np.ndarray, loss: np.ndarray, target: float,
                    window: float = DEFAULT_WINDOW, min_step: float = DEFAULT_MIN_STEP) -> float:
  """First step (interpolated in log step) where the smoothed loss reaches `target`, else NaN."""
  s, env = envelope(step, loss, window)
  return _first_reach(s, env, target, min_step)


def steps_to_losses(step: np.ndarray, loss: np.ndarray, losses: Sequence[float],
                    window: float = DEFAULT_WINDOW, min_step: float = DEFAULT_MIN_STEP
                    ) -> np.ndarray:
  """steps_to_target for several losses of one curve, smoothing it once; NaN where not reached."""
  s, env = envelope(step, loss, window)
  return np.array([_first_reach(s, env, float(t), min_step) for t in losses], dtype=float)


def _as_float(value) -> float:
  """A settings value (None, NaN, str or number) as a float; NaN when missing or not a number."""
  value = pd.to_numeric(value, errors="coerce")
  return float(value) if value is not None else np.nan


def check_comparable(runs: pd.DataFrame) -> None:
  """Raises ConfigError when runs of one model size differ in data, tokenizer or sequence length.

  Such runs measure loss in different units (or on different data), so the best run per batch
  size and the S/E fit would compare numbers that do not compare. Missing values are ignored.
  """
  keys = [k for k in COMPARABLE_KEYS if k in runs.columns]
  if not keys or runs.empty:
    return
  for (size, n_params), group in runs.groupby(["size", "n_params"], sort=True, dropna=False):
    for key in keys:
      values = sorted({str(v) for v in group[key] if v is not None and not pd.isna(v)})
      if len(values) > 1:
        raise ConfigError(
            f"size {size} (n_params {n_params}) mixes runs with different {key}: "
            f"{', '.join(values)}. Their losses are not comparable: analyse each {key} "
            f"separately (pass their sweep directories to separate analyses).")


def unfinished(run: pd.Series) -> bool:
  """Whether a run may still log rows: not done or diverged (failed and preempted resume)."""
  return run.get("status", wd.DONE) not in wd.FINAL_STATES and not run.get("diverged", False)


PER_RUN_COLUMNS = ["run", "name", "status", "size", "n_params", "batch_tokens", "learning_rate",
                   "seed", "target", "steps", "tokens", "pending"]


def steps_to_targets(runs: pd.DataFrame, targets: Sequence[float], loss: str = "train",
                     window: float = DEFAULT_WINDOW, min_step: float = DEFAULT_MIN_STEP
                     ) -> pd.DataFrame:
  """Per run and target: steps and tokens to reach it (NaN when not reached reliably).

  `pending` marks an unfinished run that has not yet reached a target it may still reach. An
  unfinished run's crossing counts only once a whole smoothing window of later steps is logged
  (its last step >= crossing * e^window): until then more rows can still move it.

  Raises:
    ConfigError: runs of one model size differ in dataset, tokenizer, vocab size or seq_len.
  """
  step_col, loss_col = LOSS_COLUMNS[loss]
  check_comparable(runs)
  settled = float(np.exp(window))
  rows = []
  for idx, run in runs.iterrows():
    stop_target = _as_float(run.get("target_loss", np.nan))  # null for fixed-budget runs
    s_env, env = envelope(run[step_col], run[loss_col], window)
    logged = finite_prefix(run[step_col], run[loss_col])[0]
    last = float(logged[-1]) if len(logged) else 0.0
    open_run = unfinished(run)
    for target in targets:
      s = _first_reach(s_env, env, target, min_step)
      pending = False
      if np.isfinite(stop_target) and target < stop_target - 1e-9:
        # Below the loss this run was told to stop at: only the runs that overshot it by
        # chance (small batches) would count, a biased subset. Not a target for this run.
        s = np.nan
      elif open_run and not s * settled <= last:  # not reached yet, or not settled
        s, pending = np.nan, True
      rows.append({"run": idx, "name": run.get("name", str(idx)),
                   "status": run.get("status", wd.DONE), "size": run["size"],
                   "n_params": run["n_params"], "batch_tokens": run["batch_tokens"],
                   "learning_rate": run["learning_rate"], "seed": run["seed"],
                   "target": float(target), "steps": s, "tokens": s * run["batch_tokens"],
                   "pending": pending})
  return pd.DataFrame(rows, columns=PER_RUN_COLUMNS)


_GROUP = ["size", "n_params", "target"]


def pending_targets(per_run: pd.DataFrame) -> pd.DataFrame:
  """Per (model size, target) not yet fittable: the unfinished runs it waits for, by name."""
  waiting = per_run[per_run["pending"].astype(bool)] if "pending" in per_run else per_run[:0]
  groups = waiting.groupby(_GROUP, sort=True, dropna=False)
  rows = [{"size": size, "n_params": n_params, "target": float(target),
           "runs": sorted(group["name"].astype(str).unique()),
           "statuses": sorted(group["status"].astype(str).unique())}
          for (size, n_params, target), group in groups]
  return pd.DataFrame(rows, columns=[*_GROUP, "runs", "statuses"])


def best_steps(per_run: pd.DataFrame) -> pd.DataFrame:
  """Best (fewest) steps per (model size, batch size, target) over learning rates and seeds.

  A (model size, target) that an unfinished run may still reach is left out altogether: its
  run could become the best of its batch size, or add a batch size, so any fit would bend.
  """
  if "pending" in per_run:
    blocked = per_run.groupby(_GROUP, sort=False, dropna=False)["pending"].transform("any")
    blocked = blocked.astype(bool)
    per_run = per_run[~blocked]
  reached = per_run[np.isfinite(per_run["steps"])]
  if reached.empty:
    return reached.assign(n_candidates=pd.Series(dtype=int)).reset_index(drop=True)
  keys = ["size", "n_params", "batch_tokens", "target"]
  best = reached.loc[reached.groupby(keys, sort=False)["steps"].idxmin()]
  counts = per_run.groupby(keys, sort=False).size().rename("n_candidates")
  best = best.join(counts, on=keys)
  return best.sort_values(["n_params", "target", "batch_tokens"]).reset_index(drop=True)


def _loss_range(runs: pd.DataFrame, loss: str, window: float, min_step: float
                ) -> list[tuple[str, float, float, float]]:
  """Per (model size, batch size): size, n_params, highest reliable and lowest countable loss.

  Lowest countable: the lowest smoothed loss after `min_step`, but not below the runs' stop
  targets (steps_to_targets does not count a target below a run's own stop target).
  """
  step_col, loss_col = LOSS_COLUMNS[loss]
  rows = []
  for (size, n_params, _), group in runs.groupby(["size", "n_params", "batch_tokens"]):
    hi, lo = -np.inf, np.inf
    for _, run in group.iterrows():
      s, env = envelope(run[step_col], run[loss_col], window)
      later = env[s >= min_step]
      stop_target = _as_float(run.get("target_loss", np.nan))
      if len(later) >= 2:
        lowest = max(later[-1], stop_target) if np.isfinite(stop_target) else later[-1]
        hi, lo = max(hi, later[0]), min(lo, lowest)
    if np.isfinite(hi) and lo < hi:
      rows.append((str(size), n_params, hi, lo))
  return rows


def lowest_fittable_loss(runs: pd.DataFrame, loss: str = "train", window: float = DEFAULT_WINDOW,
                         min_step: float = DEFAULT_MIN_STEP) -> dict[str, float]:
  """Per model size, the lowest loss that 3 batch sizes reach countably (none: not listed)."""
  lows: dict[str, list[float]] = {}
  for size, _, _, lo in _loss_range(runs, loss, window, min_step):
    lows.setdefault(size, []).append(lo)
  return {size: sorted(v)[2] for size, v in lows.items() if len(v) >= 3}


def choose_targets(runs: pd.DataFrame, n: int = 5, loss: str = "train",
                   min_batch_sizes: int = 4, window: float = DEFAULT_WINDOW,
                   min_step: float = DEFAULT_MIN_STEP) -> list[float]:
  """Targets spread over the loss range that >= `min_batch_sizes` batch sizes reach reliably.

  A loss L is usable for a model size when enough batch sizes reach it after `min_step`, and
  not below their runs' stop targets (steps_to_targets does not count a target below a run's own
  stop target). The targets are spaced evenly in log L over the lower half of the usable range:
  the upper half is early training (warmup, initial transient), where S(B) = S_min + E_min/B
  describes the data least well.
  """
  check_comparable(runs)
  rows = [(n_params, hi, lo) for _, n_params, hi, lo in _loss_range(runs, loss, window, min_step)]
  if not rows:
    raise ConfigError("no runs with loss curves to choose targets from")
  sizes, his, los = (np.array(c) for c in zip(*rows))
  grid = np.geomspace(los.min(), his.max(), 400)
  reach = (los[None, :] < grid[:, None]) & (grid[:, None] < his[None, :])  # [grid, runs]
  counts = np.stack([reach[:, sizes == n].sum(axis=1) for n in np.unique(sizes)], axis=1)
  usable = grid[(counts >= min_batch_sizes).any(axis=1)]
  if not len(usable):  # settle for the fewest batch sizes a fit accepts
    usable = grid[(counts >= 3).any(axis=1)]
  if not len(usable):
    raise ConfigError("no loss is reached by 3 batch sizes of any one model size: nothing to fit "
                     "(give targets explicitly to see the runs anyway)")
  lo, hi = min(usable), max(usable)
  upper = np.exp(0.5 * (np.log(lo) + np.log(hi)))
  lo = lo * 1.01  # stay clear of the lowest curves' ends
  picked = np.round(np.geomspace(lo, max(upper, lo * 1.05), n), 3)
  return sorted(set(float(t) for t in picked))
