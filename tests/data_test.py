"""Tests for bscan.data: batches, sharding, exact resumption, eval set, validation."""

import copy
import json
import math
import os
import re

from absl import flags
from conftest import make_data_cfg
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds

from bscan import checkpoint
from bscan import data
from bscan import datasets
from bscan import tokenizers
from bscan.errors import ConfigError


def _take(it, n: int) -> list[np.ndarray]:
  return [next(it) for _ in range(n)]


def _marker_corpus(tmp_path, n_docs: int = 100, **overrides):
  """text_files corpus whose documents say who they are: 'doc007;doc007;...'."""
  for i in range(n_docs):
    (tmp_path / f"doc{i:03d}.txt").write_text(f"doc{i:03d};" * (5 + i % 7))
  overrides.setdefault("shuffle_window", 64)  # tiny corpus: keep windows small
  return make_data_cfg(str(tmp_path / "tfds"), name="text_files",
                       glob=str(tmp_path / "*.txt"), **overrides)


def _doc_ids(batches) -> set[str]:
  tok = tokenizers.BytesTokenizer()
  return {m for b in batches for row in b for m in re.findall(r"doc\d{3}", tok.decode(row))}


def test_train_batches_shape_dtype_and_content(pystdlib_cfg):
  cfg = pystdlib_cfg
  batches = _take(data.make_train_iterator(cfg), 100)  # ~50k tokens: spans documents
  for b in batches:
    assert b.shape == (cfg.batch_size, cfg.seq_len + 1) and b.dtype == np.int32
    assert b.min() >= 0 and b.max() < data.get_tokenizer(cfg).vocab_size
  # Documents are EOS-separated and packed: no padding, EOS somewhere.
  assert (np.concatenate(batches) == 256).any()
  assert not np.array_equal(batches[0], batches[1])


def test_train_order_depends_on_seed_only(pystdlib_cfg):
  a = _take(data.make_train_iterator(pystdlib_cfg), 2)
  b = _take(data.make_train_iterator(pystdlib_cfg), 2)
  other = copy.deepcopy(pystdlib_cfg)
  other.seed = 1
  c = _take(data.make_train_iterator(other), 2)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a[0], c[0])


def test_process_shards_are_disjoint_and_cover_train(tmp_path):
  cfg = _marker_corpus(tmp_path, n_docs=40, batch_size=8, seq_len=16)
  per_process = [
      _doc_ids(_take(data.make_train_iterator(cfg, process_index=i, process_count=2), 40))
      for i in range(2)]
  for i in range(2):  # local batch is the global batch / process count
    b = next(data.make_train_iterator(cfg, process_index=i, process_count=2))
    assert b.shape == (4, 17)
  assert not per_process[0] & per_process[1]
  train_docs = {os.path.basename(r["path"])[:6] for r in data.get_source(cfg, "train")}
  assert per_process[0] | per_process[1] == train_docs


def _global_batches(cfg, process_count: int, n: int) -> np.ndarray:
  """n global batches as `process_count` processes read them (blocks in process order)."""
  its = [data.make_train_iterator(cfg, process_index=i, process_count=process_count)
         for i in range(process_count)]
  return np.stack([np.concatenate([next(it) for it in its]) for _ in range(n)])


def test_global_batches_do_not_depend_on_the_process_count(tmp_path):
  cfg = _marker_corpus(tmp_path, n_docs=60, batch_size=8, seq_len=16, shards=4)
  assert data.num_shards(cfg) == 4
  one = _global_batches(cfg, 1, 30)  # ~2 epochs of every shard
  for processes in (2, 4):
    np.testing.assert_array_equal(_global_batches(cfg, processes, 30), one)
  with pytest.raises(ConfigError, match=r"data.shards=4: .* 4 data shard\(s\), which 8 proc"):
    data.make_train_iterator(cfg, process_index=0, process_count=8)


def test_a_process_reads_only_its_own_shards(tmp_path, monkeypatch):
  cfg = _marker_corpus(tmp_path, n_docs=40, batch_size=8, seq_len=16, shards=4)
  source = data.get_source(cfg, "train")
  read: list[int] = []

  class Recording:
    def __len__(self):
      return len(source)

    def __getitem__(self, index):
      read.append(int(index))
      return source[index]

  monkeypatch.setattr(data, "get_source", lambda cfg, split: Recording())
  _take(data.make_train_iterator(cfg, process_index=1, process_count=2), 20)
  assert read and {i % 4 for i in read} == {2, 3}  # shards 2 and 3: documents 2, 3, 6, 7, …


