"""Noise-scale measurements paired with the training loss at which they were taken.

Two views: the cloud (every thinned measurement against the smoothed loss at its step) and the
noise scales at given losses (per run, the smoothed B_simple and B_noise at the step where the
run's smoothed train loss first reaches the loss; then the geometric mean and the min-max over
runs of a size), which sit on the same loss axis as the scan's B_crit(L).

Smoothing of the noise scales: a local line in log step over +-NOISE_WINDOW (wider than the
loss's: B_noise is logged on a sparse cadence, one estimate per Hessian step, and the noise
scales change slowly along a run). B_simple is the logged EMA ratio, smoothed in log. B_noise,
where its terms tr(H Sigma) and G^T H G are logged, is the ratio of their smoothed values, as
B_simple is a ratio of EMAs: single-step estimates of G^T H G are noisy and often <= 0 (B_noise
undefined), so averaging per-step ratios would drop exactly the steps where B_noise is largest.
Runs without those terms fall back to the logged B_noise, smoothed in log.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from bscan.analysis import targets as targets_lib
from bscan.workdir import Col

NOISE_WINDOW = 0.25  # half-width in log step of the noise scales' smoothing
PER_RUN_COLUMNS = ("run", "size", "n_params", "batch_tokens", "loss", "steps", "b_simple",
                   "b_noise")
AT_TARGET_COLUMNS = ("size", "n_params", "target", "b_simple", "b_simple_lo", "b_simple_hi",
                     "b_simple_n_runs", "b_noise", "b_noise_lo", "b_noise_hi", "b_noise_n_runs")
CLOUD_COLUMNS = ("size", "n_params", "batch_tokens", "learning_rate", Col.STEP,
                 Col.TRAIN_LOSS, Col.B_SIMPLE_TOKENS, Col.B_NOISE_TOKENS)


def noise_scale_cloud(runs: pd.DataFrame, window: float = targets_lib.DEFAULT_WINDOW,
                      max_points_per_run: int = 60,
                      min_step: float = targets_lib.DEFAULT_MIN_STEP) -> pd.DataFrame:
  """B_simple (and B_noise when logged) against the smoothed train loss at the same step.

  The loss is the smoothed curve of targets.py (the same one the steps-to-target use), so a
  point sits at the loss the run had when it measured that noise scale. Points are thinned to
  at most `max_points_per_run`, evenly in log(step), so long runs do not dominate the cloud.
  """
  parts = []
  for _, run in runs.iterrows():
    step, loss = targets_lib.finite_prefix(run[Col.STEP], run[Col.TRAIN_LOSS])
    n = len(step)
    if n == 0:
      continue
    b_simple = np.asarray(run[Col.B_SIMPLE_TOKENS], float)[:n]
    b_noise = np.asarray(run[Col.B_NOISE_TOKENS], float)[:n]
    measured = (step >= min_step) & ((np.isfinite(b_simple) & (b_simple > 0))
                                     | (np.isfinite(b_noise) & (b_noise > 0)))
    if not measured.any():
      continue
    smoothed = targets_lib.smooth_log_window(step, loss, window)
    idx = np.nonzero(measured)[0]
    if len(idx) > max_points_per_run:  # thin evenly in log(step)
      want = np.geomspace(step[idx[0]], step[idx[-1]], max_points_per_run)
      idx = np.unique(idx[np.clip(np.searchsorted(step[idx], want), 0, len(idx) - 1)])
    parts.append(pd.DataFrame({
        "size": run["size"], "n_params": run["n_params"], "batch_tokens": run["batch_tokens"],
        "learning_rate": run["learning_rate"], Col.STEP: step[idx],
        Col.TRAIN_LOSS: smoothed[idx],
        Col.B_SIMPLE_TOKENS: np.where(b_simple[idx] > 0, b_simple[idx], np.nan),
        Col.B_NOISE_TOKENS: np.where(b_noise[idx] > 0, b_noise[idx], np.nan)}))
  if not parts:
    return pd.DataFrame(columns=list(CLOUD_COLUMNS))
  return pd.concat(parts, ignore_index=True)[list(CLOUD_COLUMNS)]


def _column(run: pd.Series, key: str, n: int) -> np.ndarray:
  """A curve of the run cut to its first n steps; all NaN when absent or not step-aligned."""
  values = np.asarray(run.get(key, np.zeros(0)), float)
  return values[:n] if len(values) >= n else np.full(n, np.nan)


def _smoothed_at(step: np.ndarray, values: np.ndarray, at: np.ndarray, log: bool) -> np.ndarray:
  """The values' local-line smooth (in log when `log`) at steps `at`; NaN outside their range."""
  ok = np.isfinite(values) & ((values > 0) if log else True)
  out = np.full(len(at), np.nan)
  if ok.sum() == 0:
    return out
  s, v = step[ok], values[ok]
  # Robust only in log: a component (tr(H Sigma), G^T H G) is averaged as it is, like an EMA.
  fit = targets_lib.smooth_log_window(s, np.log(v) if log else v, NOISE_WINDOW, robust=log)
  inside = np.isfinite(at) & (at >= s[0]) & (at <= s[-1])
  out[inside] = np.interp(np.log(at[inside]), np.log(s), fit)
  return np.exp(out) if log else out


