"""The input pipeline: corpus -> tokenize -> EOS-separate -> pack -> int32 [B, T+1] batches.

Train: the global batch is read as S = gcd(batch_size, data.shards) virtual shards, each
every S-th document, shuffled by (cfg.seed, shard) afresh each epoch, tokenized, packed with
grain's concat-then-split, shuffled within a window (so a batch mixes many documents) and
batched to B/S rows. A process reads only its own contiguous block of shards, so the global
batches are the same for any process count that divides S. The iterator is a grain
DatasetIterator whose get_state()/set_state() are keyed by shard (bscan.checkpoint merges
the processes' states), reproducing the next batch exactly on any such process count.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import dataclasses
import functools
import hashlib
import math
import os

from absl import logging
from etils import epath
import grain
import ml_collections
import numpy as np

from bscan import datasets
from bscan import tokenizers
from bscan.errors import ConfigError

# Eval documents are read (in a fixed order) until this many times the needed tokens,
# then the eval sequences are spread evenly over them: a fixed but varied held-out set.
_EVAL_OVERSAMPLE = 16
# Fixed seed for orders that must not depend on cfg.seed (eval set, tokenizer sample).
_FIXED_SEED = 1234
SHARDS_KEY = "shards"  # the data iterator's state: {SHARDS_KEY: {shard id: its state}}


def _data_dir(cfg: ml_collections.ConfigDict) -> epath.Path:
  return datasets.data_dir(cfg.data.data_dir)


def _text_key(cfg: ml_collections.ConfigDict) -> str:
  return cfg.data.text_key if cfg.data.name == "tfds" else "text"


def get_source(cfg: ml_collections.ConfigDict, split: str) -> Sequence[dict]:
  """Random-access records of one split of cfg.data's corpus (builds pystdlib on first use)."""
  name = cfg.data.name
  if name == "pystdlib":
    return datasets.pystdlib_source(cfg.data.include_tests, cfg.data.max_files,
                                    _data_dir(cfg), split)
  if name == "text_files":
    return datasets.text_files_source(cfg.data.glob, split)
  if name == "tfds":
    return datasets.tfds_source(cfg.data.tfds_name, split, _data_dir(cfg), cfg.data.download)
  raise ConfigError(f"data.name={name!r} is not one of {datasets.DATASET_NAMES}.")


def dataset_key(cfg: ml_collections.ConfigDict) -> str:
  """Names the corpus (for caches): differs whenever the documents could differ."""
  name = cfg.data.name
  if name == "pystdlib":
    return "pystdlib-" + datasets.pystdlib_config_name(
        cfg.data.include_tests, cfg.data.max_files)
  if name == "text_files":
    listing = "\n".join(datasets.glob_files(cfg.data.glob))
    return "text_files-" + hashlib.sha256(listing.encode()).hexdigest()[:16]
  return "tfds-" + cfg.data.tfds_name.replace("/", "_").replace(":", "_")


def _fixed_order(n: int) -> np.ndarray:
  return np.random.default_rng(_FIXED_SEED).permutation(n)


def _iter_texts(source: Sequence[dict], key: str, max_bytes: int) -> Iterator[str]:
  """Documents as str in a fixed pseudo-random order, until ~max_bytes are read."""
  total = 0
  for i in _fixed_order(len(source)):
    text = source[int(i)][key]
    text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text
    yield text
    total += len(text)
    if total >= max_bytes:
      return


@functools.cache
def _load_sentencepiece(path: str) -> tokenizers.SentencePieceTokenizer:
  return tokenizers.SentencePieceTokenizer(epath.Path(path).read_bytes())


