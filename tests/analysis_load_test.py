"""Tests for bscan.analysis.load: workdirs -> runs table, damaged runs load with warnings."""

import dataclasses
import json
import warnings

import numpy as np
import pytest

from bscan import workdir as wd
from bscan.analysis import load
from bscan.analysis import synthetic

Col = wd.Col
SCAN = synthetic.Scan(sizes=synthetic.DEFAULT_SIZES[1:2], batch_sequences=(16, 64, 256))
PLAN = synthetic.run_plan(SCAN, SCAN.sizes[0], 16, 1e-3, 0)


def _write_run(path, rows, status=wd.DONE):
  """A run written by the trainer's writers (bscan.workdir)."""
  last = rows[-1][Col.STEP] if rows else 0
  return synthetic.write_run(path, PLAN, synthetic.run_config(SCAN, SCAN.sizes[0], 16, 0), rows,
                             wd.Status(status, "", last, 0) if status else None)


def _rows(n=5):
  return [{Col.STEP: s, Col.TRAIN_LOSS: 3.0 - 0.1 * s} for s in range(1, n + 1)]


def _messages(record):
  return " ".join(str(w.message) for w in record)


def test_messy_sweep_loads_with_warnings(tmp_path):
  synthetic.write_sweep(tmp_path, SCAN, messy=True)
  with pytest.warns(load.RunWarning) as record:
    runs = load.load_runs(tmp_path)
  messages = _messages(record)
  for expected in ("metrics.jsonl:", "truncated last line", "status.json missing", "diverged",
                   "config.json is not valid JSON", "run skipped"):
    assert expected in messages, expected
  assert len(runs) == 4  # 3 scan points + a diverged run; the damaged config.json is skipped
  assert set(runs["status"]) == {wd.DONE, wd.RUNNING, load.UNKNOWN, wd.DIVERGED}
  assert runs["diverged"].sum() == 1
  assert runs["batch_tokens"].tolist() == sorted(runs["batch_tokens"])
  assert (runs["batch_tokens"] == runs["batch_sequences"] * 128).all()
  assert runs["name"].iloc[0] == "3m/b16/lr1e-3/s0"  # as the launchers lay a sweep out
  done = runs[runs["status"] == wd.DONE].iloc[0]
  assert np.all(np.diff(done[Col.STEP]) > 0)
  np.testing.assert_array_equal(done[Col.TOKENS], done[Col.STEP] * done["batch_tokens"])
  assert len(done[load.EVAL_STEP]) == len(done[Col.EVAL_LOSS]) > 10
  assert done["has_noise_scale"] and np.isnan(done[Col.B_NOISE_TOKENS]).all()


def test_truncated_last_line_keeps_earlier_records(tmp_path):
  path = _write_run(tmp_path / "run", _rows(), wd.RUNNING)
  text = (path / wd.METRICS).read_text()
  (path / wd.METRICS).write_text(text[:-7])
  with pytest.warns(load.RunWarning, match=r"metrics.jsonl:5: truncated last line"):
    row = load.load_run(path)
  np.testing.assert_array_equal(row[Col.STEP], [1, 2, 3, 4])
  assert row["status"] == wd.RUNNING


@pytest.mark.parametrize("line,problem", [("{not json", "not JSON"),
                                          ("[1, 2]", "a JSON list, not an object"),
                                          ('{"train_loss": 2.0}', "no integer 'step'")])
def test_damaged_metrics_line_is_reported_with_its_line_number(tmp_path, line, problem):
  path = _write_run(tmp_path / "run", _rows())
  lines = (path / wd.METRICS).read_text().splitlines()
  lines[2] = line
  (path / wd.METRICS).write_text("\n".join(lines) + "\n")
  with pytest.warns(load.RunWarning) as record:
    row = load.load_run(path)
  assert f"{path / wd.METRICS}:3: {problem}" in _messages(record)
  np.testing.assert_array_equal(row[Col.STEP], [1, 2, 4, 5])  # the rest still loads


@pytest.mark.parametrize("text", ["{\"config\": {", "[]", "{}", "\xff"])
def test_damaged_config_json_skips_the_run_with_a_warning(tmp_path, text):
  _write_run(tmp_path / "sweep" / "good", _rows())
  bad = _write_run(tmp_path / "sweep" / "bad", _rows())
  (bad / wd.CONFIG).write_bytes(text.encode("latin-1"))
  with pytest.warns(load.RunWarning) as record:
    runs = load.load_runs(tmp_path / "sweep")
  assert runs["name"].tolist() == ["good"]
  assert f"{bad / wd.CONFIG}" in _messages(record) and "run skipped" in _messages(record)


def test_damaged_status_json_reads_as_unknown(tmp_path):
  path = _write_run(tmp_path / "run", _rows())
  (path / wd.STATUS).write_text('{"status": "finished"}')
  with pytest.warns(load.RunWarning, match=r"status\.json.*'finished'.*status 'unknown'"):
    row = load.load_run(path)
  assert row["status"] == load.UNKNOWN and len(row[Col.STEP]) == 5


def test_metric_chunks_of_object_stores_load_in_order(tmp_path):
  """gs:// workdirs hold numbered chunk objects instead of one metrics.jsonl."""
  path = _write_run(tmp_path / "run", [])
  chunks = path / wd.METRICS_CHUNKS
  chunks.mkdir()
  rows = _rows(6)
  for i in range(3):
    (chunks / f"{i:08d}.jsonl").write_text(wd.encode_rows(rows[2 * i:2 * i + 2]))
  row = load.load_run(path)
  np.testing.assert_array_equal(row[Col.STEP], [1, 2, 3, 4, 5, 6])


