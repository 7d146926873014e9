"""Tests for bscan.analysis.powerlaw: B_crit(L) = B* L^(-1/alpha_B) with intervals."""

import numpy as np
import pandas as pd
import pytest

from bscan.analysis import powerlaw

LOSSES = np.array([1.6, 1.7, 1.8, 1.9, 2.0, 2.2])


def test_noise_free_recovery_and_kaplan_form():
  fit = powerlaw.fit_power_law(LOSSES, 2.1e8 * LOSSES ** -4.8, np.full(6, 0.1))
  assert fit.b_star == pytest.approx(2.1e8, rel=1e-9)
  assert fit.exponent == pytest.approx(4.8, rel=1e-9)
  assert fit.alpha_b == pytest.approx(1 / 4.8, rel=1e-9)
  assert fit.kaplan_form() == "2.1e8 tokens · L^-4.80"
  np.testing.assert_allclose(fit.predict(LOSSES), 2.1e8 * LOSSES ** -4.8)
  assert fit.as_dict()["formula"] == "B_crit = 2.1e8 tokens · L^-4.80"


def test_exponent_interval_coverage():
  rng = np.random.default_rng(0)
  se = np.full(6, 0.1)
  n, hits_x, hits_alpha = 500, 0, 0
  for _ in range(n):
    b = 3e5 * LOSSES ** -4.0 * np.exp(se * rng.standard_normal(6))
    fit = powerlaw.fit_power_law(LOSSES, b, se)
    hits_x += fit.exponent_ci[0] <= 4.0 <= fit.exponent_ci[1]
    hits_alpha += fit.alpha_b_ci[0] <= 0.25 <= fit.alpha_b_ci[1]
  assert hits_x == hits_alpha  # the alpha interval is the exponent interval, inverted
  assert 0.93 <= hits_x / n <= 0.975  # measured 0.952


def test_per_size_and_pooled():
  rows = [{"size": s, "n_params": n, "target": L, "b_crit": 3e5 * L ** -4.0 * f,
           "log_b_crit_se": 0.1}
          for s, n, f in (("3m", 3e6, 1.02), ("10m", 1e7, 0.98)) for L in LOSSES]
  rows.append({"size": "30m", "n_params": 3e7, "target": 2.0, "b_crit": 2e4, "log_b_crit_se": 0.1})
  fits = powerlaw.fit_power_laws(pd.DataFrame(rows))
  assert list(fits) == ["pooled", "3m", "10m"]  # one target is not a line
  assert fits["pooled"].n_points == 13
  assert fits["3m"].b_star == pytest.approx(3e5 * 1.02, rel=1e-6)
  table = powerlaw.power_law_table(fits)
  assert table["fit"].tolist() == ["pooled", "3m", "10m"]


def test_too_few_points():
  with pytest.raises(ValueError, match=">= 2 distinct losses"):
    powerlaw.fit_power_law([2.0], [1e4])


def test_b_crit_growing_with_loss_gives_negative_alpha_and_a_flag():
  """Was alpha_B = inf and 'L^--2.00'."""
  rng = np.random.default_rng(1)
  b = 1e3 * LOSSES ** 2.0 * np.exp(0.01 * rng.standard_normal(6))
  fit = powerlaw.fit_power_law(LOSSES, b, np.full(6, 0.01))
  assert fit.exponent == pytest.approx(-2.0, abs=0.1)
  assert fit.alpha_b == pytest.approx(1 / fit.exponent) and fit.alpha_b < 0
  assert fit.alpha_b_ci[0] <= fit.alpha_b <= fit.alpha_b_ci[1] < 0
  assert fit.kaplan_form() == f"1.0e3 tokens · L^{-fit.exponent:.2f}"
  assert "--" not in fit.kaplan_form() and "increases with L" in fit.flag
  assert fit.as_dict()["flag"] == fit.flag
  assert powerlaw.fit_power_law(LOSSES, 2.1e8 * LOSSES ** -4.8, np.full(6, 0.1)).flag == ""


def test_figure_legend_sign():
  from bscan.analysis import figures
  up = powerlaw.fit_power_law(LOSSES, 1e3 * LOSSES ** 2.0, np.full(6, 0.01))
  assert figures.mathtext_form(up).endswith("$L^{2.00}$")  # was L^{--2.00}
  down = powerlaw.fit_power_law(LOSSES, 2.1e8 * LOSSES ** -4.8, np.full(6, 0.1))
  assert figures.mathtext_form(down).endswith("$L^{-4.80}$")
