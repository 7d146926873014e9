"""Tests for bscan.nqm_theory: the exact NQM loss curves against sampled SGD, and the exact scan."""

import json
import subprocess
import sys

import numpy as np
import pytest

from bscan import nqm_theory as nt
from bscan.analysis import targets as targets_lib


def _sgd_monte_carlo(p: nt.Problem, batch: int, lr: float, steps: int, runs: int, seed: int
                     ) -> np.ndarray:
  """Per-run loss L(theta_{t-1}) for t = 1..steps of real minibatch SGD, float64[steps, runs]."""
  rng = np.random.default_rng(seed)
  theta = np.tile(p.theta0, (runs, 1))
  losses = np.empty((steps, runs))
  for t in range(steps):
    losses[t] = 0.5 * np.sum(p.h * theta ** 2, axis=1)  # logged before the update
    xi = rng.standard_normal((runs, batch, p.dim)) * np.sqrt(p.sigma2)  # per-example noise
    theta = theta - lr * (p.h * theta + xi.mean(axis=1))
  return losses


@pytest.mark.parametrize("lr", [0.3, 1.6])  # 1.6: the sharp directions overshoot (lr h > 1)
def test_expected_curve_matches_monte_carlo_sgd(lr):
  p = nt.make_problem(8, 20.0, 0.5, seed=3)
  losses = _sgd_monte_carlo(p, batch=4, lr=lr, steps=300, runs=4000, seed=7)
  expected = nt.expected_loss_curve(p, 4, lr, 300)
  assert expected[0] == pytest.approx(nt.loss(p, p.theta0), rel=1e-14)  # row 1: L(theta0)
  se = losses.std(axis=1, ddof=1) / np.sqrt(losses.shape[1])
  z = (losses.mean(axis=1) - expected)[1:] / se[1:]
  assert np.max(np.abs(z)) < 4.5, f"worst step {np.argmax(np.abs(z)) + 2}: z = {z.max():.2f}"
  # The noise floor is reached: the tail is noise-dominated, not still decaying.
  assert expected[-1] == pytest.approx(losses[-50:].mean(), rel=0.05)


def test_closed_form_matches_the_recursion():
  p = nt.make_problem(16, 1e3, 0.2, seed=1)
  batch, lr, steps = 3, 1.3, 5000
  m, curve = p.theta0 ** 2, []
  for _ in range(steps):
    curve.append(0.5 * np.sum(p.h * m))
    m = (1 - lr * p.h) ** 2 * m + lr ** 2 * p.sigma2 / batch
  np.testing.assert_allclose(nt.expected_loss_curve(p, batch, lr, steps), curve, rtol=1e-10)
  np.testing.assert_allclose(nt.second_moments(p, batch, lr, steps), m, rtol=1e-10)


def test_noise_scales_on_a_two_dimensional_example():
  p = nt.Problem(h=np.array([2.0, 0.5]), sigma2=np.array([0.3, 0.1]),
                 theta0=np.array([1.0, -2.0]))
  theta = p.theta0
  # G = H theta = (2, -1): |G|^2 = 5, G^T H G = 2*4 + 0.5*1 = 8.5; tr Sigma = 0.4,
  # tr(H Sigma) = 2*0.3 + 0.5*0.1 = 0.65; L = (2*1 + 0.5*4) / 2 = 2.
  assert nt.loss(p, theta) == pytest.approx(2.0, rel=1e-15)
  assert nt.b_simple(p, theta) == pytest.approx(0.08, rel=1e-15)
  assert nt.b_noise(p, theta) == pytest.approx(0.65 / 8.5, rel=1e-15)
  assert nt.b_noise(p, -theta) == nt.b_noise(p, theta)  # depends on theta^2 only
  assert nt.b_simple_from_moments(p, theta ** 2) == nt.b_simple(p, theta)


def test_fixed_point_is_the_noise_floor():
  p = nt.make_problem(8, 10.0, 0.3, seed=2)
  batch, lr = 2, 1.5  # the h = 1 direction contracts by (1 - 1.5)^2 per step, h = 0.1 by 0.72
  m_star = lr * p.sigma2 / (batch * p.h * (2 - lr * p.h))  # solves m = (1 - lr h)^2 m + lr^2 s/B
  np.testing.assert_allclose(nt.noise_floor_moments(p, batch, lr), m_star, rtol=1e-14)
  np.testing.assert_allclose(nt.second_moments(p, batch, lr, 2000), m_star, rtol=1e-12)
  curve = nt.expected_loss_curve(p, batch, lr, 2000)
  assert curve[-1] == pytest.approx(0.5 * np.sum(p.h * m_star), rel=1e-12)
  assert curve[-1] == pytest.approx(0.5 * 1.5 * 0.3 / 2 * np.sum(p.h / (2 - 1.5 * p.h)), rel=1e-12)
  # At the floor B_noise is a property of the run: (B / lr) sum h^2 / sum h^3 / (2 - lr h).
  assert nt.b_noise_from_moments(p, m_star) == pytest.approx(
      batch / lr * np.sum(p.h ** 2) / np.sum(p.h ** 3 / (2 - lr * p.h)), rel=1e-12)


def test_make_problem_documents_its_draws():
  p = nt.make_problem(64, 1e3, 0.25, seed=5)
  np.testing.assert_array_equal(p.theta0, np.random.default_rng(5).standard_normal(64))
  assert p.h[0] == 1.0 and p.h[-1] == pytest.approx(1e-3, rel=1e-12)
  assert np.all(np.diff(np.log(p.h)) == pytest.approx(np.log(1e-3) / 63, rel=1e-9))
  np.testing.assert_allclose(p.sigma2, 0.25 * p.h, rtol=0)
  assert p.theta0.dtype == p.h.dtype == np.float64


