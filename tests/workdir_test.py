"""A run's files: statuses, damaged files, metric rows and their resume, object-store chunks."""

from __future__ import annotations

import json
import os
import pathlib

import pytest

from bscan import workdir as workdir_lib
from bscan.errors import ConfigError


def _plan(**overrides) -> workdir_lib.RunPlan:
  fields = dict(arg="batch=8", size="tiny", n_params=1000, n_params_embedding=100, n_layer=1,
                d_model=16, seq_len=32, batch_sequences=8, batch_tokens=256, learning_rate=1e-3,
                seed=0, num_devices=1, per_device_sequences=8, num_microbatches=2,
                microbatch_sequences=4, microbatch_tokens=128, warmup_steps=0, max_steps=10,
                max_tokens=2560, target_loss=None, vocab_size=257, dataset="pystdlib",
                tokenizer="bytes")
  return workdir_lib.RunPlan(**{**fields, **overrides})


def test_status_round_trip_and_unknown_status(tmp_path):
  assert workdir_lib.read_status(tmp_path) is None
  workdir_lib.write_status(tmp_path, "preempted", "SIGTERM at step 7", 7, 896)
  status = workdir_lib.read_status(tmp_path)
  assert (status.status, status.step, status.tokens, status.final) == ("preempted", 7, 896, False)
  assert status.describe() == "preempted (step 7, SIGTERM at step 7)"
  with pytest.raises(ValueError, match="unknown status 'exploded'"):
    workdir_lib.write_status(tmp_path, "exploded", "", 0, 0)
  assert [p.name for p in tmp_path.iterdir()] == ["status.json"]  # no temporary file left


@pytest.mark.parametrize("text, message", [
    ('{"status": "done", "st', "status.json is not valid JSON"),
    ('["done"]', "holds a JSON list, not an object"),
    ('{"status": "finished"}', "status 'finished' is not one of"),
    ('{"status": "done", "step": "seven"}', "invalid literal"),
])
def test_damaged_status_names_file_and_fix(tmp_path, text, message):
  (tmp_path / "status.json").write_text(text)
  with pytest.raises(ConfigError, match=message) as e:
    workdir_lib.read_status(tmp_path)
  assert str(tmp_path / "status.json") in str(e.value) and "delete it and rerun" in str(e.value)
  damaged = workdir_lib.read_status_or_damaged(tmp_path)
  assert damaged.status == "failed" and message.split()[0] in damaged.reason


def test_config_round_trip_and_damage(tmp_path):
  plan = _plan()
  workdir_lib.write_config(tmp_path, {"seed": 0}, "batch=8", plan)
  saved = workdir_lib.read_config(tmp_path)
  assert saved.arg == "batch=8" and saved.config == {"seed": 0}
  assert workdir_lib.RunPlan.from_dict(saved.derived) == plan
  (tmp_path / "config.json").write_text('{"config": {"seed": 0}, "arg": "ba')
  with pytest.raises(ConfigError, match=r"config.json is not valid JSON .*use another --workdir"):
    workdir_lib.read_config(tmp_path)
  (tmp_path / "config.json").write_text('{"arg": "x"}')
  with pytest.raises(ConfigError, match="has no 'config' object"):
    workdir_lib.read_config(tmp_path)


def test_check_usable(tmp_path):
  workdir_lib.check_usable(tmp_path / "new" / "run")
  assert (tmp_path / "new" / "run").is_dir()
  (tmp_path / "file").write_text("x")
  with pytest.raises(ConfigError, match="is a file, not a directory"):
    workdir_lib.check_usable(tmp_path / "file")
  with pytest.raises(ConfigError, match="cannot be created"):
    workdir_lib.check_usable(tmp_path / "file" / "run")


def test_bad_lines_are_reported_with_line_numbers(tmp_path):
  (tmp_path / "metrics.jsonl").write_text(
      '{"step": 1, "train_loss": 2.0}\n[1, 2]\n{"train_loss": 1.0}\n{"step": 4}\n{"step": 5, "tr')
  rows, bad = workdir_lib.read_metrics(tmp_path)
  assert [r["step"] for r in rows] == [1, 4]
  assert [(b.line, b.last) for b in bad] == [(2, False), (3, False), (5, True)]
  assert "a JSON list, not an object" in str(bad[0]) and str(bad[0]).endswith(
      "metrics.jsonl:2: a JSON list, not an object")
  assert "no integer 'step'" in bad[1].problem
  assert not workdir_lib.torn_tail(bad) and workdir_lib.torn_tail(bad[2:])


