"""Run outputs: rows survive truncated lines and resumes; remote workdirs are written in batches."""

import json

import pytest

from bscan import metrics as metrics_lib


def test_truncated_last_line_is_dropped(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train_loss": 2.0}\n{"step": 2, "tr')
  assert metrics_lib.read_rows(tmp_path / "metrics.jsonl") == [{"step": 1, "train_loss": 2.0}]


def test_nan_is_written_as_null_and_truncate_keeps_earlier_rows(tmp_path):
  writer = metrics_lib.MetricsWriter(tmp_path)
  for step in (1, 2, 3):
    writer.write({"step": step, "train_loss": float("nan") if step == 2 else 1.0 / step})
  writer.truncate_after(2)
  writer.close()
  rows = metrics_lib.read_rows(tmp_path / "metrics.jsonl")
  assert rows == [{"step": 1, "train_loss": 1.0}, {"step": 2, "train_loss": None}]
  assert not (tmp_path / "metrics.jsonl.tmp").exists()


def test_remote_rows_are_buffered_until_flush(tmp_path, monkeypatch):
  monkeypatch.setattr(metrics_lib, "REMOTE_FLUSH_ROWS", 3)
  writer = metrics_lib.MetricsWriter(tmp_path)
  writer._remote = True  # pylint: disable=protected-access  (as for a gs:// workdir)
  writer.write({"step": 1})
  writer.write({"step": 2})
  assert not (tmp_path / "metrics.jsonl").exists()
  writer.write({"step": 3})  # the batch is full
  writer.write({"step": 4})
  writer.close()
  assert [r["step"] for r in metrics_lib.read_rows(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]


def test_status_round_trip(tmp_path):
  assert metrics_lib.read_status(tmp_path) is None
  metrics_lib.write_status(tmp_path, "diverged", "non-finite train loss at step 7", 7, 896)
  status = metrics_lib.read_status(tmp_path)
  assert (status["status"], status["step"], status["tokens"]) == ("diverged", 7, 896)
  with pytest.raises(AssertionError):
    metrics_lib.write_status(tmp_path, "exploded", "", 0, 0)
  assert json.loads((tmp_path / "status.json").read_text())["status"] == "diverged"
