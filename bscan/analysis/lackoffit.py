"""Lack of fit of S(B) = S_min + E_min/B for one target: flag crossing curves instead of fitting.

Under warmup-stable-decay schedules the loss curves of different batch sizes cross (Zhou et al.
2026, arXiv:2601.05034): a large batch can reach a low target with fewer tokens than a small one,
so E(B) = B*S(B) is not increasing and S(B) is no hyperbola. fit.fit_critical_batch fits one
anyway, and its residual s.d. absorbs the misfit. This module tests the hyperbola against noise
measured independently of the fit, so the fit's own residuals are what is tested, not its yardstick.

Noise of log S, from the run's own curve (no replicate seeds needed): a crossing moves by
delta log S = delta L_smooth / |dL/dlog step|. The smoothed loss at the crossing is targets'
local linear fit, a linear smoother with hat weights h, so its variance is sigma^2 * sum h^2
(exact, with the ends shrunk as targets does them), where sigma is the s.d. of the logged losses
around it: the RMS of the residuals (each over sqrt(1 - h_ii), the share a smoother leaves)
after dropping the same > 6 robust s.d. outliers the smoother drops. Not the MAD alone: per-batch
losses are right-skewed at small batches and the smoother averages, so the s.d. is what counts.
sigma is taken within +-NOISE_WINDOW in log step of the crossing, the slope from a least-squares
quadratic in log step through the kept losses within +-SLOPE_WINDOW, at the crossing. Wide,
because the slope's own noise divides sigma: at 1024 tokens, logged 60 points per e-fold, a +-0.5
window put 1% of single estimates above 3.7x the true spread (some at inf), +-1.5 none above
3.4x. A quadratic, because runs stop just past the lowest target, so its window is one-sided,
and a line's slope there is the slope half a window earlier, where curves are steeper: on quiet
curves stopped at 1.1x the crossing a line gave sigma 23-28% low, the quadratic 11%. Per-step
batch losses are nearly independent; a significant positive lag-1 autocorrelation rho of the
residuals (slow wiggles) inflates the variance by (1 + rho)/(1 - rho). The result is added in
quadrature to MIN_LOG_SIGMA: run-to-run variation one curve cannot show (seeds: init and data
order shift a whole run's time scale), which also keeps noise-free curves from giving infinite
chi^2. It is 0.04, the seed-to-seed s.d. of log S of the synthetic scans (synthetic.Scan's
run_noise). With that scatter in the data, true hyperbolas were flagged in 31% of 300 draws at
a floor of 0.01, 19% at 0.02, 8.7% at 0.03, 3.3% at 0.04 and 0.7% at 0.05, and crossing
curves in 98%, 98%, 96%, 94% and 93%: 0.04 keeps false flags under alpha without losing the
crossings. Pass another `min_sigma` when replicate seeds show another scatter of S.

The test: the hyperbola is fitted by weighted least squares of log S with those sigmas and
S_min, E_min >= 0 (a hyperbola with negative S_min would let E fall with B, the very thing to be
caught); chi^2 = sum (residual/sigma)^2 on n - 2 degrees of freedom, flagged when its p < alpha.
An explicit monotonicity test was tried alongside (for every pair B_i < B_j, the z-score of E
falling or S rising, both impossible for a hyperbola with S_min, E_min >= 0; the largest,
Bonferroni over the pairs) and dropped from the flag: on six batch sizes it never caught what
chi^2 missed (a U-shaped E, S rising at 1.3x at the smallest batch: chi^2 51-59%, pairs 2-23%;
E falling 15% at the largest: both ~100%), and splitting alpha between the two only cost power.
The pairwise z-scores still name the reason of a flag: E_FALLS or S_RISES when the worst pair is
beyond the one-sided alpha quantile, else BEYOND_NOISE (a shape no hyperbola follows, but in
order). Measured in tests/analysis_lackoffit_test.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import optimize, stats

from bscan.analysis import fit as fit_lib
from bscan.analysis import targets as targets_lib

DEFAULT_WINDOW = targets_lib.DEFAULT_WINDOW
NOISE_WINDOW = 0.5  # half-width in log step around the crossing for the loss noise
SLOPE_WINDOW = 1.5  # half-width in log step of the quadratic whose slope at the crossing is used
MIN_LOG_SIGMA = 0.04  # s.d. of log S added in quadrature: seed-to-seed variation, exact curves
DEFAULT_ALPHA = 0.05
OK = "ok"
S_RISES = "S rises with B"
E_FALLS = "E falls with B"
BEYOND_NOISE = "residuals beyond noise"
FLAG_COLUMNS = ("lack_of_fit", "lack_of_fit_p", "lack_of_fit_reason")  # joined to fit_targets
TABLE_COLUMNS = ("size", "n_params", "target", "n_batch_sizes", "chi2", "dof", "p_value",
                 "flagged", "reason", "monotone_z")


def _windows(ls: np.ndarray, window: float) -> tuple[np.ndarray, np.ndarray]:
  """[lo, hi) of each point's smoothing window, as targets.smooth_log_window builds them."""
  half = np.minimum(window, np.minimum(ls - ls[0], ls[-1] - ls))
  lo = np.searchsorted(ls, ls - half - 1e-12, side="left")
  hi = np.searchsorted(ls, ls + half + 1e-12, side="right")
  return lo, hi


