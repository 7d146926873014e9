"""Tests for bscan.analysis.eminlaw: B_crit = c * E_min^beta with intervals."""

import numpy as np
import pandas as pd
import pytest

from bscan.analysis import eminlaw

E_MIN = np.geomspace(1e6, 1e8, 6)  # tokens
C, BETA = 30.0, 0.45


def test_noise_free_recovery():
  law = eminlaw.fit_e_min_law(E_MIN, C * E_MIN ** BETA, np.full(6, 0.1))
  assert law.c == pytest.approx(C, rel=1e-9) and law.beta == pytest.approx(BETA, rel=1e-9)
  assert law.n_points == 6 and law.e_min_range == pytest.approx((1e6, 1e8))
  np.testing.assert_allclose(law.predict(E_MIN), C * E_MIN ** BETA)
  assert law.formula() == "B_crit = 3.0e1 · E_min^0.45"
  assert law.as_dict()["beta_ci"] == pytest.approx([BETA, BETA])


def test_recovers_a_known_exponent_with_noise_and_its_interval_covers_it():
  rng = np.random.default_rng(0)
  se = np.full(6, 0.1)
  n, hits, betas = 500, 0, []
  for _ in range(n):
    b_crit = C * E_MIN ** BETA * np.exp(se * rng.standard_normal(6))
    law = eminlaw.fit_e_min_law(E_MIN, b_crit, se)
    hits += law.beta_ci[0] <= BETA <= law.beta_ci[1]
    betas.append(law.beta)
    lo, hi = law.predict_interval(E_MIN)
    assert np.all(lo < law.predict(E_MIN)) and np.all(law.predict(E_MIN) < hi)
  print(f"beta: mean {np.mean(betas):.4f}, coverage {hits / n:.3f}")  # 0.4493, 0.950
  assert abs(np.mean(betas) - BETA) < 0.005
  assert 0.93 <= hits / n <= 0.975


def _critical(sizes=(("3m", 3.2e6, 1.0), ("10m", 1e7, 1.1))):
  rows = [{"size": s, "n_params": n, "target": 2.0 - 0.1 * i, "e_min": e * f,
           "b_crit": C * (e * f) ** BETA, "log_b_crit_se": 0.1, "lack_of_fit": False}
          for s, n, f in sizes for i, e in enumerate(E_MIN)]
  return pd.DataFrame(rows)


def test_per_size_and_pooled_leave_out_flagged_and_non_finite():
  critical = _critical()
  critical.loc[0, "lack_of_fit"] = True
  critical.loc[0, "b_crit"] = 1e12  # an outlier, but flagged: it must not count
  critical.loc[1, "b_crit"] = np.inf  # S_min <= 0: no B_crit
  laws = eminlaw.fit_e_min_laws(critical)
  assert list(laws) == ["pooled", "3m", "10m"]
  assert laws["3m"].n_points == 4 and laws["10m"].n_points == 6 and laws["pooled"].n_points == 10
  assert laws["3m"].beta == pytest.approx(BETA) and laws["pooled"].beta == pytest.approx(BETA)
  table = eminlaw.e_min_law_table(laws)
  assert list(table.columns) == list(eminlaw.TABLE_COLUMNS)
  assert table["fit"].tolist() == ["pooled", "3m", "10m"]


def test_one_target_is_no_law():
  critical = _critical((("3m", 3.2e6, 1.0),)).iloc[:1]
  assert eminlaw.fit_e_min_laws(critical) == {}
  with pytest.raises(ValueError, match=">= 2 distinct E_min"):
    eminlaw.fit_e_min_law([1e6], [1e4])
