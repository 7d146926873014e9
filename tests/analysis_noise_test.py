"""Tests for bscan.analysis.noise: noise-scale measurements paired with the training loss."""

import dataclasses

import numpy as np
import pytest

from bscan import workdir as wd
from bscan.analysis import load
from bscan.analysis import noise
from bscan.analysis import synthetic

Col = wd.Col

SCAN = synthetic.Scan(sizes=synthetic.DEFAULT_SIZES[1:2], batch_sequences=(16, 256),
                      loss_noise=0.0, noise_scale_scatter=0.0)
PLAN = synthetic.run_plan(SCAN, SCAN.sizes[0], 8, 1e-3, 0)


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


def _tiny_runs():
  """Two noise-free runs of one size: loss = 3 - a ln(step); B_simple = c * step.

  Run 0 (a = 0.5, c = 100, steps 1-30) logs B_noise's terms, tr(H Sigma) = 500 g and G^T H G = g
  on every 3rd step; run 1 (a = 0.25, c = 10, steps 1-3500) logs only B_noise = 800 there.
  """
  rows = []
  for last, a, c in ((30, 0.5, 100.0), (3500, 0.25, 10.0)):
    step = np.arange(1, last + 1, dtype=float)
    cadence = np.where(step % 3 == 0, 1.0, np.nan)
    curves = {Col.STEP: step, Col.TRAIN_LOSS: 3 - a * np.log(step), Col.B_SIMPLE_TOKENS: c * step}
    if last == 30:
      curves.update({Col.TRHS: 500 * 0.02 * cadence, Col.GHG: 0.02 * cadence})
    else:
      curves[Col.B_NOISE_TOKENS] = 800 * cadence
    plan = dataclasses.replace(PLAN, batch_tokens=1024 * (len(rows) + 1))
    rows.append(load.run_row(dataclasses.asdict(plan), curves, wd.Status(wd.DONE)))
  return load.runs_table(rows)


def test_noise_at_targets_by_hand():
  table = noise.noise_at_targets(_tiny_runs(), [1.0, 1.5])
  assert list(table.columns) == list(noise.AT_TARGET_COLUMNS)
  # L = 1.5: run 0 reaches it at e^3 steps (B_simple 100 e^3), run 1 at e^6 (10 e^6)
  at = table.set_index("target").loc[1.5]
  b0, b1 = 100 * np.exp(3), 10 * np.exp(6)
  assert at["b_simple"] == pytest.approx(np.sqrt(b0 * b1), rel=1e-6)
  assert (at["b_simple_lo"], at["b_simple_hi"]) == (pytest.approx(b0), pytest.approx(b1))
  assert at["b_simple_n_runs"] == 2
  # B_noise: run 0 from its terms (500 g / g), run 1 from its logged ratio
  assert at["b_noise"] == pytest.approx(np.sqrt(500 * 800), rel=1e-6)
  assert at["b_noise_lo"] == pytest.approx(500) and at["b_noise_hi"] == pytest.approx(800)
  assert at["b_noise_n_runs"] == 2
  # L = 1.0: run 0 stops at loss 1.30, so only run 1 (at e^8 steps) counts
  at = table.set_index("target").loc[1.0]
  assert at["b_simple"] == pytest.approx(10 * np.exp(8), rel=1e-6)
  assert at["b_simple_n_runs"] == 1 and at["b_noise"] == pytest.approx(800)


def test_noise_at_targets_leaves_out_unreached_and_unmeasured():
  runs = _tiny_runs()
  table = noise.noise_at_targets(runs, [0.5, 1.5])
  assert table["target"].tolist() == [1.5]  # no run reaches 0.5
  runs.at[1, Col.B_NOISE_TOKENS] = np.full(len(runs.at[1, Col.STEP]), np.nan)
  runs.at[0, Col.GHG] = np.zeros(0)  # terms not logged: run 0 falls back to its (absent) ratio
  at = noise.noise_at_targets(runs, [1.5]).iloc[0]
  assert np.isnan(at["b_noise"]) and at["b_noise_n_runs"] == 0 and at["b_simple_n_runs"] == 2


def test_synthetic_b_noise_is_recovered_at_targets():
  scan = dataclasses.replace(SCAN, loss_noise=0.003, b_noise_every=3, b_noise_term_noise=0.0)
  runs = synthetic.simulate_runs(scan)
  table = noise.noise_at_targets(runs, [1.8, 2.0, 2.2])
  truth = scan.truth.b_crit(table["target"].to_numpy())
  np.testing.assert_allclose(table["b_simple"], truth, rtol=0.03)  # no scatter in B_simple here
  # B_noise from its noise-free terms on a sparse cadence: the smoothing adds no bias
  np.testing.assert_allclose(table["b_noise"], scan.b_noise_ratio * truth, rtol=0.01)
  assert (table["b_noise_n_runs"] == 2).all()
