"""Tests for bscan.datasets: the exact pystdlib file set, splits, build determinism."""

import dataclasses
import os
import pathlib
import pickle
import subprocess
import sys

from conftest import PYSTDLIB_TEST_FILES
from etils import epath
import pytest
import tensorflow_datasets as tfds

from bscan import datasets
from bscan.errors import ConfigError


@pytest.mark.parametrize("relpath, is_test", [
    ("test/test_os.py", True), ("test/support/__init__.py", True),
    ("unittest/test/test_case.py", True), ("idlelib/idle_test/htest.py", True),
    ("lib2to3/tests/data/bom.py", True), ("tkinter/test/runtktests.py", True),
    ("doctest.py", False), ("unittest/case.py", False), ("test_like_name.py", False),
    ("idlelib/testing.py", False),
])
def test_is_test_path(relpath, is_test):
  assert datasets.is_test_path(relpath) == is_test


def test_stdlib_file_set_rule():
  """Exactly *.py under the stdlib dir, never under *-packages nor build-generated; tests in
  or out."""
  root = pathlib.Path(datasets.stdlib_dir())
  expected = set()
  for p in root.rglob("*.py"):
    rel = p.relative_to(root).as_posix()
    dirs = rel.split("/")[:-1]
    if (not any(d.endswith("-packages") or d.startswith("config-") for d in dirs)
        and not p.name.startswith("_sysconfigdata_") and p.is_file()):
      expected.add(rel)
  with_tests = datasets.stdlib_files(include_tests=True)
  without = datasets.stdlib_files(include_tests=False)
  assert set(with_tests) == expected
  assert with_tests == sorted(with_tests)
  assert set(without) == {p for p in expected if not datasets.is_test_path(p)}
  assert "os.py" in without
  if (root / "test" / "test_os.py").is_file():  # Debian ships the stdlib tests apart
    assert any(datasets.is_test_path(p) for p in with_tests)
    assert "test/test_os.py" in with_tests
  assert not any("-packages" in p for p in with_tests)
  assert not any("sysconfigdata" in p or p.startswith("config-") for p in with_tests)


def test_max_files_is_a_deterministic_spread_subset():
  sub = datasets.stdlib_files(False, max_files=PYSTDLIB_TEST_FILES)
  assert sub == datasets.stdlib_files(False, max_files=PYSTDLIB_TEST_FILES)
  assert len(sub) == PYSTDLIB_TEST_FILES
  assert set(sub) <= set(datasets.stdlib_files(False))
  assert len({p.split("/")[0] for p in sub}) > 50  # hash order: not one alphabetical run


def test_split_files_is_deterministic_disjoint_and_never_empty():
  files = datasets.stdlib_files(False)
  splits = datasets.split_files(files)
  assert not set(splits["train"]) & set(splits["validation"])
  assert sorted(splits["train"] + splits["validation"]) == sorted(files)
  assert 0.01 < len(splits["validation"]) / len(files) < 0.04
  # A path's split never depends on which other files are present.
  sub = datasets.split_files(files[::3])
  assert set(sub["validation"]) == set(splits["validation"]) & set(files[::3])
  assert len(datasets.split_files(["a.py", "b.py"])["validation"]) == 1


def test_config_names_distinguish_subsets():
  names = {datasets.pystdlib_config_name(t, m) for t in (False, True) for m in (0, 150)}
  assert len(names) == 4


def _records(data_dir, split):
  src = datasets.pystdlib_source(False, PYSTDLIB_TEST_FILES, data_dir, split)
  return [(r["path"], r["text"]) for r in src]


def test_build_is_deterministic_and_fingerprinted(pystdlib_cfg, tmp_path):
  first = epath.Path(pystdlib_cfg.data.data_dir)
  second = epath.Path(tmp_path)
  for split in ("train", "validation"):
    assert _records(first, split) == _records(second, split)
  fp = datasets.pystdlib_fingerprint(False, PYSTDLIB_TEST_FILES, first)
  assert fp == datasets.pystdlib_fingerprint(False, PYSTDLIB_TEST_FILES, second)
  files = datasets.stdlib_files(False, PYSTDLIB_TEST_FILES)
  assert fp == datasets.fingerprint(datasets.stdlib_dir(), files)
  assert fp.num_files == len(files)
  assert fp.num_bytes == sum(os.path.getsize(os.path.join(datasets.stdlib_dir(), f))
                             for f in files)
  assert dataclasses.asdict(fp)["sha256"] == fp.sha256 and len(fp.sha256) == 64


def test_built_splits_are_disjoint_and_exact(pystdlib_cfg):
  data_dir = epath.Path(pystdlib_cfg.data.data_dir)
  paths = {s: {p.decode() for p, _ in _records(data_dir, s)} for s in ("train", "validation")}
  assert not paths["train"] & paths["validation"]
  assert paths["validation"]
  assert paths["train"] | paths["validation"] == set(
      datasets.stdlib_files(False, PYSTDLIB_TEST_FILES))
  path, text = _records(data_dir, "train")[0]
  assert text == pathlib.Path(datasets.stdlib_dir(), path.decode()).read_bytes()  # raw bytes


