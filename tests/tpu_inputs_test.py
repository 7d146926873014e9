"""launch.tpu_inputs: what launch.tpu accepts (zone, accelerator, sweep dir, --remote_dir,
--package) and what an accelerator type is (its JAX devices and hosts)."""

import pytest

from bscan.errors import ConfigError
from launch import tpu_inputs


@pytest.mark.parametrize("zone, ok", [("us-central2-b", True), ("europe-west4-a", True),
                                      ("us-central2", False), ("us central2-b", False),
                                      ("us-central2-b; rm", False)])
def test_zone_validation(zone: str, ok: bool):
  """Zones look like us-central2-b."""
  if ok:
    assert tpu_inputs.validate_zone(zone) == zone
  else:
    with pytest.raises(ValueError, match="not a zone"):
      tpu_inputs.validate_zone(zone)


@pytest.mark.parametrize("accelerator, ok", [
    ("v4-8", True), ("v5litepod-16", True), ("v5p-128", True), ("v6e-8", True),
    ("v5litepod-1", True), ("v4-6", False), ("v4-4", False), ("v5e-8", False), ("tpu-v4", False),
    ("v4-8 --spot", False)])
def test_accelerator_validation(accelerator: str, ok: bool):
  """Accelerator types are generation-size with a power-of-two size."""
  if ok:
    tpu_inputs.validate_accelerator(accelerator)
  else:
    with pytest.raises(ValueError, match="not a TPU type"):
      tpu_inputs.validate_accelerator(accelerator)


@pytest.mark.parametrize("package, ok", [
    ("bscan @ git+https://github.com/ORG/bscan@abc123", True), ("git+https://x/y", True),
    ("bscan[gcs]==0.1.0", True), (".", True), ("bscan @@ git+https://x", False),
    ("-e .", False), ("--index-url=https://evil", False), ("dist/bscan-0.1.0.tar.gz", False),
    ("bscan\n-r /etc/passwd", False), ("bscan; rm -rf ~", False)])
def test_package_is_checked_before_any_worker_sees_it(package: str, ok: bool):
  """--package is a local path, a bare URL or one PEP 508 requirement; nothing else."""
  if ok:
    assert tpu_inputs.validate_package("package", package) == package
  else:
    with pytest.raises(ConfigError, match="--package="):
      tpu_inputs.validate_package("package", package)


@pytest.mark.parametrize("remote_dir, ok", [
    ("bscan_run", True), ("~/runs/b-1.2", True), ("/tmp/x", True), ("run dir", False),
    ("$(reboot)", False), ("x;touch y", False), ("-oProxyCommand=x", False), ("a\nb", False),
    ("host:dir", False), ("*", False)])
def test_remote_dir_takes_only_plain_path_characters(remote_dir: str, ok: bool):
  """--remote_dir ends up in an scp destination that the worker's shell expands."""
  if ok:
    assert tpu_inputs.validate_remote_dir(remote_dir) == remote_dir
  else:
    with pytest.raises(ConfigError, match="--remote_dir="):
      tpu_inputs.validate_remote_dir(remote_dir)


@pytest.mark.parametrize("check, value", [
    (tpu_inputs.validate_zone, "us-central2-b\n"), (tpu_inputs.validate_accelerator, "v4-8\n"),
    (tpu_inputs.validate_remote_dir, "bscan_run\n")])
def test_a_trailing_newline_is_not_accepted(check, value: str):
  """Patterns match the whole value ('$' alone would let a final newline through)."""
  with pytest.raises(ConfigError):
    check(value)


@pytest.mark.parametrize("accelerator, devices, hosts", [
    ("v2-8", 8, 1), ("v3-32", 32, 4), ("v4-8", 4, 1), ("v4-16", 8, 2), ("v4-32", 16, 4),
    ("v5p-128", 64, 16), ("v5litepod-1", 1, 1), ("v5litepod-8", 8, 1), ("v5litepod-16", 16, 4),
    ("v6e-256", 256, 64)])
def test_topology_is_jax_devices_and_hosts(accelerator: str, devices: int, hosts: int):
  """v4/v5p count cores (2 per JAX device), v2/v3 cores, v5litepod/v6e chips."""
  assert tpu_inputs.topology(accelerator) == (devices, hosts)


@pytest.mark.parametrize("sweep_dir, ok", [
    ("gs://bucket/scan", True), ("/mnt/filestore/scan", True), ("/gcs/bucket/scan", True),
    ("runs/scan", False), ("~/scan", False), ("gs://", False), ("s3://bucket/scan", False),
    ("/mnt/x\n", False)])
def test_sweep_dir_is_a_bucket_or_an_absolute_shared_path(sweep_dir: str, ok: bool):
  """Workers and the launcher must both see the sweep dir: gs:// or an absolute mount."""
  if ok:
    assert tpu_inputs.validate_sweep_dir(sweep_dir) == sweep_dir
  else:
    with pytest.raises(ConfigError, match="--workdir="):
      tpu_inputs.validate_sweep_dir(sweep_dir)
