"""End-to-end tests with known ground truth: curves -> steps to target -> S/E fit -> power law."""

import subprocess
import sys
import warnings

import numpy as np
import pytest

from bscan import workdir as wd
from bscan.analysis import load
from bscan.analysis import pipeline
from bscan.analysis import synthetic
from bscan.errors import ConfigError

# Low-noise scan, two model sizes, eight batch sizes around B_crit: a correctness check.
RECOVERY = synthetic.Scan(sizes=synthetic.DEFAULT_SIZES[1:],
                          batch_sequences=(4, 8, 16, 32, 64, 128, 256, 512),
                          targets=(1.7, 1.8, 1.9, 2.0, 2.1, 2.2), run_noise=0.005,
                          loss_noise=0.002)
# Noisy scan at six batch sizes for the coverage of the B_crit intervals.
COVERAGE = synthetic.Scan(sizes=synthetic.DEFAULT_SIZES[1:2],
                          batch_sequences=(8, 16, 32, 64, 128, 256), targets=(1.8, 2.0),
                          run_noise=0.05, loss_noise=0.01)


@pytest.mark.filterwarnings("ignore::bscan.analysis.load.RunWarning")
def test_recovers_b_crit_and_alpha_from_a_messy_sweep_on_disk(tmp_path):
  root = synthetic.write_sweep(tmp_path, RECOVERY, seed=0, messy=True)
  result = pipeline.analyze(str(root))
  assert result.targets_source == "sweep.json" and result.targets == list(RECOVERY.targets)
  crit = result.critical
  assert len(crit) == 12  # 2 sizes x 6 targets
  rel_err = crit["b_crit"] / RECOVERY.truth.b_crit(crit["target"]) - 1
  print("B_crit relative errors:", np.round(rel_err.to_numpy(), 4))  # max 0.019 at seed 0
  assert np.abs(rel_err).max() < 0.05
  for name, fit in result.power_laws.items():
    print(name, fit.kaplan_form(), "alpha_B", round(fit.alpha_b, 4))  # |error| <= 0.003
    assert abs(fit.alpha_b - RECOVERY.truth.alpha_b) < 0.02
    assert fit.alpha_b_ci[0] <= RECOVERY.truth.alpha_b <= fit.alpha_b_ci[1]
  assert set(result.power_laws) == {"pooled", "3m", "10m"}
  summary = result.summary()
  assert summary["runs_by_status"]["diverged"] == 1
  assert summary["power_law"]["pooled"]["formula"].startswith("B_crit = ")


def test_b_crit_interval_coverage_over_200_synthetic_scans():
  """>= 200 repetitions at 6 batch sizes, curves with loss and seed noise through the pipeline."""
  hits = []
  for seed in range(200):
    result = pipeline.analyze(synthetic.simulate_runs(COVERAGE, seed), targets=COVERAGE.targets)
    crit = result.critical
    true = COVERAGE.truth.b_crit(crit["target"])
    hits += list((crit["b_crit_lo"] <= true) & (true <= crit["b_crit_hi"]))
  coverage = float(np.mean(hits))
  print(f"coverage of 95% B_crit intervals: {coverage:.3f} over {len(hits)} fits")  # 0.960
  assert len(hits) == 400
  assert coverage >= 0.90


def test_targets_given_auto_and_eval():
  runs = synthetic.simulate_runs(synthetic.Scan(sizes=synthetic.DEFAULT_SIZES[1:2]))
  with pytest.warns(UserWarning, match="chose"):
    auto = pipeline.analyze(runs)
  assert auto.targets_source == "auto" and len(auto.critical) >= 3
  given = pipeline.analyze(runs, targets=[2.0, 1.8], loss="eval")
  assert given.targets == [1.8, 2.0] and given.targets_source == "given"
  assert given.loss == "eval" and len(given.critical) == 2


def test_no_runs_is_an_error(tmp_path):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", load.RunWarning)
    with pytest.raises(ValueError, match="no runs"):
      pipeline.analyze(str(tmp_path))


def test_import_does_not_pull_in_jax():
  code = "import sys, bscan.analysis; assert 'jax' not in sys.modules, 'jax imported'"
  subprocess.run([sys.executable, "-c", code], check=True)


def test_min_step_and_window_reach_the_noise_cloud_and_summary():
  runs = synthetic.simulate_runs(synthetic.Scan(sizes=synthetic.DEFAULT_SIZES[1:2]))
  result = pipeline.analyze(runs, targets=[1.8, 2.0], min_step=200.0, window=0.05)
  assert result.cloud["step"].min() >= 200  # was 10: the cloud ignored min_step
  assert len(result.cloud) > 100
  summary = result.summary()
  assert summary["min_step"] == 200.0 and summary["window"] == 0.05


def test_a_half_trained_run_holds_back_its_unreached_targets_and_says_so():
  scan = synthetic.Scan(sizes=synthetic.DEFAULT_SIZES[1:], targets=(1.8, 2.0, 2.2),
                        batch_sequences=(16, 32, 64, 128, 256), run_noise=0.0, loss_noise=0.003)
  runs = synthetic.simulate_runs(scan)
  idx = 0  # 3m, the smallest batch: stopped (preempted) between 2.0 and 1.8
  last = float(scan.truth.steps(1.9, runs.loc[idx, "batch_tokens"], scan.sizes[0]))
  keep = runs.loc[idx, wd.Col.STEP] <= last
  for key in (wd.Col.STEP, *load.CURVE_KEYS):
    runs.at[idx, key] = runs.loc[idx, key][keep]
  runs.at[idx, "status"] = wd.PREEMPTED
  result = pipeline.analyze(runs, targets=scan.targets)
  fitted = set(zip(result.critical["size"], result.critical["target"]))
  assert ("3m", 1.8) not in fitted and {("3m", 2.0), ("3m", 2.2), ("10m", 1.8)} <= fitted
  assert result.summary()["pending"] == [
      {"size": "3m", "target": 1.8, "runs": [runs.loc[idx, "name"]]}]


def test_bad_targets_and_confidence_are_config_errors():
  runs = synthetic.simulate_runs(synthetic.Scan(sizes=synthetic.DEFAULT_SIZES[1:2]))
  for kwargs in ({"targets": [-1.0]}, {"targets": [float("nan")]}, {"confidence": 1.5},
                 {"loss": "test"}):
    with pytest.raises(ConfigError):
      pipeline.analyze(runs, **{"targets": [2.0], **kwargs})