def _self_weights(ls: np.ndarray, window: float) -> np.ndarray:
  """Per point, sum of squared hat weights of its local line (= its own hat weight h_ii)."""
  lo, hi = _windows(ls, window)
  xc = ls - ls.mean()
  c1 = np.concatenate([[0.0], np.cumsum(xc)])
  c2 = np.concatenate([[0.0], np.cumsum(xc * xc)])
  n = (hi - lo).astype(float)
  mean = (c1[hi] - c1[lo]) / n
  sxx = (c2[hi] - c2[lo]) - n * mean * mean
  lever = np.where(sxx > 1e-12 * n, (xc - mean) ** 2 / np.where(sxx > 0, sxx, 1.0), 0.0)
  return 1.0 / n + lever


def log_steps_noise(step: np.ndarray, loss: np.ndarray, target: float,
                    window: float = DEFAULT_WINDOW, min_sigma: float = MIN_LOG_SIGMA) -> float:
  """S.d. of log(steps to `target`) from the curve's own noise and slope; NaN if not reached.

  inf when the loss does not fall around the crossing (S is then not determined at all); the
  test then leaves the point out.
  """
  step, loss = targets_lib.finite_prefix(step, loss)
  crossing = targets_lib.steps_to_target(step, loss, target, window, min_step=0.0)
  if not np.isfinite(crossing) or len(step) < 5:
    return np.nan
  ls, x0 = np.log(step), np.log(crossing)
  own = _self_weights(ls, window)
  resid = (loss - targets_lib.smooth_log_window(step, loss, window)) / np.sqrt(
      np.maximum(1.0 - own, 1e-12))
  near = (np.abs(ls - x0) <= NOISE_WINDOW) & (own < 0.5)  # the ends are their own fit
  if near.sum() < 10:
    near = own < 0.5
  if near.sum() < 3:
    return np.nan
  r = resid[near]
  robust = max(1.4826 * float(np.median(np.abs(r))), targets_lib.MIN_NOISE)
  keep = np.abs(r) <= targets_lib.OUTLIER_SIGMAS * robust  # what the smoother keeps
  r = r[keep]
  sigma = float(np.sqrt(np.mean(r * r)))
  rho = float(np.sum(r[1:] * r[:-1]) / max(np.sum(r * r), 1e-300)) if len(r) > 2 else 0.0
  inflate = (1 + rho) / (1 - rho) if 2 / np.sqrt(len(r)) < rho < 0.9 else 1.0
  around = ((np.abs(ls - x0) <= SLOPE_WINDOW)
            & (np.abs(resid) <= targets_lib.OUTLIER_SIGMAS * robust))
  x, y = ls[around] - x0, loss[around]
  if len(np.unique(x)) < 3:
    return np.inf
  slope = float(np.polyfit(x, y, 2)[1])  # d loss / d log step at x = 0, the crossing
  if slope >= 0:
    return np.inf
  spread = sigma * np.sqrt(inflate * np.interp(x0, ls, own))  # s.d. of the smoothed loss
  return float(np.hypot(spread / -slope, min_sigma))


