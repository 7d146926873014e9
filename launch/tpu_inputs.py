"""What launch.tpu accepts from a user: zone, accelerator, TPU names, sweep dir, --remote_dir,
--package; and what an accelerator type is (its JAX devices and hosts).

Each check returns its value or raises ConfigError with the flag and the fix, before any
gcloud command runs or any worker sees the value.
"""

import os
import re
from typing import Any

from packaging import requirements

from bscan.errors import ConfigError
from launch import cli

ZONE_RE = re.compile(r"^[a-z]+-[a-z]+[0-9]+-[a-z]$")
ACCELERATOR_RE = re.compile(r"^(v2|v3|v4|v5p|v5litepod|v6e)-([0-9]+)$")
TPU_NAME_RE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
# Plain path characters only: no shell word splitting, globbing, expansion or 'host:' part.
REMOTE_DIR_RE = re.compile(r"^[A-Za-z0-9._/~-]+$")
_LOCAL_PACKAGE_SUFFIXES = (".whl", ".tar.gz", ".tgz", ".zip")


def validate_zone(zone: str) -> str:
  """Returns zone, or raises ConfigError for strings gcloud would reject (us-central2-b)."""
  if not zone or not ZONE_RE.fullmatch(zone):
    raise ConfigError(f"--zone={zone!r} is not a zone like us-central2-b or europe-west4-a")
  return zone


def validate_accelerator(accelerator: str) -> str:
  """Returns the TPU generation of e.g. 'v4-8'; ConfigError for malformed types."""
  m = ACCELERATOR_RE.fullmatch(accelerator or "")
  n = int(m.group(2)) if m else 0
  if not m or n < 1 or n & (n - 1) or (m.group(1) in ("v2", "v3", "v4", "v5p") and n < 8):
    raise ConfigError(f"--accelerator_type={accelerator!r} is not a TPU type like v4-8, "
                     "v5litepod-16, v5p-128 or v6e-8 (generation-cores/chips, a power of 2)")
  return m.group(1)


def topology(accelerator: str) -> tuple[int, int]:
  """(JAX devices, hosts) of a slice, e.g. v4-32 -> (16, 4); ConfigError for malformed types.

  The number after the generation counts TensorCores for v2-v5p and chips for v5litepod and
  v6e. JAX sees one device per chip on v4 and v5p (megacore: 2 cores per chip), one per core
  on v2 and v3. A host holds 4 chips (8 cores) on v2-v5p; v5litepod and v6e slices up to 8
  chips are one host, larger ones 4 chips per host.
  """
  generation = validate_accelerator(accelerator)
  n = int(accelerator.rsplit("-", 1)[1])
  if generation in ("v5litepod", "v6e"):
    return n, 1 if n <= 8 else n // 4
  return n // 2 if generation in ("v4", "v5p") else n, max(1, n // 8)


def describe_topology(accelerator: str) -> str:
  """'v4-32 (16 devices, 4 hosts)'."""
  devices, hosts = topology(accelerator)
  return (f"{accelerator} ({devices} device{'s' * (devices > 1)}, "
          f"{hosts} host{'s' * (hosts > 1)})")


def validate_sweep_dir(sweep_dir: str) -> str:
  """Returns sweep_dir: gs://BUCKET/PATH or an absolute path every worker mounts."""
  if sweep_dir.startswith("gs://") and len(sweep_dir.rstrip("/")) > len("gs://"):
    return cli.check_one_line("workdir", sweep_dir)
  if "://" in sweep_dir or not sweep_dir.startswith("/"):
    raise ConfigError(f"--workdir={sweep_dir!r}: TPU workers and this launcher must all see the "
                      "sweep dir; use gs://BUCKET/PATH, or an absolute path that every worker "
                      "mounts (NFS, Filestore, gcsfuse)")
  return cli.check_one_line("workdir", sweep_dir)


def validate_remote_dir(remote_dir: str) -> str:
  """Returns remote_dir; ConfigError unless it holds only plain path characters."""
  if not REMOTE_DIR_RE.fullmatch(remote_dir) or remote_dir.startswith("-"):
    raise ConfigError(f"--remote_dir={remote_dir!r}: use only letters, digits and ._/~- (not "
                      "first '-'): it lands in an scp destination, which the worker's shell "
                      "expands")
  return remote_dir


def validate_package(flag: str, value: str) -> str:
  """Returns value: an existing local path or one pip requirement; ConfigError otherwise.

  Checked here so that a typo fails once, before any worker installs anything.
  """
  if os.path.exists(value) and "://" not in value:
    return value
  cli.check_one_line(flag, value)
  example = "e.g. 'bscan @ git+https://github.com/ORG/bscan@COMMIT' or ./dist/bscan-0.1.0.tar.gz"
  if value.startswith("-"):  # pip would take it as an option (-e, -r, --index-url ...)
    raise ConfigError(f"--{flag}={value!r}: pip would read it as an option; give one "
                      f"requirement or a local path, {example}")
  if re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*://\S+", value):  # a bare URL, which pip accepts
    return value
  if value.endswith(_LOCAL_PACKAGE_SUFFIXES) or value.startswith(("/", "./", "../", "~")):
    raise ConfigError(f"--{flag}={value!r}: no such file or directory here; build it first "
                      "or fix the path")
  try:
    requirements.Requirement(value)
  except requirements.InvalidRequirement as e:
    raise ConfigError(f"--{flag}={value!r} is neither a local path nor a pip requirement "
                      f"({str(e).splitlines()[0]}); {example}") from e
  return value


def validate_name(flag: str, name: str) -> str:
  """Returns name ('' allowed): a valid TPU / queued resource name, else ConfigError."""
  if name and not TPU_NAME_RE.fullmatch(name):
    raise ConfigError(f"--{flag}={name!r}: use lowercase letters, digits and '-', starting "
                      "with a letter")
  return name


def check_options(o: Any) -> str:
  """Checks a TpuLauncher's option values (one ConfigError per fault); returns the generation."""
  validate_zone(o.zone)
  generation = validate_accelerator(o.accelerator_type)
  if o.points_per_slice < 1:
    raise ConfigError(f"--points_per_slice={o.points_per_slice}: must be >= 1")
  if o.poll_s <= 0 or o.wait_timeout_s < 0 or o.log_copy_s <= 0:
    raise ConfigError(f"--poll_s={o.poll_s} and --log_copy_s={o.log_copy_s} must be > 0, "
                      f"--wait_timeout_s={o.wait_timeout_s} >= 0")
  if o.max_recreations < 0:
    raise ConfigError(f"--max_recreations={o.max_recreations}: must be >= 0")
  if o.watch and o.tpu_name:
    raise ConfigError(f"--watch recreates slices, which --tpu_name={o.tpu_name} (an existing "
                      "TPU VM) cannot be; rerun `run` to continue its points")
  validate_sweep_dir(o.sweep_dir)
  validate_name("name_prefix", o.name_prefix)
  validate_name("tpu_name", o.tpu_name)
  if not o.remote_python and not o.remote_venv:
    raise ConfigError("--remote_venv and --remote_python are both empty; give one")
  for flag in ("remote_python", "remote_venv", "remote_python_version", "trainer"):
    cli.check_one_line(flag, getattr(o, flag))
  validate_remote_dir(o.remote_dir)
  validate_package("package", o.package)
  for extra in o.pip_extra:
    validate_package("pip_extra", extra)
  return generation
