"""Tests for bscan.analysis.load: workdirs -> runs table, damaged runs load with warnings."""

import json
import warnings

import numpy as np
import pytest

from bscan.analysis import load
from bscan.analysis import synthetic

SCAN = synthetic.Scan(sizes=synthetic.DEFAULT_SIZES[1:2], batch_sequences=(16, 64, 256))


def _write_run(path, records_text, status=None):
  config = synthetic.run_config(SCAN, SCAN.sizes[0], 16, 1e-3, 0)
  path.mkdir(parents=True)
  (path / "config.json").write_text(json.dumps(config))
  (path / "metrics.jsonl").write_text(records_text)
  if status:
    (path / "status.json").write_text(json.dumps(status))
  return path


def test_messy_sweep_loads_with_warnings(tmp_path):
  synthetic.write_sweep(tmp_path, SCAN, messy=True)
  with pytest.warns(load.RunWarning) as record:
    runs = load.load_runs(tmp_path)
  messages = " ".join(str(w.message) for w in record)
  for expected in ("truncated last line", "status.json missing", "diverged", "failed",
                   "metrics.jsonl missing"):
    assert expected in messages
  assert len(runs) == 5  # 3 scan points + a diverged and a failed run
  assert set(runs["status"]) == {"done", "running", "unknown", "diverged", "failed"}
  assert runs["diverged"].sum() == 1
  assert runs["batch_tokens"].tolist() == sorted(runs["batch_tokens"])
  assert (runs["batch_tokens"] == runs["batch_sequences"] * 128).all()
  done = runs[runs["status"] == "done"].iloc[0]
  assert np.all(np.diff(done["step"]) > 0)
  np.testing.assert_array_equal(done["tokens"], done["step"] * done["batch_tokens"])
  assert len(done["eval_step"]) == len(done["eval_loss"]) > 10
  assert done["has_noise_scale"] and np.isnan(done["b_noise_tokens"]).all()
  failed = runs[runs["status"] == "failed"].iloc[0]
  assert len(failed["step"]) == 0


def test_truncated_last_line_keeps_earlier_records(tmp_path):
  text = "\n".join(json.dumps({"step": s, "train_loss": 3.0 - 0.1 * s}) for s in range(1, 6))
  _write_run(tmp_path / "run", text[:-7], {"status": "running"})
  with pytest.warns(load.RunWarning, match="truncated last line 5"):
    row = load.load_run(tmp_path / "run")
  np.testing.assert_array_equal(row["step"], [1, 2, 3, 4])
  assert row["status"] == "running"


def test_nulls_resumes_and_evals(tmp_path):
  lines = [{"step": 1, "train_loss": 3.0, "b_simple_tokens": None},
           {"step": 2, "train_loss": 2.9, "eval_loss": 3.1, "b_simple_tokens": 500.0},
           {"step": 3, "train_loss": 9.9},  # overwritten after the resume below
           {"step": 3, "train_loss": 2.8, "b_noise_tokens": 700.0},
           {"step": 4, "train_loss": None}]
  _write_run(tmp_path / "run", "\n".join(map(json.dumps, lines)) + "\n", {"status": "diverged"})
  with pytest.warns(load.RunWarning, match="diverged"):
    row = load.load_run(tmp_path / "run")
  np.testing.assert_array_equal(row["step"], [1, 2, 3, 4])
  np.testing.assert_array_equal(row["train_loss"][:3], [3.0, 2.9, 2.8])
  assert np.isnan(row["train_loss"][3]) and row["diverged"]
  assert np.isnan(row["b_simple_tokens"][0]) and row["b_simple_tokens"][1] == 500.0
  assert row["b_noise_tokens"][2] == 700.0
  np.testing.assert_array_equal(row["eval_step"], [2])
  np.testing.assert_array_equal(row["tokens"], row["step"] * 16 * 128)  # filled from batch


def test_single_workdir_empty_dir_and_missing_config(tmp_path):
  line = json.dumps({"step": 1, "train_loss": 3.0})
  _write_run(tmp_path / "sweep" / "a", line, {"status": "done"})
  assert len(load.load_runs(tmp_path / "sweep" / "a")) == 1  # a run workdir itself
  assert len(load.load_runs([str(tmp_path / "sweep")])) == 1
  (tmp_path / "empty").mkdir()
  with pytest.warns(load.RunWarning, match="no run workdirs"):
    assert load.load_runs(tmp_path / "empty").empty
  with pytest.warns(load.RunWarning, match="no readable config.json"):
    assert load.load_run(tmp_path / "empty") is None


def test_sweep_targets(tmp_path):
  assert load.read_sweep_targets(tmp_path) is None
  (tmp_path / "sweep.json").write_text(json.dumps({"targets": [2.0, 1.8]}))
  assert load.read_sweep_targets(tmp_path) == [2.0, 1.8]


def test_simulated_runs_have_the_loaded_columns(tmp_path):
  synthetic.write_sweep(tmp_path, SCAN, messy=False)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # a clean sweep loads without any warning
    loaded = load.load_runs(tmp_path)
  assert list(synthetic.simulate_runs(SCAN).columns) == list(loaded.columns)


def test_nested_workdirs_and_sweep_json_points(tmp_path):
  line = json.dumps({"step": 1, "train_loss": 3.0})
  for rel in ("3m/b16/lr1e-3/s0", "3m/b64/lr1e-3/s0"):
    _write_run(tmp_path / rel, line, {"status": "done"})
  (tmp_path / "3m/b16/lr1e-3/s0/checkpoints/10").mkdir(parents=True)
  (tmp_path / "3m/b16/lr1e-3/s0/checkpoints/10/config.json").write_text("{}")  # not a run
  assert [str(p.relative_to(tmp_path)) for p in load.find_run_dirs(tmp_path)] == [
      "3m/b16/lr1e-3/s0", "3m/b64/lr1e-3/s0"]
  points = [{"relpath": r, "workdir": f"gs://elsewhere/{r}"}
            for r in ("3m/b16/lr1e-3/s0", "3m/b256/lr1e-3/s0")]
  (tmp_path / "sweep.json").write_text(json.dumps({"targets": [2.0], "points": points}))
  with pytest.warns(load.RunWarning, match="b256.*not started"):
    dirs = load.find_run_dirs(tmp_path)
  assert [str(p.relative_to(tmp_path)) for p in dirs] == ["3m/b16/lr1e-3/s0"]


def test_null_stop_targets_and_budgets_are_numeric(tmp_path):
  """Fixed-budget runs write target_loss = null; the column must be float NaN, not None."""
  config = synthetic.run_config(SCAN, SCAN.sizes[0], 16, 1e-3, 0)
  rows = []
  for target, budget in ((None, None), (None, 1e6)):
    config["derived"].update(target_loss=target, max_tokens=budget)
    rows.append(load.run_row(config, {}, {"status": "done"}))
  table = load.runs_table(rows)
  for key in ("target_loss", "max_tokens"):
    assert table[key].dtype == float, key
  assert table["vocab_size"].tolist() == [256, 256] and table["seq_len"].tolist() == [128, 128]
  assert table["target_loss"].isna().all()
  assert np.isnan(table["max_tokens"].iloc[0]) and table["max_tokens"].iloc[1] == 1e6