def get_tokenizer(cfg: ml_collections.ConfigDict) -> tokenizers.Tokenizer:
  """The tokenizer cfg.tokenizer names; trains and caches SentencePiece on first use."""
  tok = cfg.tokenizer
  if tok.name == "bytes":
    return tokenizers.BytesTokenizer()
  if tok.name == "tiktoken":
    return tokenizers.TiktokenTokenizer.from_name(tok.encoding)
  if tok.name != "sentencepiece":
    raise ConfigError(f"tokenizer.name={tok.name!r} is not one of "
                     f"{tokenizers.TOKENIZER_NAMES}.")
  if tok.path:
    return _load_sentencepiece(tok.path)
  # Keyed by corpus and vocab so no two corpora or sizes share a model.
  path = (_data_dir(cfg) / "bscan_tokenizers" /
          f"{dataset_key(cfg)}-sp{tok.vocab_size}.model")
  if not path.exists():
    train_bytes = tok.train_bytes
    logging.info("Training SentencePiece (vocab %d) on %d bytes -> %s",
                 tok.vocab_size, train_bytes, path)
    source = get_source(cfg, cfg.data.train_split)
    model = tokenizers.SentencePieceTokenizer.train(
        _iter_texts(source, _text_key(cfg), train_bytes), tok.vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write-then-rename: concurrent runs never read a half-written model.
    tmp = path.parent / f"{path.name}.tmp{os.getpid()}"
    tmp.write_bytes(model.model_proto)
    tmp.rename(path)
  return _load_sentencepiece(os.fspath(path))


class _Tokenize(grain.transforms.Map):
  """Record -> {'tokens': int32 ids of its text, then EOS}."""

  def __init__(self, tokenizer: tokenizers.Tokenizer, key: str):
    self._tokenizer = tokenizer
    self._key = key
    self._eos = np.asarray([tokenizer.eos_id], np.int32)

  def map(self, record: dict) -> dict:
    return {"tokens": np.concatenate([self._tokenizer.encode_np(record[self._key]), self._eos])}


def _restore_tuples(state):
  """Undoes JSON's tuple -> list on concat-then-split's `remainder_slices`."""
  if isinstance(state, dict):
    return {k: ({f: tuple(sl) for f, sl in v.items()} if k == "remainder_slices"
                else _restore_tuples(v)) for k, v in state.items()}
  if isinstance(state, list):
    return [_restore_tuples(v) for v in state]
  return state


class _ShardedBatches(grain.IterDataset):
  """This process's block of the global batch: each of its shards' rows, in shard order."""

  def __init__(self, parents: Sequence[grain.IterDataset], shard_ids: Sequence[int],
               rows: int):
    super().__init__(parents)
    self._shard_ids = list(shard_ids)
    self._rows = rows

  def __iter__(self) -> grain.DatasetIterator:
    return _ShardedBatchesIterator([iter(p) for p in self._parents], self._shard_ids, self._rows)


class _ShardedBatchesIterator(grain.DatasetIterator):
  """Stacks `rows` rows of each shard; its state is keyed by shard, not by process.

  Keyed by shard, the states of all processes merge into one dict that any process count
  can resume from (bscan.checkpoint gathers them). Each shard yields rows, not batches, so
  `set_batch` changes the batch between two steps and the shard streams go on untouched (a
  batch ramp reads every token once). The state is each shard's row iterator's, the same as
  a grain `.batch()`'s. It also survives JSON: grain 0.2.18's ConcatThenSplit compares its
  slices with the tuple (-1, -1), which a JSON round trip turns into a list, so set_state
  restores the tuples.
  """

  def __init__(self, parents: Sequence[grain.DatasetIterator], shard_ids: Sequence[int],
               rows: int):
    super().__init__(parents)
    self._shard_ids = list(shard_ids)
    self._rows = rows

  def __next__(self) -> np.ndarray:
    return np.stack([next(p) for p in self._parents for _ in range(self._rows)])

  def set_rows(self, rows: int) -> None:
    """From the next batch on, `rows` rows per shard (global batch = rows × shards)."""
    self._rows = rows

  def get_state(self) -> dict:
    return {SHARDS_KEY: {str(i): p.get_state() for i, p in zip(self._shard_ids, self._parents)}}

  def set_state(self, state: dict) -> None:
    shards = state[SHARDS_KEY]
    missing = [i for i in self._shard_ids if str(i) not in shards]
    if missing:
      raise ValueError(f"the data iterator state has no entry for shard(s) {missing}")
    for i, parent in zip(self._shard_ids, self._parents):
      parent.set_state(_restore_tuples(shards[str(i)]))


def set_batch(data_iter: grain.DatasetIterator, cfg: ml_collections.ConfigDict,
              batch: int) -> None:
  """Makes `data_iter` (make_train_iterator's, worker_count 0) yield global batches of
  `batch` sequences from the next one on; `batch` must read cfg's data shards."""
  shards = num_shards(cfg)
  if math.gcd(batch, cfg.data.shards) != shards:
    raise ValueError(f"batch {batch} reads other data shards than batch_size={cfg.batch_size}")
  data_iter.set_rows(batch // shards)


def _packed_tokens(packed: dict) -> np.ndarray:
  return packed["tokens"]  # drops the *_segment_ids/*_positions packing adds


def derived_seed(*entropy: int) -> int:
  """Well-separated seeds: grain adds the epoch (window) index to its seed, so seed s in
  epoch 1 would otherwise be seed s+1 in epoch 0."""
  return int(np.random.SeedSequence(list(entropy)).generate_state(1)[0] >> 1)


def num_shards(cfg: ml_collections.ConfigDict) -> int:
  """Virtual data shards of the global batch, gcd(batch_size, data.shards): set by the config
  alone, so any process count that divides it reads the same global batches."""
  return math.gcd(cfg.batch_size, cfg.data.shards)


def process_shards(cfg: ml_collections.ConfigDict, process_index: int,
                   process_count: int) -> range:
  """The shards process `process_index` reads: a contiguous block (its rows of the batch)."""
  shards = num_shards(cfg)
  if shards % process_count:
    raise ConfigError(shard_error(cfg, process_count))
  per_process = shards // process_count
  return range(process_index * per_process, (process_index + 1) * per_process)


def shard_error(cfg: ml_collections.ConfigDict, process_count: int) -> str:
  return (f"data.shards={cfg.data.shards}: batch_size={cfg.batch_size} is read as "
          f"gcd(batch_size, data.shards) = {num_shards(cfg)} data shard(s), which "
          f"{process_count} processes cannot share; use a batch_size and data.shards that are "
          f"multiples of {process_count}")


def make_train_iterator(cfg: ml_collections.ConfigDict, *, process_index: int = 0,
                        process_count: int = 1) -> grain.DatasetIterator:
  """Infinite, checkpointable iterator of this process's int32 [B/process_count, T+1].

  The global batch is `num_shards` shards' rows, shard after shard. Shard s holds every
  S-th document from s, shuffled, tokenized, packed and window-shuffled with seeds of
  (cfg.seed, s) only: the global stream is the same for every process count dividing S,
  and each process reads only the documents of its own shards.
  """
  if cfg.batch_size % process_count:
    raise ConfigError(f"batch_size={cfg.batch_size} is not divisible by the "
                     f"process count {process_count}.")
  shard_ids = process_shards(cfg, process_index, process_count)
  shards = num_shards(cfg)
  tokenizer = get_tokenizer(cfg)
  source = get_source(cfg, cfg.data.train_split)
  if len(source) < shards:
    raise ConfigError(f"data.train_split={cfg.data.train_split!r} has {len(source)} documents, "
                      f"too few for {shards} data shards; lower data.shards")
  window = max(1, cfg.data.shuffle_window // shards)  # the same memory for any shard count
  parents = [_shard_dataset(cfg, tokenizer, source, s, shards, window) for s in shard_ids]
  it = _ShardedBatches(parents, shard_ids, cfg.batch_size // shards)
  if cfg.data.worker_count > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.data.worker_count))
  return iter(it)


def _shard_dataset(cfg: ml_collections.ConfigDict, tokenizer: tokenizers.Tokenizer,
                   source: Sequence[dict], shard: int, shards: int,
                   window: int) -> grain.IterDataset:
  """Shard `shard` of `shards`: its documents, packed into rows."""
  ds = grain.MapDataset.source(source)[shard::shards]
  # shuffle-then-repeat: repeat() reseeds the shuffle, so every epoch has a new order.
  ds = ds.shuffle(seed=derived_seed(cfg.seed, 0, shard)).repeat().map(
      _Tokenize(tokenizer, _text_key(cfg)))
  # Read in the calling thread: reader threads measured no faster here (the GIL), and
  # slower on short documents. Parallelism comes from worker_count (grain processes).
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  it = grain.experimental.ConcatThenSplitIterDataset(
      it, length_struct={"tokens": cfg.seq_len + 1})
  it = it.map(_packed_tokens)
  it = grain.experimental.WindowShuffleIterDataset(
      it, window_size=window, seed=derived_seed(cfg.seed, 1, shard))
  return it  # rows: _ShardedBatches stacks them (a .batch() here would fix the batch)


def _eval_tokens(cfg: ml_collections.ConfigDict, max_tokens: int) -> np.ndarray:
  """EOS-separated tokens of eval documents in a fixed order, up to ~max_tokens."""
  tokenizer = get_tokenizer(cfg)
  source = get_source(cfg, cfg.data.eval_split)
  key, eos = _text_key(cfg), np.asarray([tokenizer.eos_id], np.int32)
  chunks, total = [], 0
  for i in _fixed_order(len(source)):
    chunks += [tokenizer.encode_np(source[int(i)][key]), eos]
    total += len(chunks[-2]) + 1
    if total >= max_tokens:
      break
  return np.concatenate(chunks) if chunks else np.zeros([0], np.int32)


def make_eval_batches(cfg: ml_collections.ConfigDict) -> np.ndarray:
  """The fixed held-out set: int32 [cfg.data.eval_sequences, T+1] from the eval split."""
  n, length = cfg.data.eval_sequences, cfg.seq_len + 1
  tokens = _eval_tokens(cfg, _EVAL_OVERSAMPLE * n * length)
  available = len(tokens) // length
  if available < n:
    raise ConfigError(
        f"data.eval_sequences={n}: split {cfg.data.eval_split!r} holds only "
        f"{available} sequences of {length} tokens; lower eval_sequences or seq_len"
        + (", or add files: the split is too small" if available == 0 else "") + ".")
  sequences = tokens[:available * length].reshape(available, length)
  # Spread over everything read, so the set spans many documents, not the first few.
  return np.ascontiguousarray(sequences[np.linspace(0, available - 1, n).astype(np.int64)])


def prepare(cfg: ml_collections.ConfigDict) -> None:
  """Builds or downloads what the run reads (corpus splits, a SentencePiece model) once.

  Multi-host runs call it on process 0 first, so hosts sharing a data dir never race.
  """
  for split in (cfg.data.train_split, cfg.data.eval_split):
    get_source(cfg, split)
  get_tokenizer(cfg)


def corpus_fingerprint(cfg: ml_collections.ConfigDict) -> dict | None:
  """pystdlib's fingerprint (files, bytes, sha256), recorded with every run; else None."""
  if cfg.data.name != "pystdlib":
    return None
  fp = datasets.local_fingerprint(cfg.data.include_tests, cfg.data.max_files)
  return dataclasses.asdict(fp)


def unigram_entropy(cfg: ml_collections.ConfigDict, max_tokens: int = 1 << 25) -> float:
  """Entropy (nats/token) of the train split's unigram distribution, EOS included.

  The loss of a model that ignores context: a trained model must beat it.
  """
  tokenizer = get_tokenizer(cfg)
  source = get_source(cfg, cfg.data.train_split)
  key = _text_key(cfg)
  counts = np.zeros([tokenizer.vocab_size], np.int64)
  total = 0
  for i in _fixed_order(len(source)):
    ids = tokenizer.encode_np(source[int(i)][key])
    counts += np.bincount(ids, minlength=tokenizer.vocab_size)
    counts[tokenizer.eos_id] += 1
    total += len(ids) + 1
    if total >= max_tokens:
      break
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log(p)).sum())


