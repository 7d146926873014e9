"""Tests for bscan.analysis.targets: smoothing, steps to target, best over lr, auto targets."""

import numpy as np
import pandas as pd
import pytest

from bscan import workdir as wd
from bscan.analysis import load
from bscan.analysis import synthetic
from bscan.analysis import targets

Col = wd.Col


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


# Logged every 10 steps: a local window holds ~15 points, so one bad value moves its mean.
SPARSE = np.arange(10, 3001, 10, dtype=float)


def _power(step):
  return 4.0 * step ** -0.15  # reaches 1.5 at step 691.7


def test_single_upward_spike_after_the_crossing_does_not_move_it():
  """Was 884.9 (+28%): the spike raised the local line and isotonic pooling carried it back."""
  clean = targets.steps_to_target(SPARSE, _power(SPARSE), 1.5)
  assert clean == pytest.approx(691.7, rel=1e-3)
  for spike_step in (720.0, 800.0, 1000.0):
    loss = _power(SPARSE)
    loss[np.searchsorted(SPARSE, spike_step)] += 2.0
    assert targets.steps_to_target(SPARSE, loss, 1.5) == pytest.approx(clean, rel=0.01)
  loss = _power(SPARSE)
  loss[np.searchsorted(SPARSE, 800.0) + np.arange(2)] += 2.0  # two consecutive bad values
  assert targets.steps_to_target(SPARSE, loss, 1.5) == pytest.approx(clean, rel=0.01)


def test_blow_up_after_the_crossing_does_not_unreach_the_target():
  """A run that reached 1.5 at ~692, then blew up over 5 logged points and hit NaN at 1500."""
  loss = _power(SPARSE)
  end = np.searchsorted(SPARSE, 1500.0)
  loss[end - 5:end] *= 3.0
  loss[end:] = np.nan
  assert targets.steps_to_target(SPARSE, loss, 1.5) == pytest.approx(691.7, rel=0.01)  # was NaN
  assert np.isnan(targets.steps_to_target(SPARSE, loss, 1.0))  # never reached before it diverged


def test_spikes_in_a_noisy_curve_do_not_bias_steps():
  rng = np.random.default_rng(3)
  step = SPARSE
  errors = []
  for _ in range(30):
    loss = _power(step) + 0.01 * rng.standard_normal(len(step))
    bad = rng.choice(len(step), 6, replace=False)
    loss[bad] += rng.choice([-1.0, 1.0], 6) * 1.5
    errors.append(np.log(targets.steps_to_target(step, loss, 1.5) / 691.7))
  assert abs(np.mean(errors)) < 0.02 and np.std(errors) < 0.05


def _runs_with_stop_targets(stop_targets):
  scan = synthetic.Scan(sizes=synthetic.DEFAULT_SIZES[1:2], batch_sequences=(32, 64),
                        targets=(2.0,), run_noise=0.0, loss_noise=0.0)
  runs = synthetic.simulate_runs(scan)
  return runs.assign(target_loss=pd.Series(stop_targets, index=runs.index, dtype=object))


def test_fixed_budget_runs_with_null_stop_targets():
  """config.json derived.target_loss = null (fixed-budget runs): a None column used to raise."""
  runs = _runs_with_stop_targets([None, None])
  steps = targets.steps_to_targets(runs, [2.0, 2.1])["steps"].to_numpy()
  assert np.isfinite(steps).all()
  assert steps[0] > steps[1] > 10  # 2.0 is reached after 2.1
  mixed = targets.steps_to_targets(_runs_with_stop_targets([None, 2.1]), [2.0, 2.1])
  # Run 0 (no stop target) counts at 2.0; run 1 (told to stop at 2.1) does not.
  np.testing.assert_array_equal(np.isfinite(mixed["steps"]), [True, True, False, True])
  np.testing.assert_allclose(mixed["steps"].iloc[:2], steps[:2])


def test_choose_targets_stays_above_the_runs_stop_targets():
  scan = synthetic.Scan(sizes=synthetic.DEFAULT_SIZES[1:2], loss_noise=0.005)
  runs = synthetic.simulate_runs(scan)  # the curves go down to ~1.57
  assert min(targets.choose_targets(runs, n=5)) < 1.9
  runs = runs.assign(target_loss=1.9)  # ... but each run was told to stop at 1.9
  chosen = targets.choose_targets(runs, n=5)
  assert min(chosen) >= 1.9 and len(chosen) >= 3
  best = targets.best_steps(targets.steps_to_targets(runs, chosen))
  assert (best.groupby("target")["batch_tokens"].nunique() >= 4).all()


@pytest.mark.parametrize("field,other", [("dataset", "owt"), ("tokenizer", "gpt2"),
                                         ("vocab_size", 50257), ("seq_len", 256)])
def test_runs_of_different_data_in_one_size_are_not_pooled(field, other):
  scan = synthetic.Scan(sizes=synthetic.DEFAULT_SIZES[1:2], batch_sequences=(16, 32, 64),
                        targets=(2.0,))
  runs = synthetic.simulate_runs(scan)
  runs.loc[0, field] = other
  with pytest.raises(ValueError, match=f"size 3m.*{field}"):
    targets.steps_to_targets(runs, [2.0])
  with pytest.raises(ValueError, match=f"{field}"):
    targets.choose_targets(runs)
  other_size = runs.assign(size="3m-owt", n_params=runs["n_params"] + 1)
  ok = pd.concat([runs.iloc[1:], other_size.iloc[:1]], ignore_index=True)
  assert len(targets.steps_to_targets(ok, [2.0])) == 3  # different sizes may differ


