"""S/E fit for one target loss: S(B) = S_min + E_min/B in log space, with closed-form intervals.

For a target loss L, S(B) is the number of steps a run at batch size B needs to first reach L.
Kaplan eq. 5.1 / McCandlish eq. 2.11: (S/S_min - 1)(E/E_min - 1) = 1 with E = B*S, i.e.
S(B) = S_min + E_min/B, and B_crit = E_min/S_min.

Why this estimator: run-to-run noise in S is multiplicative (a seed or a noisy loss curve shifts
the crossing by a fraction of the step, not by a fixed number of steps), so the fit minimises
squared errors of log S. An unweighted fit in S would be dominated by the smallest batches,
whose S is largest. The model is linear in (S_min, E_min) with regressor x = 1/B, so the
log-space fit is weighted least squares with weights 1/S_hat^2 at convergence (Gauss-Newton
below); standard errors come from the WLS covariance scaled by the residual variance, with
t-quantiles on n-2 degrees of freedom. B_crit is a ratio of the two coefficients: its interval is
Fieller's (exact under the linear model, and unbounded above when S_min is not significantly
positive, i.e. when no batch size in the scan is large enough to show saturation: flag
"unbounded"; empty, reported as (NaN, NaN) with flag "no_positive_b_crit", when S_min is
significantly negative, i.e. S(B) falls faster than 1/B and the model does not hold). A plain
percentile bootstrap covered a nominal 95% only ~89% of the time at 6 batch sizes; this
interval's coverage is measured in tests/analysis_fit_test.py.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

Interval = tuple[float, float]


class TooFewBatchSizesError(ValueError):
  """Raised when fewer than three distinct batch sizes reach a target loss."""


@dataclasses.dataclass(frozen=True)
class CriticalBatchFit:
  """Result of fitting S(B) = S_min + E_min/B; E_min and B_crit in the units of the batch sizes."""

  s_min: float
  e_min: float
  b_crit: float
  s_min_ci: Interval
  e_min_ci: Interval
  b_crit_ci: Interval
  s_min_se: float
  e_min_se: float
  log_b_crit_se: float  # delta-method s.e. of log(B_crit); nan when S_min or E_min <= 0
  b_crit_flag: str  # "" | "unbounded" (b_crit_ci reaches inf) | "no_positive_b_crit" (nan, nan)
  sigma: float  # residual s.d. of log S (relative scatter of steps around the fit)
  confidence: float
  n_points: int
  n_batch_sizes: int
  batch_sizes: np.ndarray
  steps: np.ndarray

  def predict_steps(self, batch_sizes: np.ndarray | float) -> np.ndarray:
    """Fitted steps to target at the given batch sizes."""
    return self.s_min + self.e_min / np.asarray(batch_sizes, dtype=float)

  def predict_examples(self, batch_sizes: np.ndarray | float) -> np.ndarray:
    """Fitted data (in batch units: tokens when B is in tokens) to target, E = B*S."""
    b = np.asarray(batch_sizes, dtype=float)
    return self.s_min * b + self.e_min


def _gauss_newton_log(x: np.ndarray, s: np.ndarray, iters: int = 50
                      ) -> tuple[np.ndarray, np.ndarray]:
  """Minimises sum (log s - log(a + b x))^2 over (a, b); returns (theta, mu)."""
  design = np.stack([np.ones_like(x), x], axis=1)
  # Start: WLS with weights 1/s^2 (the log fit linearised around the data).
  w = 1.0 / s
  theta = np.linalg.lstsq(design * w[:, None], s * w, rcond=None)[0]
  if np.any(design @ theta <= 0):  # fall back to a positive start
    theta = np.array([np.min(s) * 0.5, max(np.ptp(s) / max(np.ptp(x), 1e-30), 1e-30)])

  def rss(t: np.ndarray) -> float:
    mu = design @ t
    return np.inf if np.any(mu <= 0) else float(np.sum((np.log(s) - np.log(mu)) ** 2))

  current = rss(theta)
  for _ in range(iters):
    mu = design @ theta
    jac = design / mu[:, None]
    delta = np.linalg.lstsq(jac, np.log(s) - np.log(mu), rcond=None)[0]
    step = 1.0
    while step > 1e-6:  # step halving keeps a + b x > 0 and the objective decreasing
      cand = theta + step * delta
      new = rss(cand)
      if new <= current:
        break
      step *= 0.5
    else:
      break
    converged = abs(current - new) <= 1e-14 * max(current, 1e-30)
    theta, current = cand, new
    if converged:
      break
  return theta, design @ theta


NO_POSITIVE = "no_positive_b_crit"  # b_crit_flag: the confidence set has no positive part
UNBOUNDED = "unbounded"  # b_crit_flag: the confidence set reaches B_crit = inf


def _fieller(a: float, b: float, v_aa: float, v_bb: float, v_ab: float, t: float
             ) -> tuple[Interval, str]:
  """Fieller confidence set for b/a, restricted to positive values (B_crit > 0), and a flag.

  The set is {r: (b - r a)^2 <= t^2 Var(b - r a)}, i.e. qa r^2 - 2 qb r + qc <= 0. Its positive
  part is returned as one interval: (nan, nan) with flag NO_POSITIVE when it is empty (S_min or
  E_min significantly negative); an upper end of inf with flag UNBOUNDED when it is unbounded,
  including (0, r1] U [r2, inf), reported as (0, inf); else a bounded interval, flag "".
  """
  empty = ((np.nan, np.nan), NO_POSITIVE)
  qa = a * a - t * t * v_aa
  qb = a * b - t * t * v_ab
  qc = b * b - t * t * v_bb
  disc = qb * qb - qa * qc
  if qa > 0:  # a significantly non-zero: a bounded interval [r1, r2] around b/a
    root = np.sqrt(max(disc, 0.0))
    lo, hi = (qb - root) / qa, (qb + root) / qa
    return ((max(lo, 0.0), hi), "") if hi > 0 else empty
  if qa == 0:  # the quadratic degenerates to -2 qb r + qc <= 0
    if qb > 0:
      return (max(qc / (2 * qb), 0.0), np.inf), UNBOUNDED
    if qb < 0:
      return ((0.0, qc / (2 * qb)), "") if qc / (2 * qb) > 0 else empty
    return ((0.0, np.inf), UNBOUNDED) if qc <= 0 else empty
  # a not significantly non-zero: the set is the real line, or (-inf, r1] U [r2, inf).
  if disc <= 0:
    return (0.0, np.inf), UNBOUNDED
  root = np.sqrt(disc)
  r1, r2 = sorted(((qb - root) / qa, (qb + root) / qa))
  if r1 > 0:  # (0, r1] U [r2, inf): one interval cannot say it better than (0, inf)
    return (0.0, np.inf), UNBOUNDED
  return (max(r2, 0.0), np.inf), UNBOUNDED


def fit_critical_batch(batch_sizes: Sequence[float] | np.ndarray,
                       steps: Sequence[float] | np.ndarray,
                       confidence: float = 0.95) -> CriticalBatchFit:
  """Fits S(B) = S_min + E_min/B in log space; B_crit = E_min/S_min with intervals.

  Args:
    batch_sizes: batch size of each point (any unit: tokens in bscan); repeats allowed.
    steps: steps to reach the target at that batch size (non-finite entries are dropped).
    confidence: two-sided level of the reported intervals.

  Returns:
    CriticalBatchFit in the units of `batch_sizes` (E_min and B_crit) and steps (S_min).

  Raises:
    TooFewBatchSizesError: fewer than three distinct batch sizes with a finite, positive S.
  """
  b = np.asarray(batch_sizes, dtype=float).ravel()
  s = np.asarray(steps, dtype=float).ravel()
  if b.shape != s.shape:
    raise ValueError(f"batch_sizes and steps differ in length: {b.shape} vs {s.shape}")
  keep = np.isfinite(b) & np.isfinite(s) & (b > 0) & (s > 0)
  b, s = b[keep], s[keep]
  n_b = len(np.unique(b))
  if n_b < 3:
    raise TooFewBatchSizesError(
        f"S/E fit needs at least 3 distinct batch sizes that reach the target; got {n_b} "
        f"({np.unique(b).tolist()}).")
  x = 1.0 / b
  theta, mu = _gauss_newton_log(x, s)
  a, e = float(theta[0]), float(theta[1])
  n, dof = len(s), len(s) - 2
  resid = np.log(s) - np.log(mu)
  if dof > 0:
    sigma2 = float(np.sum(resid ** 2) / dof)
  else:  # n == 2 cannot happen (>= 3 distinct sizes); kept for safety
    sigma2 = np.nan
  jac = np.stack([1.0 / mu, x / mu], axis=1)  # d log mu / d(a, b): WLS design, weights 1/mu^2
  cov = sigma2 * np.linalg.pinv(jac.T @ jac)
  v_aa, v_bb, v_ab = float(cov[0, 0]), float(cov[1, 1]), float(cov[0, 1])
  t = float(stats.t.ppf(0.5 + confidence / 2, dof))
  se_a, se_e = np.sqrt(v_aa), np.sqrt(v_bb)
  if a > 0 and e > 0:
    b_crit = e / a
    log_se = float(np.sqrt(max(v_bb / e**2 + v_aa / a**2 - 2 * v_ab / (a * e), 0.0)))
  else:  # no saturation (S_min <= 0) or no data term: B_crit is not identified from this scan
    b_crit = np.inf if a <= 0 < e else np.nan
    log_se = np.nan
  b_crit_ci, flag = _fieller(a, e, v_aa, v_bb, v_ab, t)
  return CriticalBatchFit(
      s_min=a, e_min=e, b_crit=b_crit,
      s_min_ci=(a - t * se_a, a + t * se_a),
      e_min_ci=(e - t * se_e, e + t * se_e),
      b_crit_ci=b_crit_ci, s_min_se=float(se_a), e_min_se=float(se_e), log_b_crit_se=log_se,
      b_crit_flag=flag,
      sigma=float(np.sqrt(sigma2)), confidence=confidence, n_points=n, n_batch_sizes=n_b,
      batch_sizes=b, steps=s)


def delta_log_interval(fit: CriticalBatchFit) -> Interval:
  """Alternative B_crit interval: exp(log B_crit +- t * s.e.) by the delta method."""
  t = float(stats.t.ppf(0.5 + fit.confidence / 2, fit.n_points - 2))
  if not np.isfinite(fit.log_b_crit_se):
    return (np.nan, np.nan)
  return (fit.b_crit * np.exp(-t * fit.log_b_crit_se), fit.b_crit * np.exp(t * fit.log_b_crit_se))


class FitWarning(UserWarning):
  """A target could not be fitted for a model size (too few batch sizes reach it)."""


FIT_COLUMNS = ("size", "n_params", "target", "n_batch_sizes", "n_points", "s_min", "s_min_lo",
               "s_min_hi", "e_min", "e_min_lo", "e_min_hi", "b_crit", "b_crit_lo", "b_crit_hi",
               "log_b_crit_se", "sigma_log_steps", "b_crit_flag", "batch_sizes")


def fit_targets(best: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
  """S/E fit per (model size, target) from best steps (targets.best_steps); batches in tokens.

  Targets that fewer than three batch sizes reach are left out with a FitWarning; a fit whose
  B_crit confidence set has no positive part (b_crit_flag "no_positive_b_crit") is kept, with
  b_crit_lo = b_crit_hi = NaN, and warned about.
  """
  rows = []
  for (n_params, target), group in best.groupby(["n_params", "target"], sort=True):
    size = group["size"].iloc[0]
    try:
      fit = fit_critical_batch(group["batch_tokens"], group["steps"], confidence)
    except TooFewBatchSizesError as e:
      warnings.warn(f"size {size}, target {target:g}: not fitted: {e}", FitWarning, stacklevel=2)
      continue
    if fit.b_crit_flag == NO_POSITIVE:
      warnings.warn(f"size {size}, target {target:g}: no positive B_crit in the "
                    f"{confidence:.0%} confidence set (S_min = {fit.s_min:.3g} +- "
                    f"{fit.s_min_se:.2g}, E_min = {fit.e_min:.3g} +- {fit.e_min_se:.2g}): S(B) "
                    "does not follow S_min + E_min/B here", FitWarning, stacklevel=2)
    rows.append({
        "size": size, "n_params": n_params, "target": target,
        "n_batch_sizes": fit.n_batch_sizes, "n_points": fit.n_points,
        "s_min": fit.s_min, "s_min_lo": fit.s_min_ci[0], "s_min_hi": fit.s_min_ci[1],
        "e_min": fit.e_min, "e_min_lo": fit.e_min_ci[0], "e_min_hi": fit.e_min_ci[1],
        "b_crit": fit.b_crit, "b_crit_lo": fit.b_crit_ci[0], "b_crit_hi": fit.b_crit_ci[1],
        "log_b_crit_se": fit.log_b_crit_se, "sigma_log_steps": fit.sigma,
        "b_crit_flag": fit.b_crit_flag,
        "batch_sizes": " ".join(f"{b:g}" for b in np.unique(fit.batch_sizes))})
  table = pd.DataFrame(rows, columns=list(FIT_COLUMNS))
  numeric = [c for c in FIT_COLUMNS if c not in ("size", "b_crit_flag", "batch_sizes")]
  return table.astype({c: float for c in numeric})  # float even when empty