def validate_data_config(cfg: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the bad field and the fix; reads no data, builds nothing."""
  def require(ok: bool, message: str) -> None:
    if not ok:
      raise ConfigError(message)

  d, tok = cfg.data, cfg.tokenizer
  require(d.name in datasets.DATASET_NAMES,
          f"data.name={d.name!r} is unknown; use one of {datasets.DATASET_NAMES}.")
  require(cfg.seq_len >= 1, f"seq_len={cfg.seq_len} must be >= 1.")
  require(cfg.batch_size >= 1, f"batch_size={cfg.batch_size} must be >= 1.")
  require(d.eval_sequences >= 1, f"data.eval_sequences={d.eval_sequences} must be >= 1.")
  require(d.worker_count >= 0,
          f"data.worker_count={d.worker_count} must be >= 0 (0 = in-process).")
  require(d.shuffle_window >= 1, f"data.shuffle_window={d.shuffle_window} must be >= 1.")
  require(d.shards >= 1, f"data.shards={d.shards} must be >= 1 (the global batch is read as "
          "gcd(batch_size, data.shards) shards).")
  for field in ("train_split", "eval_split"):
    require(bool(d[field]), f"data.{field} is empty; e.g. 'train' / 'validation'.")
  if d.name == "pystdlib":
    require(d.max_files >= 0, f"data.max_files={d.max_files} must be >= 0 (0 = all files).")
    require(os.path.isdir(datasets.stdlib_dir()), f"data.name='pystdlib': the stdlib "
            f"directory {datasets.stdlib_dir()} does not exist; use name='text_files'.")
    require(d.max_files != 1, "data.max_files=1 leaves no validation file; use 0 (all) or >= 2.")
  elif d.name == "text_files":
    require(bool(d.glob), "data.glob is empty; set it to your files, e.g. "
            "'~/corpus/**/*.txt'.")
    n = len(datasets.glob_files(d.glob))
    require(n >= 2, f"data.glob={d.glob!r} matches {n} files; it needs >= 2 (files are "
            "split into train/validation by path hash).")
  elif d.name == "tfds":
    require(bool(d.tfds_name), "data.tfds_name is empty; e.g. 'lm1b'.")
    require(bool(d.text_key), "data.text_key is empty; e.g. 'text' ('book_text' for pg19).")
    datasets.check_tfds(d.tfds_name, _data_dir(cfg), d.download)
  require(tok.name in tokenizers.TOKENIZER_NAMES, f"tokenizer.name={tok.name!r} is "
          f"unknown; use one of {tokenizers.TOKENIZER_NAMES}.")
  if tok.name == "sentencepiece":
    if tok.path:
      _check_sentencepiece_file(tok.path)
    else:
      # byte_fallback takes 256 pieces, the corpus's common characters ~100 more.
      require(tok.vocab_size >= 512, f"tokenizer.vocab_size={tok.vocab_size} is too small "
              "for SentencePiece; use >= 512.")
  elif tok.name == "tiktoken":
    require(bool(tok.encoding), "tokenizer.encoding is empty; e.g. 'gpt2'.")
    names = tokenizers.tiktoken_encoding_names()
    require(tok.encoding in names, f"tokenizer.encoding={tok.encoding!r} is not a tiktoken "
            f"encoding; use one of {names}.")


def _check_sentencepiece_file(path: str) -> None:
  """tokenizer.path must name a readable SentencePiece model (not any file)."""
  try:
    _load_sentencepiece(path)
  except FileNotFoundError as e:
    raise ConfigError(f"tokenizer.path={path!r} does not exist; fix it, or set it to '' to "
                      "train a model on the corpus.") from e
  except Exception as e:  # sentencepiece raises RuntimeError/OSError from C++ on a bad file
    raise ConfigError(f"tokenizer.path={path!r} is not a SentencePiece model (it could not "
                      "be loaded); point it at a .model file, or set it to '' to train one "
                      "on the corpus.") from e