def noise_scales_at(run: pd.Series, steps: np.ndarray, min_step: float
                    ) -> tuple[np.ndarray, np.ndarray]:
  """(B_simple, B_noise) of one run, smoothed, at the given steps (NaN where not measured)."""
  step, _ = targets_lib.finite_prefix(run[Col.STEP], run[Col.TRAIN_LOSS])
  n = len(step)
  steps = np.asarray(steps, float)
  if n == 0:
    return np.full(len(steps), np.nan), np.full(len(steps), np.nan)
  later = step >= min_step
  s = step[later]
  b_simple = _smoothed_at(s, _column(run, Col.B_SIMPLE_TOKENS, n)[later], steps, log=True)
  trhs, ghg = _column(run, Col.TRHS, n)[later], _column(run, Col.GHG, n)[later]
  if (np.isfinite(trhs) & np.isfinite(ghg)).any():
    both = np.isfinite(trhs) & np.isfinite(ghg)  # the same steps for numerator and denominator
    num = _smoothed_at(s, np.where(both, trhs, np.nan), steps, log=False)
    den = _smoothed_at(s, np.where(both, ghg, np.nan), steps, log=False)
    with np.errstate(divide="ignore", invalid="ignore"):
      b_noise = np.where((num > 0) & (den > 0), num / den, np.nan)
  else:
    b_noise = _smoothed_at(s, _column(run, Col.B_NOISE_TOKENS, n)[later], steps, log=True)
  return b_simple, b_noise


def noise_at_losses(runs: pd.DataFrame, losses: Sequence[float],
                    window: float = targets_lib.DEFAULT_WINDOW,
                    min_step: float = targets_lib.DEFAULT_MIN_STEP) -> pd.DataFrame:
  """Per run and loss: the step its smoothed train loss first reaches it, B_simple and B_noise.

  Runs that never reach a loss (after min_step) have no row for it.
  """
  losses = np.asarray(losses, float)
  parts = []
  for idx, run in runs.iterrows():
    steps = targets_lib.steps_to_losses(run[Col.STEP], run[Col.TRAIN_LOSS], losses, window,
                                        min_step)
    reached = np.isfinite(steps)
    if not reached.any():
      continue
    b_simple, b_noise = noise_scales_at(run, steps[reached], min_step)
    parts.append(pd.DataFrame({
        "run": idx, "size": run["size"], "n_params": run["n_params"],
        "batch_tokens": run["batch_tokens"], "loss": losses[reached], "steps": steps[reached],
        "b_simple": b_simple, "b_noise": b_noise}))
  if not parts:
    return pd.DataFrame(columns=list(PER_RUN_COLUMNS))
  return pd.concat(parts, ignore_index=True)[list(PER_RUN_COLUMNS)]


def _spread(values: pd.Series, name: str) -> dict[str, float]:
  """Geometric mean, min and max over runs of the finite positive values, and their count."""
  v = values.to_numpy(float)
  v = v[np.isfinite(v) & (v > 0)]
  if not len(v):
    return {name: np.nan, f"{name}_lo": np.nan, f"{name}_hi": np.nan, f"{name}_n_runs": 0}
  return {name: float(np.exp(np.mean(np.log(v)))), f"{name}_lo": float(v.min()),
          f"{name}_hi": float(v.max()), f"{name}_n_runs": int(len(v))}


def run_average(per_run: pd.DataFrame) -> pd.DataFrame:
  """Per (size, loss) of noise_at_losses: geometric mean, min and max over runs (`target`)."""
  rows = []
  for (n_params, loss), group in per_run.groupby(["n_params", "loss"], sort=True):
    rows.append({"size": group["size"].iloc[0], "n_params": n_params, "target": float(loss),
                 **_spread(group["b_simple"], "b_simple"), **_spread(group["b_noise"], "b_noise")})
  table = pd.DataFrame(rows, columns=list(AT_TARGET_COLUMNS))
  return table.astype({"b_simple_n_runs": int, "b_noise_n_runs": int})


def noise_at_targets(runs: pd.DataFrame, targets: Sequence[float],
                     window: float = targets_lib.DEFAULT_WINDOW,
                     min_step: float = targets_lib.DEFAULT_MIN_STEP) -> pd.DataFrame:
  """Per (size, target): B_simple and B_noise averaged over the runs that reach the target.

  Each run contributes its smoothed noise scales where its smoothed train loss first reaches
  the target; the mean is geometric (noise scales spread multiplicatively), `_lo`/`_hi` are the
  smallest and largest run's value, `_n_runs` how many runs measured it. A (size, target) that
  no run reaches has no row; one reached by runs without a noise scale has NaN and 0 runs.
  """
  return run_average(noise_at_losses(runs, targets, window, min_step))
