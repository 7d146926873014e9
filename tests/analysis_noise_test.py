"""Tests for bscan.analysis.noise: noise-scale measurements paired with the training loss."""

import numpy as np

from bscan.analysis import noise
from bscan.analysis import synthetic

SCAN = synthetic.Scan(sizes=synthetic.DEFAULT_SIZES[1:2], batch_sequences=(16, 256),
                      loss_noise=0.0, noise_scale_scatter=0.0)


def test_cloud_pairs_noise_scale_with_loss():
  runs = synthetic.simulate_runs(SCAN)
  cloud = noise.noise_scale_cloud(runs, max_points_per_run=40)
  assert list(cloud.columns) == list(noise.CLOUD_COLUMNS)
  assert cloud.groupby("batch_tokens").size().max() <= 40
  assert (cloud["step"] >= 10).all()
  # The synthetic B_simple equals B_crit(true loss): the pairing must reproduce it.
  expected = SCAN.truth.b_crit(cloud["train_loss"].to_numpy())
  np.testing.assert_allclose(cloud["b_simple_tokens"], expected, rtol=0.03)


def test_runs_without_noise_scale_are_skipped_and_b_noise_kept():
  runs = synthetic.simulate_runs(SCAN)
  runs.at[0, "b_simple_tokens"] = np.full(len(runs.at[0, "step"]), np.nan)
  runs.at[1, "b_noise_tokens"] = np.full(len(runs.at[1, "step"]), 1234.0)
  cloud = noise.noise_scale_cloud(runs)
  assert set(cloud["batch_tokens"]) == {runs.at[1, "batch_tokens"]}
  assert (cloud["b_noise_tokens"] == 1234.0).all()
  assert noise.noise_scale_cloud(runs.iloc[:0]).empty
