"""Power law over targets: B_crit(L) = B* * L^(-1/alpha_B), fitted to log B_crit vs log L.

Weighted least squares on log B_crit with weights 1/se^2 from each target's S/E fit (relative
precision), and the covariance scaled by the reduced chi^2 of the scatter about the line, with
t-quantiles on n-2 dof. Estimates at different targets come from the same runs, so their errors
are positively correlated; taking the scale from the realised scatter rather than from the
propagated errors alone keeps the exponent's interval near nominal coverage (measured ~0.93-0.96
for 95% on synthetic scans; with the propagated errors as a floor it over-covered at 0.99-1.0).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

Interval = tuple[float, float]
POOLED = "pooled"


@dataclasses.dataclass(frozen=True)
class PowerLawFit:
  """B_crit(L) = b_star * L^(-exponent), exponent = 1/alpha_b; b_star in the units of B_crit."""

  b_star: float
  b_star_ci: Interval
  alpha_b: float
  alpha_b_ci: Interval
  exponent: float  # Kaplan's x in "B* tokens * L^-x"
  exponent_ci: Interval
  exponent_se: float
  log_b_star_se: float
  confidence: float
  n_points: int
  loss_range: Interval
  log_cov: tuple[tuple[float, float], tuple[float, float]]  # covariance of (log B*, -exponent)
  quantile: float  # t (or normal) quantile used for the intervals
  flag: str = ""  # why the fit does not read as a Kaplan-like decrease of B_crit with L, if so

  def predict(self, loss: np.ndarray | float) -> np.ndarray:
    """Fitted B_crit at loss L."""
    return self.b_star * np.asarray(loss, float) ** (-self.exponent)

  def predict_interval(self, loss: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """Pointwise confidence band of the fitted line at loss L."""
    x = np.log(np.asarray(loss, float))
    (v_cc, v_cs), (_, v_ss) = self.log_cov
    half = self.quantile * np.sqrt(v_cc + 2 * x * v_cs + x * x * v_ss)
    centre = self.predict(loss)
    return centre * np.exp(-half), centre * np.exp(half)

  def kaplan_form(self, unit: str = "tokens") -> str:
    """The fit written like Kaplan's legend, e.g. '2.1e8 tokens · L^-4.80' (or 'L^1.20')."""
    mantissa, exp10 = f"{self.b_star:.1e}".split("e")
    return f"{mantissa}e{int(exp10)} {unit} · L^{-self.exponent:.2f}"

  def as_dict(self) -> dict:
    """JSON-friendly summary (intervals as [lo, hi])."""
    d = dataclasses.asdict(self)
    d["formula"] = f"B_crit = {self.kaplan_form()}"
    d.pop("log_cov")
    d.pop("quantile")
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def fit_power_law(losses: Sequence[float] | np.ndarray, b_crit: Sequence[float] | np.ndarray,
                  log_se: Sequence[float] | np.ndarray | None = None,
                  confidence: float = 0.95) -> PowerLawFit:
  """Fits log B_crit = log B* - (1/alpha_B) log L, weighted by 1/log_se^2 when given."""
  x = np.log(np.asarray(losses, float))
  y = np.log(np.asarray(b_crit, float))
  se = np.ones_like(y) if log_se is None else np.asarray(log_se, float)
  keep = np.isfinite(x) & np.isfinite(y) & np.isfinite(se) & (se > 0)
  x, y, se = x[keep], y[keep], se[keep]
  n = len(x)
  if n < 2 or np.ptp(x) == 0:
    raise ValueError(f"power-law fit needs B_crit at >= 2 distinct losses; got {n} points")
  w = 1.0 / se**2
  design = np.stack([np.ones_like(x), x], axis=1)
  xtwx = design.T @ (design * w[:, None])
  coef = np.linalg.solve(xtwx, design.T @ (w * y))
  cov = np.linalg.inv(xtwx)
  if n > 2:  # scale from the scatter about the line (reduced chi^2), t on n-2 dof
    chi2_red = float(np.sum(w * (y - design @ coef) ** 2) / (n - 2))
    cov = cov * chi2_red
    q = float(stats.t.ppf(0.5 + confidence / 2, n - 2))
  else:  # two points fix the line: only the propagated per-target errors are left
    q = float(stats.norm.ppf(0.5 + confidence / 2))
  intercept, slope = float(coef[0]), float(coef[1])
  se_c, se_s = math.sqrt(cov[0, 0]), math.sqrt(cov[1, 1])
  exponent = -slope  # = 1/alpha_B
  x_lo, x_hi = exponent - q * se_s, exponent + q * se_s
  # alpha_B = 1/x over x in [x_lo, x_hi]. When that interval holds 0 the set is
  # (-inf, 1/x_lo] U [1/x_hi, inf): report the branch holding the estimate, open at its end.
  if x_lo > 0 or x_hi < 0:
    alpha_ci = (1.0 / x_hi, 1.0 / x_lo)
  elif exponent >= 0:
    alpha_ci = (1.0 / x_hi if x_hi > 0 else -math.inf, math.inf)
  else:
    alpha_ci = (-math.inf, 1.0 / x_lo if x_lo < 0 else math.inf)
  flag = ""
  if exponent < 0:
    flag = ("B_crit increases with L (exponent < 0, alpha_B < 0): not the decrease of Kaplan "
            "et al.; check the targets' fits")
  elif x_lo <= 0:
    flag = "exponent not significantly positive: alpha_B unbounded above"
  return PowerLawFit(
      b_star=math.exp(intercept),
      b_star_ci=(math.exp(intercept - q * se_c), math.exp(intercept + q * se_c)),
      alpha_b=1.0 / exponent if exponent != 0 else math.inf, alpha_b_ci=alpha_ci,
      exponent=exponent, exponent_ci=(x_lo, x_hi), exponent_se=se_s, log_b_star_se=se_c,
      confidence=confidence, n_points=n,
      loss_range=(float(np.exp(x.min())), float(np.exp(x.max()))),
      log_cov=((float(cov[0, 0]), float(cov[0, 1])), (float(cov[1, 0]), float(cov[1, 1]))),
      quantile=q, flag=flag)


