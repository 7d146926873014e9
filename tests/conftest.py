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
  from experiments.configs import base  # pylint: disable=g-import-not-at-top
  defaults = base.get_base_config()  # the one place defaults live
  cfg = ml_collections.ConfigDict()
  cfg.seed = 0
  cfg.seq_len = 32
  cfg.batch_size = 16
  cfg.data = defaults.data
  cfg.data.update(dict(data_dir=str(data_dir), max_files=PYSTDLIB_TEST_FILES, eval_sequences=8,
                       shuffle_window=4096))
  for key, value in overrides.items():
    (cfg if key in ("seed", "seq_len", "batch_size") else cfg.data)[key] = value
  cfg.tokenizer = defaults.tokenizer
  cfg.tokenizer.update(dict(vocab_size=512, train_bytes=300_000))
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


@pytest.fixture(scope="session")
def reference(pystdlib_cfg, tmp_path_factory):
  """An uninterrupted tiny 12-step run (tests/tiny_run.py): its config, workdir and rows."""
  from bscan import train  # pylint: disable=g-import-not-at-top
  from experiments.configs import base  # pylint: disable=g-import-not-at-top
  import tiny_run  # pylint: disable=g-import-not-at-top
  cfg = tiny_run.tiny(base.get_base_config(), pystdlib_cfg)
  workdir = tmp_path_factory.mktemp("uninterrupted")
  assert train.run(cfg, workdir) == "done"
  return cfg, tiny_run.rows(workdir), workdir
