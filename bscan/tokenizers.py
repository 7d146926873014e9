"""Tokenizers behind one typed interface: bytes (default), SentencePiece, tiktoken."""

from __future__ import annotations

import abc
from collections.abc import Iterable, Sequence
import io

import numpy as np

from bscan.errors import ConfigError

TOKENIZER_NAMES = ("bytes", "sentencepiece", "tiktoken")


SENTENCEPIECE_SEED = 20181214  # any fixed value; shuffling of training sentences

class Tokenizer(abc.ABC):
  """Maps text to token ids and back; documents are separated by `eos_id`."""

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    """Number of ids the model's embedding must cover (all ids are < vocab_size)."""

  @property
  @abc.abstractmethod
  def eos_id(self) -> int:
    """Id appended after every document."""

  @abc.abstractmethod
  def encode(self, text: str) -> list[int]:
    """Token ids of `text` (no EOS added)."""

  @abc.abstractmethod
  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids`; special ids (EOS) are dropped."""

  def encode_np(self, text: str | bytes) -> np.ndarray:
    """Token ids as int32; accepts raw UTF-8 bytes as TFDS returns them."""
    if isinstance(text, bytes):
      text = text.decode("utf-8", errors="replace")
    return np.asarray(self.encode(text), dtype=np.int32)


class BytesTokenizer(Tokenizer):
  """UTF-8 bytes as ids 0..255, then EOS = 256; needs no files."""

  @property
  def vocab_size(self) -> int:
    return 257

  @property
  def eos_id(self) -> int:
    return 256

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, ids: Sequence[int]) -> str:
    return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

  def encode_np(self, text: str | bytes) -> np.ndarray:
    # Bytes pass straight through (no decode/encode round trip): ~50x faster than lists.
    raw = text if isinstance(text, bytes) else text.encode("utf-8")
    return np.frombuffer(raw, dtype=np.uint8).astype(np.int32)


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece model, loaded from its serialized proto."""

  def __init__(self, model_proto: bytes):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    self.model_proto = model_proto
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    if self._sp.eos_id() < 0:
      raise ValueError("SentencePiece model has no EOS piece (trained with eos_id=-1?).")

  def __getstate__(self) -> dict:
    # The SWIG processor does not pickle; grain's worker processes need pickling.
    return {"model_proto": self.model_proto}

  def __setstate__(self, state: dict) -> None:
    self.__init__(state["model_proto"])

  @classmethod
  def train(cls, texts: Iterable[str], vocab_size: int) -> SentencePieceTokenizer:
    """Trains a BPE model on `texts` that round-trips any text exactly (code included)."""
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    model = io.BytesIO()
    # Trained per line: code and prose are line-structured, and SentencePiece caps the
    # length of one training "sentence". Newlines are restored by encode/decode below.
    lines = (line for text in texts for line in text.splitlines() if line.strip())
    # Fixed seed: every host (and every rerun) trains the same model from the same sample.
    spm.set_random_generator_seed(SENTENCEPIECE_SEED)
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines, model_writer=model, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True,
        # Rare characters become byte pieces instead of taking a vocab slot each.
        character_coverage=0.9995,
        # Exact round trips: no NFKC, keep runs of spaces (indentation), no dummy prefix.
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_digits=True,
        user_defined_symbols=["\n", "\t"], unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        max_sentence_length=1 << 16, input_sentence_size=2_000_000,
        shuffle_input_sentence=True, num_threads=2, minloglevel=2)
    return cls(model.getvalue())

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def decode(self, ids: Sequence[int]) -> str:
    specials = {self._sp.eos_id(), self._sp.bos_id(), self._sp.unk_id()}
    return self._sp.decode([int(i) for i in ids if int(i) not in specials])


def tiktoken_encoding_names() -> list[str]:
  """The encodings tiktoken knows by name (whether or not their files are cached)."""
  import tiktoken  # pylint: disable=g-import-not-at-top
  return sorted(tiktoken.list_encoding_names())


class TiktokenTokenizer(Tokenizer):
  """A tiktoken encoding; EOS is its `<|endoftext|>` token."""

  def __init__(self, encoding):
    self._enc = encoding
    try:
      self._eos = encoding.eot_token
    except KeyError as e:
      raise ValueError(f"tiktoken encoding {encoding.name!r} has no <|endoftext|> "
                       "special token to use as EOS.") from e

  @classmethod
  def from_name(cls, name: str) -> TiktokenTokenizer:
    """Loads a named encoding ('gpt2', 'cl100k_base', ...), with a clear error offline."""
    import tiktoken  # pylint: disable=g-import-not-at-top
    try:
      return cls(tiktoken.get_encoding(name))
    except ValueError as e:  # unknown name
      raise ConfigError(f"tokenizer.encoding={name!r}: {e}") from e
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise ConfigError(
          f"tokenizer.encoding={name!r}: tiktoken could not load its encoding files "
          f"({type(e).__name__}: {e}). tiktoken downloads them on first use; on a machine "
          "without internet, copy a populated cache directory and set TIKTOKEN_CACHE_DIR "
          "to it, or use tokenizer.name='bytes' or 'sentencepiece'.") from e

  @property
  def vocab_size(self) -> int:
    return self._enc.n_vocab

  @property
  def eos_id(self) -> int:
    return self._eos

  def encode(self, text: str) -> list[int]:
    # Special-token strings inside a document are plain text, never control ids.
    return self._enc.encode_ordinary(text)

  def decode(self, ids: Sequence[int]) -> str:
    return self._enc.decode([int(i) for i in ids if int(i) != self._eos])
