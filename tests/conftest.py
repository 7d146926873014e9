"""Test session set-up: eight fake CPU devices, set before JAX is first imported."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


# --- Data fixtures (bscan.data): imported lazily so the XLA flags above stay first. ---
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

PYSTDLIB_TEST_FILES = 150  # ~2.7 MB of stdlib source: builds in well under a second


def make_data_cfg(data_dir: str, **overrides):
  """A ConfigDict with the contract's seed/seq_len/batch_size/data/tokenizer fields.

  Overrides named seed, seq_len or batch_size set those; any other sets cfg.data.<name>.
  """
  import ml_collections  # pylint: disable=g-import-not-at-top
  cfg = ml_collections.ConfigDict()
  cfg.seed = 0
  cfg.seq_len = 32
  cfg.batch_size = 16
  cfg.data = ml_collections.ConfigDict(dict(
      name="pystdlib", tfds_name="", text_key="text", data_dir=str(data_dir), glob="",
      include_tests=False, max_files=PYSTDLIB_TEST_FILES, train_split="train",
      eval_split="validation", eval_sequences=8, worker_count=0))
  for key, value in overrides.items():
    (cfg if key in ("seed", "seq_len", "batch_size") else cfg.data)[key] = value
  cfg.tokenizer = ml_collections.ConfigDict(dict(
      name="bytes", vocab_size=512, path="", encoding="", train_bytes=300_000))
  return cfg


@pytest.fixture(scope="session")
def pystdlib_cfg(tmp_path_factory):
  """Tiny pystdlib config (150 files, T=32, B=16, bytes), its dataset built once per session.

  Shared by all tests: copy it (`copy.deepcopy(cfg)`) before changing any field.
  """
  from bscan import data  # pylint: disable=g-import-not-at-top
  cfg = make_data_cfg(str(tmp_path_factory.mktemp("tensorflow_datasets")))
  data.get_source(cfg, cfg.data.train_split)  # builds it
  return cfg