def test_learning_rate_at_or_above_two_over_h_max_raises():
  p = nt.make_problem(4, 10.0, 1.0)
  with pytest.raises(ValueError, match=r"lr=2\.0 "):
    nt.expected_loss_curve(p, 1, 2.0, 10)
  with pytest.raises(ValueError, match=r"lr=2\.5 "):
    nt.exact_scan(p, [1, 2, 4], [0.5, 2.5], [0.1], 100)
  nt.expected_loss_curve(p, 1, 1.999, 10)  # just below the cap: fine


SMALL = dict(dim=16, condition=30.0, noise=0.0022)  # B_crit 3-17 at the targets below
SMALL_BATCHES = [1, 2, 4, 8, 16, 32, 64]
SMALL_LRS = np.geomspace(0.01, 1.9, 10)


@pytest.fixture(scope="module")
def small_scan():
  p = nt.make_problem(SMALL["dim"], SMALL["condition"], SMALL["noise"])
  targets = nt.choose_targets(p, SMALL_LRS, n=4, first_step=20, span=10.0)
  return p, targets, nt.exact_scan(p, SMALL_BATCHES, SMALL_LRS, targets, 20_000)


def test_exact_scan_recovers_a_critical_batch(small_scan):
  _, targets, table = small_scan
  np.testing.assert_allclose(table["target"], targets)
  assert (table["n_batches_reaching"] == len(SMALL_BATCHES)).all()
  assert np.isfinite(table["b_crit"]).sum() >= 3
  assert (table["b_crit"] > 0).all() and (table["s_min"] > 0).all()
  assert (table["fit_sigma"] < 0.2).all()  # S(B) is close to S_min + E_min/B
  assert np.all(np.diff(table["b_crit"]) > 0)  # lower loss, larger B_crit
  steps = table[[f"steps_{b}" for b in SMALL_BATCHES]].to_numpy()
  assert np.all(np.diff(steps, axis=1) <= 1e-9 * steps[:, 1:])  # larger batch, fewer steps
  assert steps.min() >= 19  # choose_targets: no run reaches a target before GD's step 20
  best = table[[f"best_lr_{b}" for b in SMALL_BATCHES]].to_numpy()
  assert np.isin(best, SMALL_LRS).all()
  ratio = table["b_crit"] / table["b_noise"]
  assert ratio.between(0.5, 1.0).all(), ratio.tolist()
  # Golden values; update them when bscan.analysis.targets or .fit change the protocol.
  np.testing.assert_allclose(table["b_crit"], [2.6834, 5.1825, 9.6465, 17.445], rtol=1e-3)
  np.testing.assert_allclose(table["b_noise"], [3.4155, 7.0352, 13.515, 25.126], rtol=1e-3)


def test_exact_scan_cutting_curves_short_changes_nothing(small_scan):
  """The scan stops curves early; the protocol on the whole curve gives the same steps."""
  p, targets, table = small_scan
  for batch in (1, 64):
    for j, target in enumerate(targets):
      lr = table[f"best_lr_{batch}"].iloc[j]
      curve = nt.expected_loss_curve(p, batch, lr, 20_000)
      whole = targets_lib.steps_to_target(np.arange(1, 20_001.0), curve, target)
      assert table[f"steps_{batch}"].iloc[j] == pytest.approx(whole, rel=1e-9)


def test_exact_scan_noise_scales_are_expected_state_ratios(small_scan):
  p, targets, table = small_scan
  lr = table["best_lr_1"].iloc[0]
  curve = nt.expected_loss_curve(p, 1, lr, 20_000)
  t = int(np.argmax(curve <= targets[0]))
  m = nt.second_moments(p, 1, lr, t)
  assert table["b_noise"].iloc[0] == pytest.approx(
      np.sum(p.h * p.sigma2) / np.sum(p.h ** 3 * m), rel=1e-12)
  assert table["b_simple"].iloc[0] == pytest.approx(
      np.sum(p.sigma2) / np.sum(p.h ** 2 * m), rel=1e-12)
  assert table["b_ref"].iloc[0] == 1 and table["b_ref_large"].iloc[0] == 64


def test_calibrate_noise_puts_b_crit_where_asked():
  unit = nt.make_problem(SMALL["dim"], SMALL["condition"], 1.0)
  target = float(nt.choose_targets(unit, SMALL_LRS, n=1)[0]) / 3
  noise = nt.calibrate_noise(unit, SMALL_BATCHES, SMALL_LRS, target, 8.0, 20_000)
  p = nt.make_problem(SMALL["dim"], SMALL["condition"], noise)
  b_crit = nt.exact_scan(p, SMALL_BATCHES, SMALL_LRS, [target], 20_000)["b_crit"].iloc[0]
  assert b_crit == pytest.approx(8.0, rel=0.15)  # B_crit jumps as best lrs switch (10 lrs)


def test_nqm_table_binary_runs(tmp_path):
  out = tmp_path / "nqm.json"
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.nqm_table", "--dim=8", "--conditions=10,100",
       "--n_lrs=6", "--batches=1,4,16,64", "--n_targets=3", "--max_steps=20000",
       f"--json={out}"], capture_output=True, text=True, timeout=120, check=True)
  assert "B_crit/B_noise" in proc.stdout, proc.stdout
  results = json.loads(out.read_text())
  assert [r["condition"] for r in results] == [10.0, 100.0]
  for r in results:
    assert len(r["table"]) == 3
    assert all(row["crit_over_noise"] > 0 for row in r["table"]), r["table"]