@dataclasses.dataclass(frozen=True)
class LackOfFit:
  """Whether S(B) at one target departs from S_min + E_min/B beyond the noise of log S."""

  chi2: float  # sum of squared (log-space residual / sigma) of the weighted fit
  dof: int  # points - 2
  p_value: float  # chi^2 tail probability
  flagged: bool  # p_value < alpha
  reason: str  # OK, S_RISES, E_FALLS or BEYOND_NOISE
  monotone_z: float  # largest z-score of E falling or S rising over pairs of batch sizes
  s_min: float  # of the weighted fit (S_min, E_min >= 0)
  e_min: float


def _weighted_fit(x: np.ndarray, s: np.ndarray, sigma: np.ndarray) -> np.ndarray:
  """(S_min, E_min) >= 0 minimising sum ((log s - log(S_min + E_min x)) / sigma)^2."""
  design = np.stack([np.ones_like(x), x], axis=1)
  w = 1.0 / (sigma * s)  # the log fit linearised around the data: a non-negative start
  start = optimize.nnls(design * w[:, None], s * w)[0]
  scale = np.array([np.max(s), np.max(s) / np.max(x)])  # parameters of order one
  start = np.maximum(start / scale, 1e-9)

  def resid(p: np.ndarray) -> np.ndarray:
    return (np.log(s) - np.log(np.maximum(design @ (p * scale), 1e-300))) / sigma

  def jac(p: np.ndarray) -> np.ndarray:
    mu = np.maximum(design @ (p * scale), 1e-300)
    return -design * scale / (mu * sigma)[:, None]

  return optimize.least_squares(resid, start, jac=jac, bounds=(0.0, np.inf),
                                xtol=1e-12, ftol=1e-12).x * scale


