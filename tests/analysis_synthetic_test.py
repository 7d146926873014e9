"""Tests for bscan.analysis.synthetic: the ground-truth model and the workdir format it writes."""

import dataclasses
import os

import numpy as np

from bscan import sweep
from bscan import workdir as wd
from bscan.analysis import synthetic

Col = wd.Col

SIZE = synthetic.DEFAULT_SIZES[1]


def test_truth_is_consistent():
  truth = synthetic.Truth()
  losses = np.array([1.7, 2.0, 2.4])
  np.testing.assert_allclose(truth.e_min(losses, SIZE) / truth.s_min(losses, SIZE),
                             truth.b_crit(losses))
  for b in (1024.0, 65536.0):
    steps = truth.steps(losses, b, SIZE)
    np.testing.assert_allclose(truth.loss_at(steps, b, SIZE), losses, rtol=1e-4)
  assert np.isinf(truth.s_min(SIZE.loss_floor - 0.1, SIZE))


def test_written_sweep_follows_the_contract(tmp_path):
  """The fake runs are written and read back by bscan.workdir, as the trainer's are."""
  scan = synthetic.Scan(sizes=(SIZE,), batch_sequences=(16, 64, 256))
  root = synthetic.write_sweep(tmp_path, scan, messy=False)
  recorded = sweep.read_sweep_json(str(root))
  assert recorded["targets"] == list(scan.targets)
  assert [p["relpath"] for p in recorded["points"]] == [
      "3m/b16/lr1e-3/s0", "3m/b64/lr1e-3/s0", "3m/b256/lr1e-3/s0"]
  run = root / "3m/b64/lr1e-3/s0"
  config = wd.read_config(run)
  assert config.arg == "size=3m,batch=64,lr=0.001,seed=0"
  plan = wd.RunPlan.from_dict(config.derived)
  assert plan.batch_tokens == 64 * 128 and plan.n_params == SIZE.n_params
  rows, bad = wd.read_metrics(run)
  assert not bad
  assert rows[0][Col.STEP] == 1 and rows[0][Col.B_SIMPLE_TOKENS] is None
  assert all(r[Col.TOKENS] == r[Col.STEP] * 64 * 128 for r in rows)
  assert sum(Col.EVAL_LOSS in r for r in rows) > 10
  status = wd.read_status(run)
  assert status.status == wd.DONE and status.step == rows[-1][Col.STEP]


def test_runs_stop_after_the_lowest_target_or_at_the_cap():
  scan = synthetic.Scan(sizes=(SIZE, synthetic.ModelSize("tiny", 100_000, 2.5)),
                        batch_sequences=(64,), run_noise=0.0, loss_noise=0.0)
  runs = synthetic.simulate_runs(scan)
  reached, capped = runs.iloc[1], runs.iloc[0]  # sorted by n_params: tiny first
  assert reached["final_train_loss"] < min(scan.targets)
  assert capped["last_step"] == scan.max_steps


def test_demo_sweep(tmp_path):
  path = synthetic.write_demo_sweep(tmp_path / "demo")
  assert (tmp_path / "demo" / "sweep.json").exists() and path == str(tmp_path / "demo")


def test_written_branches_follow_the_trainer_layout(tmp_path):
  scan = synthetic.Scan(sizes=(SIZE,), batch_sequences=(16, 64))
  branching = synthetic.Branching(checkpoint_losses=(2.1,), ks=(1, 4), replicates=2)
  branch_dir = synthetic.write_branches(tmp_path, scan, branching)
  at = synthetic.checkpoint_steps(scan, branching)[0]
  recorded = sweep.read_sweep_json(str(branch_dir))
  assert recorded["targets"] == [] and [p["relpath"] for p in recorded["points"]] == [
      f"at{at}/k{k}/replicate{r}" for k in (1, 4) for r in (0, 1)]
  run = branch_dir / f"at{at}/k4/replicate1"
  config = wd.read_config(run)
  assert config.config["branch"] == {"from_workdir": "../reference", "from_step": at,
                                     "replicate": 1}
  assert os.path.normpath(wd.branch_reference(run, "../reference")) == str(tmp_path / "reference")
  assert config.derived["batch_tokens"] == 4 * 16 * 128 and config.derived["target_loss"] is None
  rows, _ = wd.read_metrics(run)
  assert rows[-1][Col.STEP] == branching.delta_tokens // (4 * 16 * 128)  # Δ tokens at 4B
  assert [Col.EVAL_LOSS in r for r in rows] == [False] * (len(rows) - 1) + [True]
  assert wd.read_status(run).status == wd.DONE
  reference = wd.read_config(tmp_path / synthetic.REFERENCE)
  assert "branch" not in reference.config and reference.derived["batch_tokens"] == 16 * 128
  # the truth: excess over k = 1 grows with k; the CBS is the largest k*B within epsilon
  excess = synthetic.branch_excess(scan, branching, 2.1)
  assert excess[0] == 0 and excess[1] > 0
  assert synthetic.true_local_cbs(scan, branching, 2.1, excess[1] + 1e-9) == 4 * 16 * 128


def test_b_noise_terms_only_when_asked(tmp_path):
  scan = synthetic.Scan(sizes=(SIZE,), batch_sequences=(64,))
  rows, _ = wd.read_metrics(synthetic.write_sweep(tmp_path / "a", scan, messy=False)
                            / "3m/b64/lr1e-3/s0")
  assert not any(Col.B_NOISE_TOKENS in r or Col.TRHS in r for r in rows)
  with_noise = dataclasses.replace(scan, b_noise_every=4)
  rows, _ = wd.read_metrics(synthetic.write_sweep(tmp_path / "b", with_noise, messy=False)
                            / "3m/b64/lr1e-3/s0")
  cadence = [r for r in rows if Col.GHG in r]
  assert cadence[0][Col.STEP] == 10 and len(cadence) == len([r for r in rows
                                                               if r[Col.STEP] >= 10][::4])
