"""What TPU workers pip install: a pip requirement as given, or a local path copied to them.

A local source dir is packed to a tarball named by its sweep's slice prefix, so two sweeps
launched at once never overwrite each other's package.
"""

from __future__ import annotations

import os
import tarfile
import tempfile

_TAR_EXCLUDE = {".git", ".venv", "runs", "__pycache__", "build", ".pytest_cache", "data"}


def is_local(package: str) -> bool:
  return os.path.exists(package) and "://" not in package


def package_files(package: str, prefix: str, remote_dir: str,
                  dry_run: bool = False) -> tuple[list[str], str]:
  """Local files to copy to remote_dir on the workers, and the requirement that installs it."""
  if not is_local(package):
    return [], package
  path = package
  if os.path.isdir(path):  # one file per sweep: concurrent sweeps never share one
    path = os.path.join(tempfile.gettempdir(), f"{prefix}-src.tar.gz")
    if not dry_run:
      with tarfile.open(path, "w:gz") as tar:
        tar.add(package, arcname="bscan-src", filter=lambda t: None if any(
            part in _TAR_EXCLUDE or part.endswith(".egg-info")
            for part in t.name.split("/")) else t)
  return [path], f"{remote_dir}/{os.path.basename(path)}"
