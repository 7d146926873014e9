"""B_crit against E_min: B_crit = c * E_min^beta per model size, fitted in log-log with intervals.

E_min(L), the tokens needed to reach a target at vanishing batch size, is the data axis on which
Zhang et al. 2024 ("How Does Critical Batch Size Scale in Pre-training?") and Bergsma et al. 2025
("Power Lines") describe the critical batch size: as a power of the data trained on, with model
size mattering little. Both numbers of a target come from its S/E fit (bscan.analysis.fit).

The fit is powerlaw.fit_power_law's with E_min in place of L (the same WLS of log B_crit with
weights 1/se^2 of each target's ln B_crit, the covariance scaled by the scatter about the line,
t on n-2 dof), so beta = -its exponent. E_min is taken as exact: its relative error is a part of
B_crit's (B_crit = E_min/S_min), which the weights already carry. Targets flagged for lack of
fit and targets without a finite B_crit are left out, as from the B_crit(L) power law.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import pandas as pd

from bscan.analysis import powerlaw

Interval = tuple[float, float]
POOLED = powerlaw.POOLED
TABLE_COLUMNS = ("fit", "formula", "c", "c_lo", "c_hi", "beta", "beta_lo", "beta_hi", "beta_se",
                 "n_points", "e_min_lo", "e_min_hi")


@dataclasses.dataclass(frozen=True)
class EMinLaw:
  """B_crit = c * E_min^beta, B_crit and E_min in tokens."""

  c: float
  c_ci: Interval
  beta: float
  beta_ci: Interval
  beta_se: float
  confidence: float
  n_points: int
  e_min_range: Interval
  line: powerlaw.PowerLawFit = dataclasses.field(repr=False)  # the same line, in L's clothes

  def predict(self, e_min: np.ndarray | float) -> np.ndarray:
    """Fitted B_crit (tokens) at E_min (tokens)."""
    return self.line.predict(e_min)

  def predict_interval(self, e_min: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """Pointwise confidence band of the fitted line at E_min."""
    return self.line.predict_interval(e_min)

  def formula(self) -> str:
    """e.g. 'B_crit = 3.1e-2 · E_min^0.52' (tokens)."""
    mantissa, exp10 = f"{self.c:.1e}".split("e")
    return f"B_crit = {mantissa}e{int(exp10)} · E_min^{self.beta:.2f}"

  def as_dict(self) -> dict:
    """JSON-friendly summary (intervals as [lo, hi])."""
    return {"c": self.c, "c_ci": list(self.c_ci), "beta": self.beta,
            "beta_ci": list(self.beta_ci), "beta_se": self.beta_se,
            "confidence": self.confidence, "n_points": self.n_points,
            "e_min_range": list(self.e_min_range), "formula": self.formula()}


def fit_e_min_law(e_min: Sequence[float] | np.ndarray, b_crit: Sequence[float] | np.ndarray,
                  log_se: Sequence[float] | np.ndarray | None = None,
                  confidence: float = 0.95) -> EMinLaw:
  """Fits log B_crit = log c + beta log E_min, weighted by 1/log_se^2 when given.

  Raises:
    ValueError: fewer than two distinct finite, positive E_min.
  """
  e = np.asarray(e_min, float)
  with np.errstate(divide="ignore", invalid="ignore"):
    e = np.where(e > 0, e, np.nan)  # log of a non-positive E_min: the point is left out
  try:
    line = powerlaw.fit_power_law(e, b_crit, log_se, confidence)
  except ValueError as err:  # its message speaks of losses
    raise ValueError(f"E_min law needs B_crit at >= 2 distinct E_min ({err})") from err
  lo, hi = line.exponent_ci
  return EMinLaw(c=line.b_star, c_ci=line.b_star_ci, beta=-line.exponent, beta_ci=(-hi, -lo),
                 beta_se=line.exponent_se, confidence=confidence, n_points=line.n_points,
                 e_min_range=line.loss_range, line=line)


def usable(critical: pd.DataFrame) -> pd.DataFrame:
  """The S/E fits a law may use: finite B_crit and s.e., not flagged for lack of fit."""
  ok = np.isfinite(critical["b_crit"]) & np.isfinite(critical["log_b_crit_se"])
  if "lack_of_fit" in critical.columns:
    ok &= ~critical["lack_of_fit"].astype(bool)
  return critical[ok]


def fit_e_min_laws(critical: pd.DataFrame, confidence: float = 0.95) -> dict[str, EMinLaw]:
  """Per model size, and pooled over sizes, from fit.fit_targets output (>= 2 targets each)."""
  ok = usable(critical)
  ok = ok[ok["e_min"] > 0]
  laws = {}
  groups = [(g["size"].iloc[0], g) for _, g in ok.groupby("n_params", sort=True)]
  for name, group in [(POOLED, ok), *groups]:
    if group["e_min"].nunique() < 2:
      continue
    laws[str(name)] = fit_e_min_law(group["e_min"], group["b_crit"], group["log_b_crit_se"],
                                    confidence)
  return laws


def e_min_law_table(laws: dict[str, EMinLaw]) -> pd.DataFrame:
  """One row per law (pooled first): c and beta with intervals, the E_min range fitted."""
  rows = [{"fit": name, "formula": law.formula(), "c": law.c, "c_lo": law.c_ci[0],
           "c_hi": law.c_ci[1], "beta": law.beta, "beta_lo": law.beta_ci[0],
           "beta_hi": law.beta_ci[1], "beta_se": law.beta_se, "n_points": law.n_points,
           "e_min_lo": law.e_min_range[0], "e_min_hi": law.e_min_range[1]}
          for name, law in laws.items()]
  return pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
