"""Text corpora as random-access sources: the embedded Python stdlib, local files, TFDS.

The embedded default `pystdlib` is the running interpreter's standard-library source,
built once into the data dir as a TFDS dataset in ArrayRecord format (no TensorFlow).
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import functools
import glob as glob_lib
import hashlib
import os
import sys
import sysconfig

from absl import logging
from etils import epath
import tensorflow_datasets as tfds

from bscan.errors import ConfigError

DATASET_NAMES = ("pystdlib", "text_files", "tfds")
# A directory with one of these names holds tests (Lib/test, unittest/test, lib2to3/tests,
# idlelib/idle_test, ...). Only directory components count, so doctest.py is not a test.
TEST_DIR_NAMES = frozenset({"test", "tests", "idle_test"})
# Generated when Python is built (install prefixes, compiler flags): different on every
# installation of the same version, so never part of the corpus.
BUILD_FILE_PREFIX = "_sysconfigdata_"
BUILD_DIR_PREFIX = "config-"  # e.g. config-3.11-x86_64-linux-gnu (python-config.py)
# Per mille of files (by hash of their relative path) that go to the validation split.
VALIDATION_PER_MILLE = 20
DEFAULT_DATA_DIR = "~/.cache/bscan/tensorflow_datasets"


def data_dir(cfg_data_dir: str = "") -> epath.Path:
  """cfg.data.data_dir, else $BSCAN_DATA_DIR, else ~/.cache/bscan/tensorflow_datasets."""
  path = cfg_data_dir or os.environ.get("BSCAN_DATA_DIR", "") or DEFAULT_DATA_DIR
  return epath.Path(os.path.expanduser(path) if not path.startswith("gs://") else path)


def _hash_int(text: str) -> int:
  return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def split_of(relpath: str) -> str:
  """'validation' for ~2% of paths, chosen by a hash of the path (stable across machines)."""
  return "validation" if _hash_int(relpath) % 1000 < VALIDATION_PER_MILLE else "train"


def split_files(relpaths: Sequence[str]) -> dict[str, list[str]]:
  """Deterministic train/validation split by path hash; validation never empty."""
  splits = {"train": [], "validation": []}
  for p in sorted(relpaths):
    splits[split_of(p)].append(p)
  if not splits["validation"] and len(relpaths) > 1:
    # Tiny subsets: hold out the file with the smallest hash so eval always has data.
    held = min(splits["train"], key=_hash_int)
    splits["train"].remove(held)
    splits["validation"].append(held)
  return splits


def is_test_path(relpath: str) -> bool:
  """Whether a stdlib-relative path lies in a test directory (see TEST_DIR_NAMES)."""
  return any(part in TEST_DIR_NAMES for part in relpath.split("/")[:-1])


def stdlib_dir() -> str:
  return sysconfig.get_paths()["stdlib"]


def stdlib_files(include_tests: bool, max_files: int = 0) -> list[str]:
  """Relative paths of the stdlib's `*.py` files, sorted; never under `*-packages`, never
  the build-generated `_sysconfigdata_*.py` or `config-*/` (they differ between installs).

  max_files > 0 keeps a deterministic pseudo-random subset (smallest path hashes), so
  small test corpora still span many packages.
  """
  root = stdlib_dir()
  files = []
  for dirpath, dirnames, filenames in os.walk(root):
    # Prune in place: os.walk then never descends into site-packages / dist-packages.
    dirnames[:] = [d for d in dirnames if not d.endswith("-packages") and d != "__pycache__"
                   and not d.startswith(BUILD_DIR_PREFIX)]
    for name in filenames:
      if name.endswith(".py") and not name.startswith(BUILD_FILE_PREFIX):
        rel = os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/")
        if include_tests or not is_test_path(rel):
          files.append(rel)
  files.sort()
  if max_files:
    files = sorted(sorted(files, key=_hash_int)[:max_files])
  return files


@dataclasses.dataclass(frozen=True)
class Fingerprint:
  """What a corpus was built from: file count, total bytes, sha256 of sorted (path, content)."""
  num_files: int
  num_bytes: int
  sha256: str


def fingerprint(root: str, relpaths: Sequence[str]) -> Fingerprint:
  h = hashlib.sha256()
  num_bytes = 0
  for rel in sorted(relpaths):
    content = epath.Path(root, rel).read_bytes()
    num_bytes += len(content)
    # Length-prefixed so that (path, content) boundaries are unambiguous.
    for part in (rel.encode("utf-8"), content):
      h.update(len(part).to_bytes(8, "big"))
      h.update(part)
  return Fingerprint(len(relpaths), num_bytes, h.hexdigest())


def pystdlib_config_name(include_tests: bool, max_files: int) -> str:
  """Distinct per Python version and subset, so subsets never collide in the data dir."""
  v = sys.version_info
  return f"py{v.major}{v.minor}{v.micro}_tests{int(include_tests)}_max{max_files}"


class PyStdlibConfig(tfds.core.BuilderConfig):
  """A pystdlib file set: tests in or out, optionally a subset of max_files."""

  def __init__(self, *, include_tests: bool, max_files: int):
    super().__init__(name=pystdlib_config_name(include_tests, max_files),
                     description=f"include_tests={include_tests}, max_files={max_files}")
    self.include_tests = include_tests
    self.max_files = max_files


class Pystdlib(tfds.core.GeneratorBasedBuilder):
  """Source files (`*.py`) of the running Python's standard library, one per example."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.1.0": "Build-generated files (_sysconfigdata_*, config-*/) left out."}
  # Nothing is downloaded; also skips TFDS's checksum-file lookup, which needs the
  # optional importlib_resources package.
  url_infos = None
  # Configs are made on demand (see pystdlib_builder); listed ones are just the common two.
  BUILDER_CONFIGS = [PyStdlibConfig(include_tests=False, max_files=0),
                     PyStdlibConfig(include_tests=True, max_files=0)]

  def _info(self) -> tfds.core.DatasetInfo:
    # DatasetInfo built directly: dataset_info_from_configs() needs a package directory
    # layout (raises NotADirectoryError otherwise).
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"*.py files under {stdlib_dir()} (never *-packages); "
                    f"tests are files under a directory named one of {sorted(TEST_DIR_NAMES)}.",
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(),   # raw file bytes, exactly as on disk
            "path": tfds.features.Text(),   # relative to the stdlib dir
        }),
        metadata=tfds.core.MetadataDict(),
    )

  def _files(self) -> list[str]:
    return stdlib_files(self.builder_config.include_tests, self.builder_config.max_files)

  def _split_generators(self, dl_manager):
    del dl_manager
    files = self._files()
    fp = fingerprint(stdlib_dir(), files)
    self.info.metadata.update(
        fingerprint=dataclasses.asdict(fp), python_version=sys.version.split()[0],
        include_tests=self.builder_config.include_tests,
        max_files=self.builder_config.max_files)
    return {split: self._generate_examples(paths)
            for split, paths in split_files(files).items()}

  def _generate_examples(self, relpaths):
    root = stdlib_dir()
    for rel in relpaths:
      yield rel, {"text": epath.Path(root, rel).read_bytes(), "path": rel}