def test_nulls_resumes_and_evals(tmp_path):
  rows = [{Col.STEP: 1, Col.TRAIN_LOSS: 3.0, Col.B_SIMPLE_TOKENS: None},
          {Col.STEP: 2, Col.TRAIN_LOSS: 2.9, Col.EVAL_LOSS: 3.1, Col.B_SIMPLE_TOKENS: 500.0},
          {Col.STEP: 3, Col.TRAIN_LOSS: 9.9},  # overwritten after the resume below
          {Col.STEP: 3, Col.TRAIN_LOSS: 2.8, Col.B_NOISE_TOKENS: 700.0},
          {Col.STEP: 4, Col.TRAIN_LOSS: float("nan")}]  # written as null
  path = _write_run(tmp_path / "run", rows, wd.DIVERGED)
  with pytest.warns(load.RunWarning, match="diverged"):
    row = load.load_run(path)
  np.testing.assert_array_equal(row[Col.STEP], [1, 2, 3, 4])
  np.testing.assert_array_equal(row[Col.TRAIN_LOSS][:3], [3.0, 2.9, 2.8])
  assert np.isnan(row[Col.TRAIN_LOSS][3]) and row["diverged"]
  assert np.isnan(row[Col.B_SIMPLE_TOKENS][0]) and row[Col.B_SIMPLE_TOKENS][1] == 500.0
  assert row[Col.B_NOISE_TOKENS][2] == 700.0
  np.testing.assert_array_equal(row[load.EVAL_STEP], [2])
  np.testing.assert_array_equal(row[Col.TOKENS], row[Col.STEP] * 16 * 128)  # filled from batch


def test_single_workdir_empty_dir_and_missing_config(tmp_path):
  _write_run(tmp_path / "sweep" / "a", _rows(1))
  assert len(load.load_runs(tmp_path / "sweep" / "a")) == 1  # a run workdir itself
  assert len(load.load_runs([str(tmp_path / "sweep")])) == 1
  (tmp_path / "empty").mkdir()
  with pytest.warns(load.RunWarning, match="no run workdirs"):
    assert load.load_runs(tmp_path / "empty").empty
  with pytest.warns(load.RunWarning, match="no config.json"):
    assert load.load_run(tmp_path / "empty") is None
  no_rows = _write_run(tmp_path / "no_rows", [], wd.FAILED)
  with pytest.warns(load.RunWarning) as record:
    assert len(load.load_run(no_rows)[Col.STEP]) == 0
  assert "no metric rows" in _messages(record) and "run failed (step 0)" in _messages(record)


def test_sweep_targets(tmp_path):
  assert load.read_sweep_targets(tmp_path) is None
  (tmp_path / "sweep.json").write_text(json.dumps({"targets": [2.0, 1.8]}))
  assert load.read_sweep_targets(tmp_path) == [2.0, 1.8]
  for damaged in ('{"targets": "2.0"}', "{targets"):
    (tmp_path / "sweep.json").write_text(damaged)
    with pytest.warns(load.RunWarning, match="sweep.json"):
      assert load.read_sweep_targets(tmp_path) is None


def test_simulated_runs_have_the_loaded_columns(tmp_path):
  synthetic.write_sweep(tmp_path, SCAN, messy=False)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # a clean sweep loads without any warning
    loaded = load.load_runs(tmp_path)
  assert list(synthetic.simulate_runs(SCAN).columns) == list(loaded.columns)
  for field in wd.plan_fields():  # the whole run plan reaches the table
    assert field in loaded.columns


def test_nested_workdirs_and_sweep_json_points(tmp_path):
  for rel in ("3m/b16/lr1e-3/s0", "3m/b64/lr1e-3/s0"):
    _write_run(tmp_path / rel, _rows(1))
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


def test_null_stop_targets_and_budgets_are_numeric():
  """Fixed-budget runs write target_loss = null; the column must be float NaN, not None."""
  rows = []
  for target, budget in ((None, None), (None, 1e6)):
    plan = dataclasses.replace(PLAN, target_loss=target, max_tokens=budget)
    rows.append(load.run_row(dataclasses.asdict(plan), {}, wd.Status(wd.DONE)))
  table = load.runs_table(rows)
  for key in ("target_loss", "max_tokens"):
    assert table[key].dtype == float, key
  assert table["vocab_size"].tolist() == [256, 256] and table["seq_len"].tolist() == [128, 128]
  assert table["target_loss"].isna().all()
  assert np.isnan(table["max_tokens"].iloc[0]) and table["max_tokens"].iloc[1] == 1e6


def test_analysis_names_no_run_file_status_or_metric_column_itself():
  """Run files are read through bscan.workdir only: a renamed file or column cannot go stale."""
  import pathlib
  statuses = [s for s in wd.STATUSES if s != wd.DIVERGED]  # 'diverged' is also a table column
  literals = [f'"{x}"' for x in (wd.CONFIG, wd.METRICS, wd.STATUS, *statuses, Col.STEP,
                                 Col.TRAIN_LOSS, Col.EVAL_LOSS, Col.B_SIMPLE_TOKENS,
                                 Col.B_NOISE_TOKENS)]
  for path in sorted(pathlib.Path(load.__file__).parent.glob("*.py")):
    code = "\n".join(line.split("#")[0] for line in path.read_text().splitlines()
                     if "set_xlabel(" not in line)  # an axis label may say 'step'

    found = [lit for lit in literals if lit in code]
    assert not found, f"{path.name} names {found}: use bscan.workdir's constants"
