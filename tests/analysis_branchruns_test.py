"""Tests for bscan.analysis.branchruns: branch run dirs to the input table of analyze_branches."""

import dataclasses
import os
import shutil

import numpy as np
import pytest

from bscan import workdir as wd
from bscan.analysis import branches
from bscan.analysis import branchruns
from bscan.analysis import load
from bscan.analysis import synthetic
from bscan.errors import ConfigError

SCAN = synthetic.Scan(sizes=synthetic.DEFAULT_SIZES[1:2], batch_sequences=(8, 16, 32, 64, 128),
                      targets=(1.8, 2.0, 2.2), loss_noise=0.005)
BRANCHING = synthetic.Branching()
REF_BATCH = BRANCHING.batch_sequences * SCAN.seq_len  # tokens


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
  root = tmp_path_factory.mktemp("branches")
  scan = synthetic.write_sweep(root / "scan", SCAN, messy=False)
  return scan, synthetic.write_branches(root / "cmp", SCAN, BRANCHING)


def _fresh(tmp_path, branching=BRANCHING):
  return synthetic.write_branches(tmp_path / "cmp", SCAN, branching)


def test_branch_runs_are_told_apart_from_scan_runs(sweeps):
  scan, branch_dir = sweeps
  runs, branch_runs = load.load_sweeps([scan, branch_dir])
  n_branches = len(BRANCHING.checkpoint_losses) * len(BRANCHING.ks) * BRANCHING.replicates
  assert len(runs) == len(SCAN.batch_sequences) and len(branch_runs) == n_branches
  assert "branch_from_workdir" not in runs.columns
  assert set(branch_runs["branch_from_workdir"]) == {"../reference"}
  assert len(load.load_runs([scan, branch_dir])) == len(runs)  # the scan's table only


def test_table_has_k_checkpoint_ref_loss_and_final_loss(sweeps):
  scan, branch_dir = sweeps
  runs, branch_runs = load.load_sweeps([scan, branch_dir])
  table = branchruns.branch_table(branch_runs, runs)
  assert list(table.columns) == list(branchruns.COLUMNS)
  assert len(table) == len(branch_runs)
  assert sorted(table["k"].unique()) == list(BRANCHING.ks)
  np.testing.assert_array_equal(table["batch_tokens"], table["k"] * REF_BATCH)
  steps = synthetic.checkpoint_steps(SCAN, BRANCHING)
  assert sorted(table["checkpoint_step"].unique()) == steps
  np.testing.assert_array_equal(table["checkpoint_tokens"], table["checkpoint_step"] * REF_BATCH)
  # ref_loss: the reference's smoothed train loss there, its true loss up to the smoothing's noise
  ref = table.groupby("checkpoint_step")["ref_loss"].first().to_numpy()
  print("ref_loss - truth:", ref - BRANCHING.checkpoint_losses)  # within 0.004
  np.testing.assert_allclose(ref, BRANCHING.checkpoint_losses, atol=0.005)
  assert set(table["reference"]) == {os.path.normpath(branch_dir.parent / "reference")}
  for row in table.itertuples():  # final_loss: the eval loss of the branch's last row
    rows, _ = wd.read_metrics(row.workdir)
    assert row.final_loss == rows[-1][wd.Col.EVAL_LOSS] and wd.Col.EVAL_LOSS not in rows[0]
  # the replicate offsets cancel in pairs: excess over k = 1 is the noise-free branches'
  for at, loss in zip(steps, BRANCHING.checkpoint_losses):
    part = table[table["checkpoint_step"] == at].pivot(index="replicate", columns="k",
                                                       values="final_loss")
    excess = (part.to_numpy() - part[[1]].to_numpy()).mean(axis=0)
    np.testing.assert_allclose(excess, synthetic.branch_excess(SCAN, BRANCHING, loss), atol=0.002)


def test_reference_among_the_scan_runs_is_the_one_used(sweeps):
  _, branch_dir = sweeps
  reference = branch_dir.parent / synthetic.REFERENCE
  runs, branch_runs = load.load_sweeps([reference, branch_dir])
  assert len(runs) == 1  # passed along, the reference is a scan run like any other
  from_disk = branchruns.branch_table(branch_runs, runs.iloc[:0])
  runs.at[0, wd.Col.TRAIN_LOSS] = runs.at[0, wd.Col.TRAIN_LOSS] + 1.0
  loaded = branchruns.branch_table(branch_runs, runs)
  np.testing.assert_allclose(loaded["ref_loss"], from_disk["ref_loss"] + 1.0)


