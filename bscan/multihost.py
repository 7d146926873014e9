"""Starts JAX's multi-process runtime, and checks the backend, before anything else uses JAX.

One process per host (a TPU VM worker, a SLURM node, or a local process standing in for
one): `jax.distributed.initialize` with explicit flags where given, else JAX's own cluster
detection. JAX reports a coordinator it cannot reach only by aborting the process after
`initialization_timeout` (exit 134, a C++ stack trace); so a process that is not the
coordinator first checks the address with a plain TCP connect and fails with one line.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import socket
import time

from bscan.errors import ConfigError

MODES = ("auto", "on", "off")
BACKENDS = ("any", "cpu", "gpu", "tpu")


@dataclasses.dataclass(frozen=True)
class Options:
  """The trainer's multi-process flags (the arguments of jax.distributed.initialize)."""

  mode: str = "auto"  # auto | on | off
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  initialization_timeout: int = 300
  heartbeat_timeout: int = 100

  @property
  def explicit(self) -> bool:
    return any(v is not None for v in (self.coordinator_address, self.num_processes,
                                       self.process_id))


def validate(opts: Options) -> None:
  """ConfigError naming the flag for values jax.distributed.initialize would choke on."""
  if opts.mode not in MODES:
    raise ConfigError(f"--multihost={opts.mode!r}: use one of {MODES}")
  for flag in ("initialization_timeout", "heartbeat_timeout"):
    if getattr(opts, flag) < 1:
      raise ConfigError(f"--{flag}={getattr(opts, flag)}: give seconds >= 1")
  if opts.mode == "off" and opts.explicit:
    raise ConfigError("--multihost=off with --coordinator_address/--num_processes/"
                      "--process_id: drop those flags, or use --multihost=on")
  if opts.num_processes is not None and opts.num_processes < 1:
    raise ConfigError(f"--num_processes={opts.num_processes}: must be >= 1")
  if opts.process_id is not None and not (
      0 <= opts.process_id < (opts.num_processes or opts.process_id + 1)):
    raise ConfigError(f"--process_id={opts.process_id}: must be in [0, --num_processes="
                      f"{opts.num_processes})")
  if opts.coordinator_address is not None:
    split_address(opts.coordinator_address)


def split_address(address: str) -> tuple[str, int]:
  """'host:port' or '[v6]:port' -> (host, port); ConfigError otherwise."""
  host, sep, port = address.rpartition(":")
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ConfigError(f"--coordinator_address={address!r}: give HOST:PORT, e.g. 10.0.0.2:8476")
  return host.strip("[]"), int(port)


def wait_for_coordinator(address: str, timeout_s: float, process_id: int | None) -> None:
  """Returns once address accepts TCP connections; ConfigError after timeout_s."""
  host, port = split_address(address)
  deadline = time.monotonic() + timeout_s
  error: OSError | None = None
  while True:
    try:
      with socket.create_connection((host, port), timeout=max(0.1, min(
          2.0, deadline - time.monotonic()))):
        return
    except OSError as e:
      error = e
    if time.monotonic() >= deadline:
      break
    time.sleep(0.2)
  raise ConfigError(
      f"process {process_id} cannot reach the coordinator at {address} within {timeout_s:g} s "
      f"({error.strerror or error}); start process 0 there, or fix --coordinator_address "
      "(see --initialization_timeout)")


def initialize(opts: Options) -> bool:
  """Starts the multi-process runtime as opts say; True when it did (False: one process)."""
  validate(opts)
  if opts.mode == "off":
    return False
  import jax  # pylint: disable=g-import-not-at-top  (after flag checks: a fast error)

  address = opts.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  # Cross-process collectives on CPU (local processes standing in for hosts) need gloo.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if address and opts.process_id:
    wait_for_coordinator(address, opts.initialization_timeout, opts.process_id)
  try:
    jax.distributed.initialize(
        coordinator_address=opts.coordinator_address, num_processes=opts.num_processes,
        process_id=opts.process_id, initialization_timeout=opts.initialization_timeout,
        heartbeat_timeout_seconds=opts.heartbeat_timeout)
  except ValueError as e:  # JAX's cluster detection found nothing, and flags do not say
    if opts.mode == "auto" and not opts.explicit and not address:
      return False  # not a multi-process job: JAX runs single-process
    raise ConfigError(
        f"--multihost={opts.mode}: {e} JAX found no cluster to join; pass "
        "--coordinator_address, --num_processes and --process_id, or use --multihost=off") from e
  except RuntimeError as e:  # the coordinator refused us, or a peer never came (deadline)
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ConfigError(f"jax.distributed.initialize failed: {first}") from e
  return True


def visible_gpus(dev_dir: str = "/dev") -> list[str]:
  """NVIDIA GPUs this process could use (device files), unless CUDA_VISIBLE_DEVICES hides them."""
  if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
    return []
  return sorted(os.path.basename(p) for p in glob.glob(os.path.join(dev_dir, "nvidia[0-9]*")))


def check_backend(expected: str, allow_cpu: bool, dev_dir: str = "/dev") -> str:
  """JAX's backend, once checked: ConfigError where a run would train on CPU by mistake."""
  if expected not in BACKENDS:
    raise ConfigError(f"--backend={expected!r}: use one of {BACKENDS}")
  import jax  # pylint: disable=g-import-not-at-top

  backend = jax.default_backend()
  if backend == "cpu" and allow_cpu:
    return backend
  install = ("install JAX for them (pip install 'bscan[cuda12]', see README 'Install'), or "
             "pass --allow_cpu to train on CPU on purpose")
  if expected != "any" and backend != expected:
    raise ConfigError(f"--backend={expected}: JAX runs on {backend} "
                      f"({jax.devices()[0].device_kind}); "
                      + (install if expected == "gpu" else "install JAX for it (README 'Install')"))
  gpus = visible_gpus(dev_dir)
  if expected == "any" and backend == "cpu" and gpus:
    raise ConfigError(f"GPUs are visible ({', '.join(gpus)}) but JAX loaded only the CPU; "
                      + install)
  return backend
