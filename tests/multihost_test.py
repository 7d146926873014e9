"""bscan.multihost: flag checks, the coordinator pre-check, the backend refusal; the starter's
arguments and exit words (the processes themselves run in tests/multiprocess_test.py)."""

import os
import socket
import subprocess
import sys
import time

import pytest

from bscan import multihost
from bscan.errors import ConfigError
from launch import multiprocess


@pytest.mark.parametrize("opts, message", [
    (multihost.Options(mode="off", process_id=1), "--multihost=off with --coordinator_address"),
    (multihost.Options(num_processes=0), "--num_processes=0: must be >= 1"),
    (multihost.Options(num_processes=2, process_id=2), "--process_id=2: must be in [0, "),
    (multihost.Options(coordinator_address="10.0.0.2"), "give HOST:PORT"),
    (multihost.Options(coordinator_address="h:99999"), "give HOST:PORT"),
    (multihost.Options(initialization_timeout=0), "--initialization_timeout=0: give seconds"),
    (multihost.Options(heartbeat_timeout=0), "--heartbeat_timeout=0: give seconds"),
])
def test_bad_flags_are_named(opts, message):
  with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
    multihost.validate(opts)


def test_split_address_takes_ipv6():
  assert multihost.split_address("[::1]:8476") == ("::1", 8476)
  assert multihost.split_address("10.0.0.2:8476") == ("10.0.0.2", 8476)


def test_coordinator_check_fails_at_its_deadline_and_passes_once_listening():
  port = multiprocess.free_port()
  start = time.monotonic()
  with pytest.raises(ConfigError, match=f"process 1 cannot reach the coordinator at "
                     f"127.0.0.1:{port} within 0.5 s"):
    multihost.wait_for_coordinator(f"127.0.0.1:{port}", 0.5, 1)
  assert time.monotonic() - start < 5
  with socket.socket() as server:
    server.bind(("127.0.0.1", 0))
    server.listen()
    multihost.wait_for_coordinator(f"127.0.0.1:{server.getsockname()[1]}", 5, 1)


def test_off_and_undetected_auto_stay_single_process():
  """In a fresh process (JAX's runtime starts once, before any computation)."""
  code = ("from bscan import multihost; import jax; "
          "print(multihost.initialize(multihost.Options(mode='off')), "
          "multihost.initialize(multihost.Options(mode='auto')), jax.process_count())")
  env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "TPU_"))}
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=120, check=False)
  assert out.stdout.split() == ["False", "False", "1"], out.stderr[-2000:]


def test_cpu_is_refused_where_gpus_are_visible_or_asked_for(tmp_path, monkeypatch):
  monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
  assert multihost.check_backend("any", allow_cpu=False, dev_dir=str(tmp_path)) == "cpu"
  (tmp_path / "nvidia0").touch()
  (tmp_path / "nvidiactl").touch()  # not a GPU
  assert multihost.visible_gpus(str(tmp_path)) == ["nvidia0"]
  with pytest.raises(ConfigError, match=r"GPUs are visible \(nvidia0\) but JAX loaded only "
                     r"the CPU; install JAX for them \(pip install 'bscan\[cuda12\]'"):
    multihost.check_backend("any", allow_cpu=False, dev_dir=str(tmp_path))
  assert multihost.check_backend("any", allow_cpu=True, dev_dir=str(tmp_path)) == "cpu"
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # hidden on purpose
  assert multihost.check_backend("any", allow_cpu=False, dev_dir=str(tmp_path)) == "cpu"
  with pytest.raises(ConfigError, match=r"--backend=gpu: JAX runs on cpu \(cpu\); install"):
    multihost.check_backend("gpu", allow_cpu=False, dev_dir=str(tmp_path))
  assert multihost.check_backend("gpu", allow_cpu=True, dev_dir=str(tmp_path)) == "cpu"
  assert multihost.check_backend("cpu", allow_cpu=False, dev_dir=str(tmp_path)) == "cpu"


def test_starter_refuses_flags_it_sets_and_words_exits():
  with pytest.raises(ConfigError, match="launch.multiprocess sets these itself"):
    multiprocess.Job(trainer_args=["--config=c.py", "--process_id=1"])
  with pytest.raises(ConfigError, match="--processes=0"):
    multiprocess.Job(trainer_args=[], processes=0)
  assert multiprocess.describe_exit(-9) == "killed by SIGKILL"
  assert multiprocess.describe_exit(134).startswith("aborted by JAX (exit 134: a peer was lost")
  env = multiprocess.process_env(4, {"XLA_FLAGS": "--xla_foo=1 "
                                     "--xla_force_host_platform_device_count=8"})
  assert env["XLA_FLAGS"] == "--xla_foo=1 --xla_force_host_platform_device_count=4"
  assert multiprocess.process_command("experiments.train", ["--config=c.py"], "h:1", 2, 1)[-4:] \
      == ["--multihost=on", "--coordinator_address=h:1", "--num_processes=2", "--process_id=1"]


def test_auto_leaves_cluster_detection_to_jax(monkeypatch):
  """A GCE TPU VM sets none of the variables a hand-written guess would look for (no
  TPU_WORKER_HOSTNAMES): auto must ask JAX, whose detection queries the TPU metadata."""
  import jax  # pylint: disable=g-import-not-at-top
  calls = []
  for name in ("TPU_WORKER_HOSTNAMES", "SLURM_NTASKS", "JAX_COORDINATOR_ADDRESS"):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  assert multihost.initialize(multihost.Options(mode="auto", heartbeat_timeout=7))
  assert calls == [dict(coordinator_address=None, num_processes=None, process_id=None,
                        initialization_timeout=300, heartbeat_timeout_seconds=7)]
