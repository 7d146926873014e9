"""Noise-scale measurements paired with the training loss at which they were taken."""

from __future__ import annotations

import numpy as np
import pandas as pd

from bscan.analysis import targets as targets_lib
from bscan.workdir import Col

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