def test_skewed_noise_is_not_trimmed():
  """Small-batch losses are right-skewed; a median or downweighting would sit below the mean."""
  rng = np.random.default_rng(4)
  step = np.arange(1, 3001, dtype=float)
  noise = 0.25 * (rng.gamma(16.0, size=len(step)) - 16.0) / 4.0  # skewness 0.5, s.d. 0.25
  loss = _power(step) + noise
  robust = targets.smooth_log_window(step, loss)
  np.testing.assert_array_equal(robust, targets.smooth_log_window(step, loss, robust=False))
  loss[1000] += 3.0  # ... while a real outlier is dropped
  np.testing.assert_allclose(targets.smooth_log_window(step, loss)[[950, 1000, 1050]],
                             robust[[950, 1000, 1050]], atol=2e-3)


# --- unfinished runs: steps to a target are final once reached; the rest is pending ---

PENDING_SCAN = synthetic.Scan(sizes=synthetic.DEFAULT_SIZES[1:2],
                              batch_sequences=(16, 32, 64, 128, 256), targets=(1.8, 2.0, 2.2),
                              run_noise=0.0, loss_noise=0.003)


def _cut(runs, idx, status, at_loss):
  """Run `idx` as it was when its true loss first reached `at_loss`, now with `status`."""
  runs = runs.copy()
  run = runs.loc[idx]
  last = float(PENDING_SCAN.truth.steps(at_loss, run["batch_tokens"], PENDING_SCAN.sizes[0]))
  keep = run[Col.STEP] <= last
  for key in (Col.STEP, *load.CURVE_KEYS):
    runs.at[idx, key] = run[key][keep]
  keep_eval = run[load.EVAL_STEP] <= last
  for key in (load.EVAL_STEP, Col.EVAL_LOSS):
    runs.at[idx, key] = run[key][keep_eval]
  runs.at[idx, "status"] = status
  return runs


def test_unfinished_run_counts_for_reached_targets_and_holds_back_the_rest():
  done = synthetic.simulate_runs(PENDING_SCAN)
  running = _cut(done, 0, wd.RUNNING, at_loss=1.9)  # the smallest batch, between 2.0 and 1.8
  per_run = targets.steps_to_targets(running, PENDING_SCAN.targets)
  pending = targets.pending_targets(per_run)
  assert pending["target"].tolist() == [1.8]
  assert pending["runs"].tolist() == [[running.loc[0, "name"]]]
  assert pending["statuses"].tolist() == [[wd.RUNNING]]
  best = targets.best_steps(per_run)
  assert sorted(best["target"].unique()) == [2.0, 2.2]  # 1.8 is left out, not fitted on 4 sizes
  assert best.groupby("target")["batch_tokens"].nunique().tolist() == [5, 5]
  # Steps to the reached targets are what the finished run gives.
  full = targets.best_steps(targets.steps_to_targets(done, PENDING_SCAN.targets))
  full = full[full["target"] >= 2.0].reset_index(drop=True)
  np.testing.assert_allclose(best["steps"], full["steps"], rtol=1e-3)


@pytest.mark.parametrize("status", [wd.RUNNING, wd.FAILED, wd.PREEMPTED, load.UNKNOWN])
def test_every_unfinished_status_holds_back_unreached_targets(status):
  runs = _cut(synthetic.simulate_runs(PENDING_SCAN), 2, status, at_loss=2.1)
  pending = targets.pending_targets(targets.steps_to_targets(runs, PENDING_SCAN.targets))
  assert pending["target"].tolist() == [1.8, 2.0]


@pytest.mark.parametrize("status", [wd.DONE, wd.DIVERGED])
def test_ended_runs_hold_back_nothing(status):
  runs = _cut(synthetic.simulate_runs(PENDING_SCAN), 0, status, at_loss=2.1)
  per_run = targets.steps_to_targets(runs, PENDING_SCAN.targets)
  assert targets.pending_targets(per_run).empty
  best = targets.best_steps(per_run)
  assert best.groupby("target")["batch_tokens"].nunique().to_dict() == {1.8: 4, 2.0: 4, 2.2: 5}


def test_a_crossing_just_before_the_last_step_is_not_final_yet():
  """A running run whose smoothing window past the crossing is not yet logged is pending."""
  step = np.arange(1, 1001, dtype=float)
  runs = pd.DataFrame([{"name": "r", "status": wd.RUNNING, "size": "s", "n_params": 1.0,
                        "batch_tokens": 64.0, "learning_rate": 1e-3, "seed": 0,
                        Col.STEP: step, Col.TRAIN_LOSS: _log_linear(step)}])
  per_run = targets.steps_to_targets(runs, [float(_log_linear(s)) for s in (500.0, 950.0)])
  assert np.isfinite(per_run["steps"][0]) and not per_run["pending"][0]  # 500 * e^0.1 < 1000
  assert np.isnan(per_run["steps"][1]) and per_run["pending"][1]