def pystdlib_builder(include_tests: bool, max_files: int, data_dir_: epath.Path) -> Pystdlib:
  """The (maybe not yet prepared) builder of one pystdlib file set."""
  name = pystdlib_config_name(include_tests, max_files)
  # TFDS rejects a config object named like a listed one unless it is that very object
  # (a pickled copy in a grain worker is not): listed configs go by name.
  listed = any(c.name == name for c in Pystdlib.BUILDER_CONFIGS)
  config = name if listed else PyStdlibConfig(include_tests=include_tests, max_files=max_files)
  return Pystdlib(config=config, data_dir=os.fspath(data_dir_), file_format="array_record")


def prepare(builder: tfds.core.DatasetBuilder) -> None:
  """Builds the dataset if needed; tolerates another process finishing it first."""
  if builder.is_prepared():
    return
  print(f"preparing {builder.info.full_name} in {builder.data_dir} (once)", flush=True)
  tfds.display_progress_bar(False)
  try:
    builder.download_and_prepare(file_format="array_record")
  except Exception:  # pylint: disable=broad-exception-caught
    # Concurrent runs (a local sweep, or every host of a pod) may race on the final
    # rename: someone else's complete copy is as good as ours.
    builder = type(builder)(config=builder.builder_config, version=builder.version,
                            data_dir=os.fspath(builder.data_dir_root),
                            file_format="array_record")
    if not builder.is_prepared():
      raise


def pystdlib_source(include_tests: bool, max_files: int, data_dir_: epath.Path,
                    split: str) -> Sequence[dict]:
  """Random-access records {'text': bytes, 'path': bytes} of one split; builds on first use."""
  builder = pystdlib_builder(include_tests, max_files, data_dir_)
  prepare(builder)
  _check_fingerprint(builder)
  return builder.as_data_source(split)


@functools.cache
def local_fingerprint(include_tests: bool, max_files: int) -> Fingerprint:
  """This interpreter's pystdlib file set, fingerprinted."""
  return fingerprint(stdlib_dir(), stdlib_files(include_tests, max_files))


