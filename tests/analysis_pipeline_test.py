"""End-to-end tests with known ground truth: curves -> steps to target -> S/E fit -> power law."""

import json
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest

from bscan import workdir as wd
from bscan.analysis import lackoffit
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


# A scan with B_noise, and branches from a batch-16 reference at three checkpoints.
COMPARE = synthetic.Scan(sizes=synthetic.DEFAULT_SIZES[1:2],
                         batch_sequences=(8, 16, 32, 64, 128, 256),
                         targets=(1.8, 1.9, 2.0, 2.1, 2.2), loss_noise=0.005, b_noise_every=3)
BRANCHING = synthetic.Branching()


@pytest.fixture(scope="module")
def compare_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("compare")
  scan = synthetic.write_sweep(root / "scan", COMPARE, messy=False)
  return str(scan), str(synthetic.write_branches(root / "cmp", COMPARE, BRANCHING))


def test_scan_and_branches_end_to_end(compare_dirs):
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # clean runs: no warning at all
    both = pipeline.analyze(list(compare_dirs))
  alone = pipeline.analyze(compare_dirs[0])
  # branch runs change none of the scan's numbers
  assert len(both.runs) == len(alone.runs) == len(COMPARE.batch_sequences)
  for name in ("critical", "lack_of_fit", "noise_at_targets", "best_steps"):
    pd.testing.assert_frame_equal(getattr(both, name), getattr(alone, name))
  assert {k: f.as_dict() for k, f in both.power_laws.items()} == {
      k: f.as_dict() for k, f in alone.power_laws.items()}
  assert alone.branches is None and alone.summary()["branches"] is None
  # the branched CBS: one row per checkpoint, each interval holding the synthetic truth
  cbs = both.branches.cbs
  assert len(cbs) == len(BRANCHING.checkpoint_losses) and (cbs["n_replicates"] == 4).all()
  np.testing.assert_allclose(cbs["ref_loss"], BRANCHING.checkpoint_losses, atol=0.005)
  truth = [synthetic.true_local_cbs(COMPARE, BRANCHING, loss, both.epsilon)
           for loss in BRANCHING.checkpoint_losses]
  print("CBS truth", truth, "intervals", cbs[["cbs_lo", "cbs_hi"]].to_numpy().tolist())
  assert ((cbs["cbs_lo"] <= truth) & (truth <= cbs["cbs_hi"])).all()
  assert truth == [4096.0, 8192.0, 16384.0]  # an interior k at every checkpoint
  # noise scales at the targets: B_simple ~ B_crit(L), B_noise ~ 0.5 B_crit(L), all six runs
  at = both.noise_at_targets
  b_crit = COMPARE.truth.b_crit(at["target"].to_numpy())
  np.testing.assert_allclose(at["b_simple"], b_crit, rtol=0.1)
  np.testing.assert_allclose(at["b_noise"], COMPARE.b_noise_ratio * b_crit, rtol=0.2)
  assert (at["b_simple_n_runs"] == 6).all() and (at["b_noise_lo"] < at["b_noise"]).all()
  assert not both.critical["lack_of_fit"].any() and "3m" in both.e_min_law