def test_text_files_source(tmp_path):
  for i in range(30):
    (tmp_path / f"sub{i % 3}").mkdir(exist_ok=True)
    (tmp_path / f"sub{i % 3}" / f"doc{i}.txt").write_text(f"document {i}")
  (tmp_path / "ignored.md").write_text("not matched")
  pattern = str(tmp_path / "**" / "*.txt")
  train = datasets.text_files_source(pattern, "train")
  val = datasets.text_files_source(pattern, "validation")
  texts = [r["text"] for r in train] + [r["text"] for r in val]
  assert sorted(texts) == sorted(f"document {i}".encode() for i in range(30))
  assert len(val) >= 1
  with pytest.raises(ValueError, match="matches no files"):
    datasets.text_files_source(str(tmp_path / "*.nothing"), "train")


def test_tfds_source_with_mock_data(tmp_path):
  with tfds.testing.mock_data(num_examples=12):
    src = datasets.tfds_source("lm1b", "train", epath.Path(tmp_path))
    assert len(src) == 12 and isinstance(src[0]["text"], (str, bytes))


def test_tfds_source_missing_dataset_is_clear(tmp_path):
  with pytest.raises(ConfigError, match="(?s)tfds_name='lm1b'.*ArrayRecord"):
    datasets.tfds_source("lm1b", "train", epath.Path(tmp_path))


def test_data_dir_default(monkeypatch):
  monkeypatch.delenv("BSCAN_DATA_DIR", raising=False)
  assert os.fspath(datasets.data_dir("")) == os.path.expanduser(datasets.DEFAULT_DATA_DIR)
  monkeypatch.setenv("BSCAN_DATA_DIR", "/some/dir")
  assert os.fspath(datasets.data_dir("")) == "/some/dir"
  assert os.fspath(datasets.data_dir("/explicit")) == "/explicit"


@pytest.mark.parametrize("max_files", [0, PYSTDLIB_TEST_FILES])
def test_builder_pickles_for_worker_processes(tmp_path, max_files):
  """grain workers unpickle the source; listed configs must survive it (TFDS checks identity)."""
  builder = datasets.pystdlib_builder(False, max_files, epath.Path(tmp_path))
  clone = pickle.loads(pickle.dumps(builder))
  assert clone.builder_config.name == builder.builder_config.name


def test_text_files_split_does_not_depend_on_how_the_path_is_spelled(tmp_path, monkeypatch):
  for i in range(60):
    (tmp_path / f"doc{i}.txt").write_text(f"document {i}\n")
  absolute = datasets.text_files_source(str(tmp_path / "*.txt"), "validation")
  monkeypatch.chdir(tmp_path.parent)
  relative = datasets.text_files_source(f"{tmp_path.name}/*.txt", "validation")
  names = lambda src: sorted(pathlib.Path(src[i]["path"]).name for i in range(len(src)))
  assert names(absolute) == names(relative) and len(absolute) > 0


def test_a_data_dir_built_from_another_stdlib_is_refused(pystdlib_cfg, monkeypatch):
  cfg = pystdlib_cfg
  root = datasets.data_dir(cfg.data.data_dir)
  builder = datasets.pystdlib_builder(False, cfg.data.max_files, root)
  stored = datasets.Fingerprint(**builder.info.metadata["fingerprint"])
  other = datasets.Fingerprint(stored.num_files, stored.num_bytes + 1, "0" * 64)
  monkeypatch.setattr(datasets, "local_fingerprint", lambda *_: other)
  with pytest.raises(ValueError, match="built from a different standard library"):
    datasets.pystdlib_source(False, cfg.data.max_files, root, "train")


class SelfPreparingText(tfds.core.GeneratorBasedBuilder):
  """A TFDS dataset that prepares itself (as `data.download=True` lets lm1b or c4 do)."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
        {"text": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(6), "validation": self._generate_examples(2)}

  def _generate_examples(self, n):
    for i in range(n):
      yield i, {"text": f"document {i} " * 20}


def test_download_prepares_a_tfds_dataset_that_is_not_there(tmp_path):
  name = "self_preparing_text"
  with pytest.raises(ConfigError, match="is not prepared in .*or data.download=True"):
    datasets.check_tfds(name, epath.Path(tmp_path))
  datasets.check_tfds(name, epath.Path(tmp_path), download=True)  # nothing built yet
  assert not list(tmp_path.iterdir())
  source = datasets.tfds_source(name, "train", epath.Path(tmp_path), download=True)
  assert len(source) == 6 and source[0]["text"].startswith(b"document ")
  assert list(tmp_path.glob(f"{name}/1.0.0/*.array_record*"))
  datasets.check_tfds(name, epath.Path(tmp_path))  # prepared now: no download needed


def test_a_prepared_dataset_needs_no_builder_class(tmp_path):
  """c4's builder imports TensorFlow; a copy prepared elsewhere is read from its files."""
  datasets.tfds_source("self_preparing_text", "train", epath.Path(tmp_path), download=True)
  code = ("import sys; from bscan import datasets; from etils import epath; "
          "d = epath.Path(sys.argv[1]); datasets.check_tfds('self_preparing_text', d); "
          "print(len(datasets.tfds_source('self_preparing_text', 'validation', d)))")
  out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                       text=True, timeout=120, check=False)  # a process without the class
  assert out.returncode == 0 and out.stdout.split()[-1] == "2", out.stderr[-2000:]
  with pytest.raises(ConfigError, match="'c4/en' is not a TFDS dataset this installation "
                     "knows, nor one prepared in"):
    datasets.check_tfds("c4/en", epath.Path(tmp_path / "empty"))