def _check_fingerprint(builder: Pystdlib) -> None:
  """A shared data dir may hold a copy built from another interpreter's stdlib: refuse it."""
  stored = Fingerprint(**builder.info.metadata["fingerprint"])
  cfg = builder.builder_config
  local = local_fingerprint(cfg.include_tests, cfg.max_files)
  if stored != local:
    raise ConfigError(
        f"The pystdlib dataset in {builder.data_dir} was built from a different standard "
        f"library ({stored.num_files} files, {stored.num_bytes} bytes, sha256 "
        f"{stored.sha256[:12]}…) than this interpreter's ({local.num_files} files, "
        f"{local.num_bytes} bytes, {local.sha256[:12]}…); point cfg.data.data_dir elsewhere "
        "or delete that copy.")


def pystdlib_fingerprint(include_tests: bool, max_files: int,
                         data_dir_: epath.Path) -> Fingerprint:
  """The fingerprint recorded in a built pystdlib dataset's metadata."""
  builder = pystdlib_builder(include_tests, max_files, data_dir_)
  prepare(builder)
  return Fingerprint(**builder.info.metadata["fingerprint"])


class TextFilesSource(Sequence):
  """Local (or gs://) text files as records {'text': bytes, 'path': str}, read lazily."""

  def __init__(self, paths: Sequence[str]):
    self._paths = list(paths)

  def __len__(self) -> int:
    return len(self._paths)

  def __getitem__(self, index: int) -> dict:
    path = self._paths[index]
    return {"text": epath.Path(path).read_bytes(), "path": path}


def glob_files(pattern: str) -> list[str]:
  """Files matching a glob (`**` recursive; gs:// via epath), sorted."""
  if pattern.startswith("gs://"):
    bucket, _, rest = pattern[len("gs://"):].partition("/")
    return sorted(os.fspath(p) for p in epath.Path(f"gs://{bucket}").glob(rest))
  return sorted(p for p in glob_lib.glob(os.path.expanduser(pattern), recursive=True)
                if os.path.isfile(p))


def _glob_root(pattern: str) -> str:
  """The directory part of a glob before its first wildcard."""
  head = pattern.split("*", 1)[0].split("?", 1)[0].split("[", 1)[0]
  return head if head.endswith("/") else os.path.dirname(head)


def text_files_source(pattern: str, split: str) -> TextFilesSource:
  """One split of the files matching `pattern`, split by hash of each path relative to the
  glob's root (so the split does not depend on the working directory or mount point)."""
  files = glob_files(pattern)
  if not files:
    raise ConfigError(f"data.glob={pattern!r} matches no files.")
  root = _glob_root(os.path.expanduser(pattern))
  by_rel = {os.path.relpath(f, root) if not f.startswith("gs://") else f[len(root):]: f
            for f in files}
  return TextFilesSource([by_rel[rel] for rel in split_files(list(by_rel))[split]])


def check_tfds(name: str, data_dir_: epath.Path, download: bool = False) -> None:
  """data.tfds_name must be a TFDS dataset, prepared (as ArrayRecord) under the data dir
  unless `download` lets the run prepare it.

  A prepared copy is read from its files: its builder class need not import here (c4's
  needs TensorFlow, which TPU workers with only jax[tpu] lack).
  """
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)  # TFDS warns about every missing version folder
  try:
    prepared = tfds.builder(name, data_dir=os.fspath(data_dir_)).is_prepared()
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ConfigError(f"data.tfds_name={name!r} is not a TFDS dataset this installation knows, "
                      f"nor one prepared in {data_dir_}; check the spelling (e.g. 'lm1b', "
                      "'c4/en', 'pg19') and data.data_dir") from e
  except Exception as e:  # pylint: disable=broad-exception-caught  (an unknown config or version)
    raise ConfigError(f"data.tfds_name={name!r}: {type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}") from e
  finally:
    logging.set_verbosity(verbosity)
  if not prepared and not download:
    raise ConfigError(f"data.tfds_name={name!r} is not prepared in {data_dir_}; set "
                      "data.data_dir to where its ArrayRecord files live (README, 'Data'), "
                      "or data.download=True to let the run download and prepare it")


def tfds_source(name: str, split: str, data_dir_: epath.Path,
                download: bool = False) -> Sequence[dict]:
  """A TFDS dataset's split as ArrayRecord; with `download`, downloaded and prepared first
  (once: an existing copy is used, and a concurrent run finishing first is fine)."""
  if download:
    prepare(tfds.builder(name, data_dir=os.fspath(data_dir_), file_format="array_record"))
  try:
    return tfds.data_source(name, split=split, data_dir=os.fspath(data_dir_), download=False)
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise ConfigError(
        f"data.tfds_name={name!r}, split={split!r}: could not open it in {data_dir_} "
        f"({type(e).__name__}: {e}). bscan reads TFDS datasets prepared in ArrayRecord "
        "format (see README, 'Data'); set cfg.data.data_dir to where it lives.") from e