def test_summary_carries_branch_noise_and_lack_of_fit_numbers(compare_dirs):
  result = pipeline.analyze(list(compare_dirs))
  summary = result.summary()
  json.dumps(summary)  # plain Python values (NaN is written as null by the report)
  first = summary["per_target"][0]
  crit, at = result.critical.iloc[0], result.noise_at_targets.iloc[0]
  assert (first["size"], first["target"]) == ("3m", 1.8)
  assert first["b_crit_ci"] == [crit["b_crit_lo"], crit["b_crit_hi"]]
  assert first["lack_of_fit_p"] == crit["lack_of_fit_p"] and first["lack_of_fit"] is False
  assert first["b_simple"] == at["b_simple"] and first["b_noise_n_runs"] == 6
  assert first["b_noise_range"] == [at["b_noise_lo"], at["b_noise_hi"]]
  branch = summary["branches"]
  assert (branch["epsilon"], branch["alpha"], branch["n_branch_runs"]) == (0.01, 0.1, 72)
  point = branch["checkpoints"][0]
  row = result.branches.cbs.iloc[0]
  assert point["ref_loss"] == row["ref_loss"] and point["n_replicates"] == 4
  assert point["cbs_ci"] == [row["cbs_lo"], row["cbs_hi"]]
  law = summary["e_min_law"]["3m"]
  assert law["beta_ci"][0] < law["beta"] < law["beta_ci"][1] and law["n_points"] == 5
  assert summary["lack_of_fit"]["min_log_sigma"] == 0.04 and summary["lack_of_fit"]["flagged"] == []


def test_epsilon_and_alpha_reach_the_branches(compare_dirs):
  loose = pipeline.analyze(list(compare_dirs), epsilon=0.05, branch_alpha=0.2)
  cbs = loose.branches.cbs
  assert (cbs["epsilon"] == 0.05).all() and (cbs["alpha"] == 0.2).all()
  truth = [synthetic.true_local_cbs(COMPARE, BRANCHING, loss, 0.05)
           for loss in BRANCHING.checkpoint_losses]
  assert ((cbs["cbs_lo"] <= truth) & (truth <= cbs["cbs_hi"])).all()
  assert loose.summary()["branches"]["epsilon"] == 0.05


def test_only_branch_runs_is_an_error(compare_dirs):
  with pytest.raises(ConfigError, match="only branch runs found in .*, no scan run; pass the "
                     "scan sweep too"):
    pipeline.analyze(compare_dirs[1])


@pytest.mark.parametrize("kwargs", [{"epsilon": 0.0}, {"epsilon": -0.01},
                                    {"epsilon": float("nan")}, {"branch_alpha": 0.0},
                                    {"branch_alpha": 1.0}])
def test_bad_epsilon_and_alpha_are_config_errors(kwargs):
  runs = synthetic.simulate_runs(synthetic.Scan(sizes=synthetic.DEFAULT_SIZES[1:2]))
  with pytest.raises(ConfigError, match="epsilon|branch_alpha"):
    pipeline.analyze(runs, targets=[2.0], **kwargs)


def test_a_flagged_target_stays_in_the_table_and_out_of_the_laws(monkeypatch):
  real = lackoffit.lack_of_fit_table

  def flag_2(*args, **kwargs):  # as if S(B) at L = 2.0 were no hyperbola
    table = real(*args, **kwargs)
    table.loc[table["target"] == 2.0, ["flagged", "p_value", "reason"]] = [
        True, 1e-4, lackoffit.E_FALLS]
    return table

  runs = synthetic.simulate_runs(RECOVERY)
  clean = pipeline.analyze(runs, targets=RECOVERY.targets)
  monkeypatch.setattr(lackoffit, "lack_of_fit_table", flag_2)
  result = pipeline.analyze(runs, targets=RECOVERY.targets)
  crit = result.critical
  assert len(crit) == 12 and crit["lack_of_fit"].tolist() == [t == 2.0 for t in crit["target"]]
  assert (crit.loc[crit["lack_of_fit"], "lack_of_fit_p"] == 1e-4).all()
  pd.testing.assert_frame_equal(crit.drop(columns=list(lackoffit.FLAG_COLUMNS)),
                                clean.critical.drop(columns=list(lackoffit.FLAG_COLUMNS)))
  assert result.power_laws["pooled"].n_points == clean.power_laws["pooled"].n_points - 2
  assert result.power_laws["3m"].n_points == 5 and result.e_min_law["3m"].n_points == 5
  assert result.summary()["lack_of_fit"]["flagged"] == [
      {"size": s, "target": 2.0, "p_value": 1e-4, "reason": lackoffit.E_FALLS}
      for s in ("3m", "10m")]