def test_diverged_branch_is_nan_and_unfinished_ones_wait(tmp_path):
  small = dataclasses.replace(BRANCHING, checkpoint_losses=(2.1,), replicates=2)
  branch_dir = _fresh(tmp_path, small)
  runs, branch_runs = load.load_sweeps([branch_dir])
  k2 = branch_runs[branch_runs["batch_tokens"] == 2 * REF_BATCH]["workdir"].tolist()
  wd.write_status(k2[0], wd.DIVERGED, "non-finite loss", 10, 0)
  wd.write_status(k2[1], wd.RUNNING, "", 10, 0)
  with pytest.warns(load.RunWarning) as record:
    runs, branch_runs = load.load_sweeps([branch_dir])
    table = branchruns.branch_table(branch_runs, runs)
  messages = " ".join(str(r.message) for r in record)
  assert "beyond the local critical batch size" in messages  # the diverged one, when loaded
  assert "1 branch run(s) left out until they finish" in messages and "running" in messages
  assert len(table) == len(small.ks) * 2 - 1
  assert np.isnan(table.loc[table["workdir"] == k2[0], "final_loss"]).all()
  result = branches.analyze_branches(table)
  assert result.excess.loc[result.excess["k"] == 2, "decision"].item() == branches.BEYOND


def test_checkpoint_without_a_finished_k1_branch_is_left_out(tmp_path):
  small = dataclasses.replace(BRANCHING, checkpoint_losses=(2.1, 2.0), replicates=2)
  branch_dir = _fresh(tmp_path, small)
  runs, branch_runs = load.load_sweeps([branch_dir])
  first = min(synthetic.checkpoint_steps(SCAN, small))
  for w in branch_runs[(branch_runs["batch_tokens"] == REF_BATCH)
                       & (branch_runs["branch_from_step"] == first)]["workdir"]:
    wd.write_status(w, wd.RUNNING, "", 10, 0)
  runs, branch_runs = load.load_sweeps([branch_dir])
  with pytest.warns(load.RunWarning) as record:
    table = branchruns.branch_table(branch_runs, runs)
  messages = [str(r.message) for r in record]
  assert f"1 checkpoint(s) left out, no k = 1 branch finished yet: size 3m step {first}" in messages
  assert table["checkpoint_step"].unique().tolist() == [max(synthetic.checkpoint_steps(SCAN,
                                                                                         small))]


def test_missing_reference_is_one_clear_error(tmp_path):
  branch_dir = _fresh(tmp_path, dataclasses.replace(BRANCHING, checkpoint_losses=(2.1,),
                                                    ks=(1, 2), replicates=2))
  shutil.rmtree(branch_dir.parent / synthetic.REFERENCE)
  runs, branch_runs = load.load_sweeps([branch_dir])
  with pytest.raises(ConfigError, match=r"branch run .*/branches/at\d+/k1/replicate0: its "
                     r"reference .*reference \(branch.from_workdir='../reference'\) holds no run "
                     r"\(config.json missing\); pass the sweep that holds the reference"):
    branchruns.branch_table(branch_runs, runs)


def test_batch_that_is_no_multiple_of_the_reference_is_an_error(tmp_path):
  branch_dir = _fresh(tmp_path, dataclasses.replace(BRANCHING, checkpoint_losses=(2.1,),
                                                    ks=(1, 2), replicates=2))
  run = branch_dir / f"at{synthetic.checkpoint_steps(SCAN, BRANCHING)[0]}/k2/replicate0"
  config = wd.read_config(run)
  plan = dataclasses.replace(wd.RunPlan.from_dict(config.derived), batch_tokens=3 * 1024)
  wd.write_config(run, config.config, config.arg, plan)
  runs, branch_runs = load.load_sweeps([branch_dir])
  with pytest.raises(ConfigError, match="batch of 3072 tokens is not a whole multiple of its "
                     "reference .*'s 2048"):
    branchruns.branch_table(branch_runs, runs)