def test_state_of_two_processes_resumes_on_one(tmp_path):
  cfg = _marker_corpus(tmp_path, n_docs=40, batch_size=8, seq_len=16, shards=4)
  its = [data.make_train_iterator(cfg, process_index=i, process_count=2) for i in range(2)]
  for _ in range(7):
    for it in its:
      next(it)
  merged = {data.SHARDS_KEY: {k: v for it in its
                              for k, v in it.get_state()[data.SHARDS_KEY].items()}}
  expected = np.concatenate([next(it) for it in its])
  alone = data.make_train_iterator(cfg)
  alone.set_state(json.loads(json.dumps(merged)))  # as the checkpoint stores it
  np.testing.assert_array_equal(next(alone), expected)


def test_infinite_and_reshuffled_each_epoch(tmp_path):
  cfg = _marker_corpus(tmp_path, shuffle_window=1, shards=1)  # one stream, in order
  stream = np.concatenate([b.reshape(-1) for b in _take(data.make_train_iterator(cfg), 60)])
  tok = tokenizers.BytesTokenizer()
  docs = [tok.decode(d)[:6] for d in np.split(stream, np.flatnonzero(stream == tok.eos_id))]
  order = docs[:-1]  # whole documents (the stream starts at one), in read order
  n_train = len(data.get_source(cfg, "train"))
  epochs = [tuple(order[i:i + n_train]) for i in range(0, len(order) - n_train, n_train)]
  assert len(epochs) >= 3
  assert all(sorted(e) == sorted(epochs[0]) for e in epochs)  # each epoch: every doc once
  assert len(set(epochs)) > 1  # but in a new order


def test_get_set_state_reproduces_next_batch(pystdlib_cfg):
  it = data.make_train_iterator(pystdlib_cfg)
  _take(it, 5)
  state = it.get_state()
  expected = _take(it, 3)
  fresh = data.make_train_iterator(pystdlib_cfg)
  fresh.set_state(state)
  np.testing.assert_array_equal(_take(fresh, 3), expected)
  # The state as orbax stores it (JSON: tuples come back as lists) restores too.
  fresh = data.make_train_iterator(pystdlib_cfg)
  fresh.set_state(json.loads(json.dumps(state)))
  np.testing.assert_array_equal(_take(fresh, 3), expected)


def test_orbax_checkpoint_manager_restores_next_batch(pystdlib_cfg, tmp_path):
  it = data.make_train_iterator(pystdlib_cfg)
  _take(it, 3)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(3, args=ocp.args.Composite(
        data=ocp.args.JsonSave(checkpoint.gather_data_state(it))))
    mngr.wait_until_finished()
  expected = next(it)
  fresh = data.make_train_iterator(pystdlib_cfg)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    out = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(data=ocp.args.JsonRestore()))
  checkpoint.restore_data_state(fresh, out.data)
  np.testing.assert_array_equal(next(fresh), expected)


def test_worker_processes_give_the_same_batches(pystdlib_cfg):
  flags.FLAGS.mark_as_parsed()  # grain reads absl flags in worker processes
  cfg = copy.deepcopy(pystdlib_cfg)
  cfg.data.worker_count = 1
  expected = _take(data.make_train_iterator(pystdlib_cfg), 3)
  it = data.make_train_iterator(cfg)
  try:
    np.testing.assert_array_equal(_take(it, 3), expected)
  finally:
    it.close()


def test_eval_batches_are_fixed_and_held_out(tmp_path):
  cfg = _marker_corpus(tmp_path, eval_sequences=4, seq_len=8)
  ev = data.make_eval_batches(cfg)
  assert ev.shape == (4, 9) and ev.dtype == np.int32
  other = copy.deepcopy(cfg)
  other.seed = 7  # the eval set never depends on the training seed
  np.testing.assert_array_equal(ev, data.make_eval_batches(other))
  val_docs = {os.path.basename(r["path"])[:6] for r in data.get_source(cfg, "validation")}
  assert _doc_ids([ev]) and _doc_ids([ev]) <= val_docs


def test_eval_batches_pystdlib(pystdlib_cfg):
  ev = data.make_eval_batches(pystdlib_cfg)
  assert ev.shape == (8, 33) and ev.dtype == np.int32
  np.testing.assert_array_equal(ev, data.make_eval_batches(pystdlib_cfg))
  too_many = copy.deepcopy(pystdlib_cfg)
  too_many.data.eval_sequences = 10**6
  with pytest.raises(ValueError, match="eval_sequences"):
    data.make_eval_batches(too_many)