def _pooled(b: np.ndarray, log_s: np.ndarray, sigma: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Repeats of a batch size pooled into their inverse-variance mean of log S."""
  sizes = np.unique(b)
  w = 1.0 / sigma ** 2
  mean = np.array([np.sum((w * log_s)[b == u]) / np.sum(w[b == u]) for u in sizes])
  sd = np.array([1.0 / np.sqrt(np.sum(w[b == u])) for u in sizes])
  return sizes, mean, sd


def _monotone(b: np.ndarray, log_s: np.ndarray, sigma: np.ndarray) -> tuple[float, str]:
  """Largest z-score of 'E falls' or 'S rises' over all pairs of batch sizes, and which."""
  sizes, mean, sd = _pooled(b, log_s, sigma)
  i, j = np.triu_indices(len(sizes), k=1)  # B_i < B_j
  se = np.hypot(sd[i], sd[j])
  z_s = (mean[j] - mean[i]) / se  # S rises
  z_e = (mean[i] - mean[j] - np.log(sizes[j] / sizes[i])) / se  # E falls
  z = np.concatenate([z_s, z_e])
  k = int(np.argmax(z))
  return float(z[k]), (S_RISES if k < len(z_s) else E_FALLS)


def hyperbola_lack_of_fit(batch_sizes: Sequence[float] | np.ndarray,
                          steps: Sequence[float] | np.ndarray,
                          log_sigma: Sequence[float] | np.ndarray,
                          alpha: float = DEFAULT_ALPHA) -> LackOfFit:
  """Tests S(B) against S_min + E_min/B given the s.d. of each log S (see the module docstring).

  Points with a non-finite or non-positive step or s.d. are dropped; repeats of a batch size
  are allowed.

  Raises:
    fit.TooFewBatchSizesError: fewer than three distinct batch sizes remain.
  """
  b = np.asarray(batch_sizes, float).ravel()
  s = np.asarray(steps, float).ravel()
  sigma = np.asarray(log_sigma, float).ravel()
  if not b.shape == s.shape == sigma.shape:
    raise ValueError(f"batch_sizes, steps and log_sigma differ in length: {b.shape}, "
                     f"{s.shape}, {sigma.shape}")
  keep = (np.isfinite(b) & np.isfinite(s) & np.isfinite(sigma) & (b > 0) & (s > 0)
          & (sigma > 0))
  b, s, sigma = b[keep], s[keep], sigma[keep]
  if len(np.unique(b)) < 3:
    raise fit_lib.TooFewBatchSizesError(
        f"lack-of-fit test needs at least 3 distinct batch sizes with a finite S and s.d.; got "
        f"{np.unique(b).tolist()}")
  s_min, e_min = _weighted_fit(1.0 / b, s, sigma)
  resid = (np.log(s) - np.log(s_min + e_min / b)) / sigma
  chi2, dof = float(np.sum(resid ** 2)), len(s) - 2
  p_value = float(stats.chi2.sf(chi2, dof))
  z, order = _monotone(b, np.log(s), sigma)
  flagged = p_value < alpha
  reason = OK if not flagged else (order if z > stats.norm.isf(alpha) else BEYOND_NOISE)
  return LackOfFit(chi2=chi2, dof=dof, p_value=p_value, flagged=bool(flagged), reason=reason,
                   monotone_z=z, s_min=float(s_min), e_min=float(e_min))


def _best_run(runs: pd.DataFrame, row: pd.Series, loss: str, window: float,
              min_step: float) -> pd.Series:
  """The run that gave a best_steps row: its `run` label, else the one that reproduces steps."""
  if "run" in row and row["run"] in runs.index:
    return runs.loc[row["run"]]
  step_col, loss_col = targets_lib.LOSS_COLUMNS[loss]
  same = runs[(runs["n_params"] == row["n_params"]) & (runs["batch_tokens"] ==
                                                       row["batch_tokens"])]
  found = [abs(np.log(targets_lib.steps_to_target(r[step_col], r[loss_col], row["target"],
                                                  window, min_step) / row["steps"]))
           for _, r in same.iterrows()]
  found = np.where(np.isfinite(found), found, np.inf)
  if not len(found) or not np.isfinite(np.min(found)):
    raise ValueError(f"no run of size {row['size']}, batch {row['batch_tokens']:g} reaches "
                     f"target {row['target']:g} in {row['steps']:g} steps")
  return same.iloc[int(np.argmin(found))]


def lack_of_fit_table(runs: pd.DataFrame, best: pd.DataFrame, loss: str = "train",
                      window: float = DEFAULT_WINDOW,
                      min_step: float = targets_lib.DEFAULT_MIN_STEP,
                      alpha: float = DEFAULT_ALPHA, min_sigma: float = MIN_LOG_SIGMA
                      ) -> pd.DataFrame:
  """Per (model size, target) of `best` (targets.best_steps): the hyperbola's lack of fit.

  The s.d. of each log S comes from the curve of the run that gave it (`best`'s `run` column,
  a label of `runs`). Targets with fewer than three batch sizes are left out, as fit_targets
  leaves them out.
  """
  step_col, loss_col = targets_lib.LOSS_COLUMNS[loss]
  rows = []
  for (n_params, target), group in best.groupby(["n_params", "target"], sort=True):
    sigma = []
    for _, row in group.iterrows():
      run = _best_run(runs, row, loss, window, min_step)
      sigma.append(log_steps_noise(run[step_col], run[loss_col], target, window, min_sigma))
    try:
      res = hyperbola_lack_of_fit(group["batch_tokens"], group["steps"], sigma, alpha)
    except fit_lib.TooFewBatchSizesError:
      continue
    rows.append({"size": group["size"].iloc[0], "n_params": n_params, "target": float(target),
                 "n_batch_sizes": group["batch_tokens"].nunique(), "chi2": res.chi2,
                 "dof": res.dof, "p_value": res.p_value, "flagged": res.flagged,
                 "reason": res.reason, "monotone_z": res.monotone_z})
  return pd.DataFrame(rows, columns=list(TABLE_COLUMNS))


def flag_fits(critical: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
  """fit.fit_targets' table with FLAG_COLUMNS from lack_of_fit_table (False, NaN where untested).

  A flagged target is kept, flagged instead of fitted through: the power laws leave it out.
  """
  tested = {(float(r.n_params), float(r.target)): r for r in table.itertuples()}
  found = [tested.get((float(n), float(t))) for n, t in zip(critical["n_params"],
                                                            critical["target"])]
  out = critical.drop(columns=[c for c in FLAG_COLUMNS if c in critical.columns])
  out["lack_of_fit"] = pd.Series([bool(r is not None and r.flagged) for r in found],
                                  index=out.index, dtype=bool)
  out["lack_of_fit_p"] = pd.Series([float(r.p_value) if r is not None else np.nan
                                    for r in found], index=out.index, dtype=float)
  out["lack_of_fit_reason"] = pd.Series([str(r.reason) if r is not None else "" for r in found],
                                        index=out.index, dtype=object)
  return out
