"""Tests for bscan.analysis.synthetic: the ground-truth model and the workdir format it writes."""

import json

import numpy as np

from bscan.analysis import synthetic

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
  scan = synthetic.Scan(sizes=(SIZE,), batch_sequences=(16, 64, 256))
  root = synthetic.write_sweep(tmp_path, scan, messy=False)
  assert json.loads((root / "sweep.json").read_text()) == {"targets": list(scan.targets)}
  run = root / "3m_b64_lr0.001_s0"
  config = json.loads((run / "config.json").read_text())
  assert config["arg"] == "size=3m,batch=64,lr=0.001,seed=0"
  derived = config["derived"]
  assert derived["batch_tokens"] == 64 * 128 and derived["n_params"] == SIZE.n_params
  records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  assert records[0]["step"] == 1 and records[0]["b_simple_tokens"] is None
  assert all(r["tokens"] == r["step"] * 64 * 128 for r in records)
  assert sum("eval_loss" in r for r in records) > 10
  status = json.loads((run / "status.json").read_text())
  assert status["status"] == "done" and status["step"] == records[-1]["step"]


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