def test_nan_is_null_and_resume_keeps_rows_up_to_the_checkpoint(tmp_path):
  writer = workdir_lib.MetricsWriter(tmp_path, tensorboard=False)
  for step in (1, 2, 3):
    writer.write({"step": step, "train_loss": float("nan") if step == 2 else 1.0 / step})
  writer.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 4, "train_lo')  # a kill mid-write
  assert workdir_lib.MetricsWriter(tmp_path, tensorboard=False).resume(2, 2) == 2
  rows, bad = workdir_lib.read_metrics(tmp_path)
  assert rows == [{"step": 1, "train_loss": 1.0}, {"step": 2, "train_loss": None}] and not bad
  assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_resume_refuses_rows_lost_before_the_checkpoint(tmp_path):
  """A truncated metrics.jsonl: the checkpoint at step 6 recorded 6 rows; 2 survive."""
  (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
  writer = workdir_lib.MetricsWriter(tmp_path, tensorboard=False)
  with pytest.raises(ConfigError, match=r"4 of the 6 rows logged up to the checkpoint at step 6 "
                                        r"are missing"):
    writer.resume(6, 6)
  assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'  # untouched


def test_resume_refuses_a_malformed_line_before_the_end(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n"step 2"\n{"step": 3}\n')
  writer = workdir_lib.MetricsWriter(tmp_path, tensorboard=False)
  with pytest.raises(ConfigError, match=r"metrics.jsonl:2: a JSON str, not an object \(1 "
                                        r"unreadable line\(s\) in all\); repair or delete"):
    writer.resume(3, None)


class ObjectStorePath:
  """A path on a fake object store: whole-object put/get/list/delete, no append, no rename.

  Backed by a local directory; counts the bytes moved so a test can check the traffic.
  """

  traffic = {"read": 0, "written": 0}

  def __init__(self, local: pathlib.Path, uri: str):
    self._local, self._uri = local, uri

  def __truediv__(self, name: str) -> ObjectStorePath:
    return ObjectStorePath(self._local / name, f"{self._uri}/{name}")

  def __fspath__(self) -> str:
    return self._uri

  __str__ = __fspath__

  @property
  def name(self) -> str:
    return self._local.name

  def exists(self) -> bool:
    return self._local.exists()

  def is_dir(self) -> bool:
    return self._local.is_dir()

  def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
    self._local.mkdir(parents=parents, exist_ok=exist_ok)

  def iterdir(self):
    return [self / p.name for p in sorted(self._local.iterdir())]

  def read_text(self) -> str:
    text = self._local.read_text()
    self.traffic["read"] += len(text)
    return text

  def write_text(self, text: str) -> None:
    self.traffic["written"] += len(text)
    self._local.write_text(text)

  def unlink(self) -> None:
    self._local.unlink()

  def open(self, mode: str = "r"):
    if "a" in mode:
      raise OSError("object stores cannot append")
    return self._local.open(mode)

  def replace(self, target):
    raise OSError("object stores cannot rename atomically")

  rename = replace


@pytest.fixture
def object_store(tmp_path, monkeypatch):
  """workdir_lib sees 'objstore://bucket/...' paths on the fake object store."""
  root = tmp_path / "bucket"
  root.mkdir()

  def as_path(workdir):
    workdir = os.fspath(workdir)
    if isinstance(workdir, str) and workdir.startswith("objstore://bucket"):
      return ObjectStorePath(root / workdir[len("objstore://bucket/"):], workdir)
    return pathlib.Path(workdir)

  monkeypatch.setattr(workdir_lib, "_path", as_path)
  ObjectStorePath.traffic.update(read=0, written=0)
  return "objstore://bucket/run"


def test_object_store_rows_cost_what_is_appended(object_store):
  """Each flush writes one new chunk object; nothing is read back while training."""
  writer = workdir_lib.MetricsWriter(object_store, remote_flush_rows=50, tensorboard=False)
  writer.resume(0, None)
  row_bytes = len(workdir_lib.encode_rows([{"step": 1, "train_loss": 1.0}]))
  for step in range(1, 1001):
    writer.write({"step": step, "train_loss": 1.0})
  writer.close()
  traffic = ObjectStorePath.traffic
  assert traffic["read"] == 0
  assert traffic["written"] < 1000 * (row_bytes + 2)  # linear in rows, not quadratic
  rows, bad = workdir_lib.read_metrics(object_store)
  assert [r["step"] for r in rows] == list(range(1, 1001)) and not bad
  assert len(writer._chunks()) == 20  # pylint: disable=protected-access


def test_object_store_resume_cuts_chunks_and_continues_numbering(object_store):
  writer = workdir_lib.MetricsWriter(object_store, remote_flush_rows=4, tensorboard=False)
  for step in range(1, 11):
    writer.write({"step": step})
  writer.close()  # chunks 0: 1-4, 1: 5-8, 2: 9-10
  writer = workdir_lib.MetricsWriter(object_store, remote_flush_rows=4, tensorboard=False)
  assert writer.resume(6, 6) == 6  # chunk 1 rewritten with 5-6, chunk 2 deleted
  for step in range(7, 9):
    writer.write({"step": step})
  writer.close()
  rows, _ = workdir_lib.read_metrics(object_store)
  assert [r["step"] for r in rows] == list(range(1, 9))
  assert [p.name for p in writer._chunks()] == [  # pylint: disable=protected-access
      "00000000.jsonl", "00000001.jsonl", "00000002.jsonl"]
  assert json.loads(writer._chunks()[2].read_text().splitlines()[0])["step"] == 7  # pylint: disable=protected-access


def test_a_branch_reference_is_relative_to_the_sweep_dir_holding_the_branch(tmp_path):
  sweep = tmp_path / "compare" / "branches"
  run = sweep / "at200" / "k2" / "replicate0"
  run.mkdir(parents=True)
  (sweep / workdir_lib.SWEEP_MARKER).write_text("{}")
  assert workdir_lib.branch_reference(run, "../scan/b8") == sweep / "../scan/b8"
  assert workdir_lib.branch_reference(run, "/abs/ref") == pathlib.Path("/abs/ref")
  lone = tmp_path / "lone" / "run"  # no sweep.json above it: relative to its parent
  assert workdir_lib.branch_reference(lone, "ref") == tmp_path / "lone" / "ref"
