"""Tests for bscan.tokenizers: exact round trips, EOS ids, pickling, offline errors."""

import pickle
import sysconfig

import numpy as np
import pytest
import tiktoken

from bscan import tokenizers

SAMPLES = [
    "",
    "def f(x):\n\treturn x  # trailing spaces   \n\n",
    "    indented\r\nwindows line\n",
    "unicode: héllo wörld, ünïcödé €, emoji 😀, CJK 漢字",
    "special-looking text <|endoftext|> stays text",
]


def _stdlib_texts(n: int = 20) -> list[str]:
  root = sysconfig.get_paths()["stdlib"]
  names = ["json/__init__.py", "json/decoder.py", "json/encoder.py", "json/scanner.py",
           "textwrap.py", "string.py", "shlex.py", "glob.py", "fnmatch.py", "base64.py"]
  return [open(f"{root}/{n}", encoding="utf-8").read() for n in names[:n]]


def _assert_round_trips(tok: tokenizers.Tokenizer, texts: list[str]) -> None:
  for text in texts:
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size and i != tok.eos_id for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(ids + [tok.eos_id]) == text  # EOS is dropped on decode
    np.testing.assert_array_equal(tok.encode_np(text), ids)
    np.testing.assert_array_equal(tok.encode_np(text.encode("utf-8")), ids)
    assert tok.encode_np(text).dtype == np.int32


def test_bytes_tokenizer():
  tok = tokenizers.BytesTokenizer()
  assert (tok.vocab_size, tok.eos_id) == (257, 256)
  assert tok.encode("aé") == [97, 0xC3, 0xA9]
  _assert_round_trips(tok, SAMPLES + _stdlib_texts(3))


def test_sentencepiece_trains_round_trips_and_pickles():
  tok = tokenizers.SentencePieceTokenizer.train(_stdlib_texts(), vocab_size=512)
  assert tok.vocab_size == 512
  # byte_fallback: characters never seen in training (emoji, CJK) still round-trip.
  _assert_round_trips(tok, SAMPLES + _stdlib_texts(3))
  assert len(tok.encode(_stdlib_texts(1)[0])) < len(_stdlib_texts(1)[0])  # it compresses
  clone = pickle.loads(pickle.dumps(tok))  # grain worker processes pickle the pipeline
  assert clone.encode(SAMPLES[1]) == tok.encode(SAMPLES[1])


def _small_tiktoken_encoding() -> tiktoken.Encoding:
  """Byte-level BPE with a few merges: no download needed."""
  ranks = {bytes([i]): i for i in range(256)}
  for merge in [b"  ", b"    ", b"re", b"ret", b"retu", b"retur", b"return", b"de", b"def"]:
    ranks[merge] = len(ranks)
  gpt2_pattern = (r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+"""
                  r"""|\s+(?!\S)|\s+""")
  return tiktoken.Encoding("small", pat_str=gpt2_pattern, mergeable_ranks=ranks,
                           special_tokens={"<|endoftext|>": len(ranks)})


def test_tiktoken_round_trips():
  tok = tokenizers.TiktokenTokenizer(_small_tiktoken_encoding())
  assert (tok.vocab_size, tok.eos_id) == (266, 265)
  assert len(tok.encode("    return")) < len("    return")  # merges apply
  _assert_round_trips(tok, SAMPLES + _stdlib_texts(3))
  clone = pickle.loads(pickle.dumps(tok))
  assert clone.encode(SAMPLES[1]) == tok.encode(SAMPLES[1])


def test_tiktoken_by_name_errors_are_clear():
  with pytest.raises(ValueError, match="tokenizer.encoding='no_such'"):
    tokenizers.TiktokenTokenizer.from_name("no_such")
  try:
    tok = tokenizers.TiktokenTokenizer.from_name("gpt2")
  except ValueError as e:  # offline (as here): must say what to do
    assert "TIKTOKEN_CACHE_DIR" in str(e)
  else:  # files were available (cache or network)
    assert tok.decode(tok.encode(SAMPLES[1])) == SAMPLES[1]