def fit_power_laws(critical: pd.DataFrame, confidence: float = 0.95) -> dict[str, PowerLawFit]:
  """Power law per model size and pooled over sizes, from fit.fit_targets output."""
  ok = critical[np.isfinite(critical["b_crit"]) & np.isfinite(critical["log_b_crit_se"])]
  fits = {}
  groups = [(size, g) for _, g in ok.groupby("n_params", sort=True) for size in [g["size"].iloc[0]]]
  for name, group in [(POOLED, ok), *groups]:
    if group["target"].nunique() < 2:
      continue
    fits[str(name)] = fit_power_law(group["target"], group["b_crit"], group["log_b_crit_se"],
                                    confidence)
  return fits


KAPLAN = {"b_star": 2.1e8, "exponent": 4.8,
          "caveat": "Kaplan et al. 2020, Fig. 10: nats per GPT-2 BPE token on WebText2; "
                    "not comparable to losses in other tokenizers' units"}


def power_law_table(fits: dict[str, PowerLawFit]) -> pd.DataFrame:
  """One row per fit (pooled first): B*, alpha_B, Kaplan's exponent, with intervals."""
  rows = []
  for name, f in fits.items():
    rows.append({"fit": name, "formula": f"B_crit = {f.kaplan_form()}", "b_star": f.b_star,
                 "b_star_lo": f.b_star_ci[0], "b_star_hi": f.b_star_ci[1],
                 "alpha_b": f.alpha_b, "alpha_b_lo": f.alpha_b_ci[0],
                 "alpha_b_hi": f.alpha_b_ci[1], "exponent": f.exponent,
                 "exponent_lo": f.exponent_ci[0], "exponent_hi": f.exponent_ci[1],
                 "n_points": f.n_points, "flag": f.flag})
  return pd.DataFrame(rows)