def test_tfds_mock_lm1b(tmp_path):
  cfg = make_data_cfg(str(tmp_path), name="tfds", tfds_name="lm1b", text_key="text",
                      eval_split="test", eval_sequences=2, shuffle_window=16)
  with tfds.testing.mock_data(num_examples=64):  # mock gives str; real data gives bytes
    b = next(data.make_train_iterator(cfg))
    ev = data.make_eval_batches(cfg)
  assert b.shape == (16, 33) and b.dtype == np.int32
  assert ev.shape == (2, 33)


def test_sentencepiece_is_trained_once_and_cached(pystdlib_cfg):
  cfg = copy.deepcopy(pystdlib_cfg)
  cfg.tokenizer.name = "sentencepiece"
  tok = data.get_tokenizer(cfg)
  assert tok.vocab_size == cfg.tokenizer.vocab_size
  cached = list((datasets.data_dir(cfg.data.data_dir) / "bscan_tokenizers").glob("*.model"))
  assert [p.name for p in cached] == [f"{data.dataset_key(cfg)}-sp512.model"]
  assert data.get_tokenizer(cfg).encode("x = 1\n") == tok.encode("x = 1\n")
  b = next(data.make_train_iterator(cfg))
  assert b.shape == (16, 33) and b.max() < tok.vocab_size
  by_path = copy.deepcopy(cfg)
  by_path.tokenizer.path = os.fspath(cached[0])
  assert data.get_tokenizer(by_path).encode("x = 1\n") == tok.encode("x = 1\n")


def test_unigram_entropy(tmp_path, pystdlib_cfg):
  for i in range(4):  # tokens a, b, EOS equally often: exactly log 3
    (tmp_path / f"f{i}.txt").write_text("ab")
  cfg = make_data_cfg(str(tmp_path / "tfds"), name="text_files", glob=str(tmp_path / "*.txt"))
  assert data.unigram_entropy(cfg) == pytest.approx(math.log(3))
  h = data.unigram_entropy(pystdlib_cfg)
  assert 2.5 < h < math.log(257)  # code is far from uniform over bytes


@pytest.mark.parametrize("field, value, message", [
    ("data.name", "c4", r"data.name='c4' is unknown"),
    ("tokenizer.name", "wordpiece", r"tokenizer.name='wordpiece' is unknown"),
    ("data.eval_sequences", 0, r"data.eval_sequences=0"),
    ("data.worker_count", -1, r"data.worker_count=-1"),
    ("data.max_files", 1, r"data.max_files=1"),
    ("tokenizer.vocab_size", 100, r"tokenizer.vocab_size=100"),
])
def test_validate_data_config_errors(pystdlib_cfg, field, value, message):
  cfg = copy.deepcopy(pystdlib_cfg)
  if field.startswith("tokenizer.vocab"):
    cfg.tokenizer.name = "sentencepiece"
  group, name = field.split(".")
  cfg[group][name] = value
  with pytest.raises(ConfigError, match=message):
    data.validate_data_config(cfg)


def test_validate_data_config_by_dataset(tmp_path):
  def check(message, **overrides):
    cfg = make_data_cfg(str(tmp_path / "tfds"), **overrides)
    with pytest.raises(ConfigError, match=message):
      data.validate_data_config(cfg)

  check(r"data.glob is empty", name="text_files")
  check(r"matches 0 files", name="text_files", glob=str(tmp_path / "*.none"))
  check(r"data.tfds_name is empty", name="tfds")
  check(r"data.text_key is empty", name="tfds", tfds_name="pg19", text_key="")
  cfg = make_data_cfg(str(tmp_path / "tfds"))
  cfg.tokenizer.update(name="sentencepiece", path=str(tmp_path / "missing.model"))
  with pytest.raises(ConfigError, match=r"tokenizer.path=.*does not exist"):
    data.validate_data_config(cfg)
  cfg.tokenizer.update(name="tiktoken", encoding="")
  with pytest.raises(ConfigError, match=r"tokenizer.encoding is empty"):
    data.validate_data_config(cfg)


def test_validate_data_config_builds_nothing(tmp_path):
  cfg = make_data_cfg(str(tmp_path / "fresh"))
  data.validate_data_config(cfg)  # a valid config passes
  assert not (tmp_path / "fresh").exists()
