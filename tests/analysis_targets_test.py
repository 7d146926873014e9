"""Tests for bscan.analysis.targets: smoothing, steps to target, best over lr, auto targets."""

import numpy as np
import pandas as pd
import pytest

from bscan.analysis import synthetic
from bscan.analysis import targets


def _log_linear(step):
  return 4.0 - 0.25 * np.log(step)  # linear in log(step): a centred log window has no bias


def test_smoothing_has_no_lag_and_interpolation_is_exact():
  step = np.unique(np.round(np.geomspace(1, 1e5, 300)))
  for target_step in (37.0, 1234.5, 60000.0):
    target = float(_log_linear(target_step))
    got = targets.steps_to_target(step, _log_linear(step), target)
    assert got == pytest.approx(target_step, rel=1e-6)


def test_noisy_curve_is_not_biased_early():
  """A running minimum would cross early by ~noise/slope; isotonic smoothing does not."""
  rng = np.random.default_rng(0)
  step = np.arange(1, 20001, dtype=float)
  true_step, errors = 5000.0, []
  for _ in range(50):
    loss = _log_linear(step) + 0.05 * rng.standard_normal(len(step))
    errors.append(np.log(targets.steps_to_target(step, loss, _log_linear(true_step)) / true_step))
  assert abs(np.mean(errors)) < 0.01
  assert np.std(errors) < 0.03


def test_unreached_early_and_diverged_targets_are_nan():
  step = np.arange(1, 1001, dtype=float)
  loss = _log_linear(step)
  assert np.isnan(targets.steps_to_target(step, loss, 1.0))  # never reached: not extrapolated
  assert np.isnan(targets.steps_to_target(step, loss, float(_log_linear(5.0))))  # < min_step
  assert np.isnan(targets.steps_to_target(step, loss, 10.0))  # reached at the first point
  diverged = loss.copy()
  diverged[500:] = np.nan
  diverged[600:] = 0.0  # anything after the first NaN is ignored
  assert np.isnan(targets.steps_to_target(step, diverged, float(_log_linear(800.0))))
  reached = targets.steps_to_target(step, diverged, float(_log_linear(300.0)))
  assert reached == pytest.approx(300, rel=1e-3)


def test_single_downward_spike_does_not_reach_target():
  step = np.arange(1, 2001, dtype=float)
  loss = _log_linear(step)
  loss[100] -= 1.0  # one bad logged value
  reached = targets.steps_to_target(step, loss, float(_log_linear(1500.0)))
  assert reached == pytest.approx(1500, rel=0.02)


def test_best_steps_takes_fastest_learning_rate_and_seed():
  scan = synthetic.Scan(sizes=synthetic.DEFAULT_SIZES[1:2], batch_sequences=(16, 64, 256),
                        learning_rates=((1e-3, 1.0), (3e-4, 1.5)), seeds=(0, 1),
                        targets=(2.0,), run_noise=0.0, loss_noise=0.0)
  runs = synthetic.simulate_runs(scan)
  per_run = targets.steps_to_targets(runs, [2.0])
  best = targets.best_steps(per_run)
  assert len(per_run) == 12 and len(best) == 3
  assert (best["learning_rate"] == 1e-3).all()
  assert (best["n_candidates"] == 4).all()
  truth = scan.truth.steps(2.0, best["batch_tokens"].to_numpy(), scan.sizes[0])
  np.testing.assert_allclose(best["steps"], truth, rtol=0.01)


def test_choose_targets_within_reach_of_enough_batch_sizes():
  scan = synthetic.Scan(sizes=synthetic.DEFAULT_SIZES[1:2], loss_noise=0.005)
  runs = synthetic.simulate_runs(scan)
  chosen = targets.choose_targets(runs, n=5)
  assert chosen == sorted(chosen) and 3 <= len(chosen) <= 5
  best = targets.best_steps(targets.steps_to_targets(runs, chosen))
  assert (best.groupby("target")["batch_tokens"].nunique() >= 4).all()


def test_eval_loss_is_selectable():
  scan = synthetic.Scan(sizes=synthetic.DEFAULT_SIZES[1:2], batch_sequences=(32,), targets=(2.0,))
  runs = synthetic.simulate_runs(scan)
  train = targets.steps_to_targets(runs, [2.0], loss="train")["steps"].iloc[0]
  evals = targets.steps_to_targets(runs, [2.0], loss="eval")["steps"].iloc[0]
  assert evals > train  # eval loss sits 0.01 above train loss in the synthetic runs
  assert evals == pytest.approx(train, rel=0.2)
  with pytest.raises(KeyError):
    targets.steps_to_targets(pd.DataFrame(runs), [2.0], loss="test")


def test_targets_below_a_runs_own_stop_target_are_not_counted():
  """A run told to stop at 2.1 that overshot to 2.0 must not count for target 2.0."""
  scan = synthetic.Scan(sizes=synthetic.DEFAULT_SIZES[1:2], batch_sequences=(32,),
                        targets=(2.0,), run_noise=0.0, loss_noise=0.0)
  runs = synthetic.simulate_runs(scan)
  assert np.isfinite(targets.steps_to_targets(runs, [2.0])["steps"]).all()
  runs = runs.assign(target_loss=2.1)
  steps = targets.steps_to_targets(runs, [2.0, 2.1])["steps"].to_numpy()
  assert np.isnan(steps[0]) and np.isfinite(steps[1])
