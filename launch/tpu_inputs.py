"""What launch.tpu accepts from a user: zone, accelerator, TPU names, --remote_dir, --package.

Each check returns its value or raises ConfigError with the flag and the fix, before any
gcloud command runs or any worker sees the value.
"""

import os
import re

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
