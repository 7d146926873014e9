r"""Runs one training run as P local JAX processes: a pod's hosts, stood in for on one machine.

  python -m launch.multiprocess --processes=2 --devices_per_process=4 -- \
      --config=experiments/configs/demo.py --workdir=runs/demo-2x4

Everything after `--` goes to every `python -m experiments.train` process, which also gets
`--multihost=on --coordinator_address=127.0.0.1:PORT --num_processes=P --process_id=i`.
With --devices_per_process=D each process runs on the CPU with D devices
(--xla_force_host_platform_device_count), so P × D devices train one global batch, as on a
slice of P hosts; the run's metrics match one process with P·D devices. Output lines carry
the process index. SIGINT/SIGTERM reach every process (they agree on a step, checkpoint and
exit 143); rerun the same command to resume. JAX does not stop a job whose peer died: the
survivors wait in a collective until the heartbeat timeout, then abort (exit 134). So when a
process ends with an error while others run, they are stopped after --grace_s and the
process that went first is reported as lost. Exit: 0 all done, 143 preempted, 2 a user
error, 1 otherwise.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from absl import flags

from bscan.errors import ConfigError
from launch import cli

FLAGS = flags.FLAGS
EXIT_PREEMPTED = 143
EXIT_USER_ERROR = 2
EXIT_ABORTED = 134  # JAX's abort (SIGABRT) after a lost peer or a missed deadline
_DEVICE_FLAG = re.compile(r"--xla_force_host_platform_device_count=\S*")


def define_flags() -> None:
  """Defines this binary's flags (only when run as one, so the module imports cleanly)."""
  flags.DEFINE_integer("processes", 2, "JAX processes (stand-ins for hosts).")
  flags.DEFINE_integer("devices_per_process", 0,
                       "CPU devices per process; 0 = the platform's own devices.")
  flags.DEFINE_integer("port", 0, "Coordinator port on 127.0.0.1; 0 = a free one.")
  flags.DEFINE_float("grace_s", 10.0, "Seconds the others get to finish after a process "
                     "fails, before they are stopped.")
  flags.DEFINE_string("trainer", "experiments.train", "Trainer module (python -m).")


def free_port() -> int:
  """A TCP port nobody listens on now (the coordinator binds it a moment later)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(devices: int, base: dict[str, str] | None = None) -> dict[str, str]:
  """The environment of one process: D CPU devices when devices > 0."""
  env = dict(os.environ if base is None else base)
  if devices > 0:
    xla = _DEVICE_FLAG.sub("", env.get("XLA_FLAGS", "")).strip()
    env["XLA_FLAGS"] = f"{xla} --xla_force_host_platform_device_count={devices}".strip()
    env["JAX_PLATFORMS"] = "cpu"
  return env


def process_command(trainer: str, trainer_args: Sequence[str], address: str, count: int,
                    index: int) -> list[str]:
  """argv of process `index`: the trainer's own args plus the multi-process flags."""
  return [sys.executable, "-m", trainer, *trainer_args, "--multihost=on",
          f"--coordinator_address={address}", f"--num_processes={count}",
          f"--process_id={index}"]


def describe_exit(code: int) -> str:
  """An exit status in words (negative: killed by that signal)."""
  if code < 0:
    return f"killed by {signal.Signals(-code).name}"
  if code == EXIT_ABORTED:
    return "aborted by JAX (exit 134: a peer was lost or a deadline passed)"
  if code == EXIT_PREEMPTED:
    return "preempted (exit 143, checkpoint saved)"
  return f"exit {code}"


@dataclasses.dataclass
class Job:
  """P processes of one run: started together, watched, stopped together."""

  trainer_args: Sequence[str]
  processes: int = 2
  devices_per_process: int = 0
  port: int = 0
  grace_s: float = 10.0
  trainer: str = "experiments.train"

  def __post_init__(self):
    if self.processes < 1:
      raise ConfigError(f"--processes={self.processes}: must be >= 1")
    if self.devices_per_process < 0:
      raise ConfigError(f"--devices_per_process={self.devices_per_process}: must be >= 0")
    if not 0 <= self.port < 65536:
      raise ConfigError(f"--port={self.port}: give a TCP port, or 0 for a free one")
    if self.grace_s < 0:
      raise ConfigError(f"--grace_s={self.grace_s}: give seconds >= 0")
    owned = [a for a in self.trainer_args if re.match(
        r"--(no)?(multihost|coordinator_address|num_processes|process_id)\b", a)]
    if owned:
      raise ConfigError(f"{owned}: launch.multiprocess sets these itself; drop them")
    self._procs: list[subprocess.Popen] = []
    self._signals = 0

  def _pipe(self, index: int, stream) -> None:
    for line in iter(stream.readline, ""):
      sys.stdout.write(f"[p{index}] {line}")
      sys.stdout.flush()

  def _on_signal(self, signum, frame) -> None:
    del frame
    self._signals += 1
    for p in self._procs:  # a second Ctrl-C does not wait for the checkpoint
      if p.poll() is None:
        p.send_signal(signal.SIGTERM if self._signals == 1 else signal.SIGKILL)

  def run(self) -> int:
    """Starts the processes, waits for all of them; returns the job's exit code."""
    address = f"127.0.0.1:{self.port or free_port()}"
    print(f"starting {self.processes} processes (coordinator {address}"
          + (f", {self.devices_per_process} CPU devices each" if self.devices_per_process else "")
          + ")", flush=True)
    previous = [signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)]
    threads = []
    try:
      for i in range(self.processes):
        cmd = process_command(self.trainer, self.trainer_args, address, self.processes, i)
        proc = subprocess.Popen(cmd, env=process_env(self.devices_per_process),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                stdin=subprocess.DEVNULL)
        self._procs.append(proc)
        threads.append(threading.Thread(target=self._pipe, args=(i, proc.stdout), daemon=True))
        threads[-1].start()
      first_failure = self._wait()
    finally:
      for p in self._procs:
        if p.poll() is None:
          p.kill()
          p.wait()
      for t in threads:
        t.join(timeout=5)
      for s, handler in zip((signal.SIGINT, signal.SIGTERM), previous):
        signal.signal(s, handler)
    return self._report(first_failure)

  def _wait(self) -> int | None:
    """Waits for every process; stops the rest grace_s after one fails. The first failure."""
    first, deadline = None, None
    while any(p.poll() is None for p in self._procs):
      for i, p in enumerate(self._procs):
        if first is None and p.poll() not in (None, 0):
          first, deadline = i, time.monotonic() + self.grace_s
      if deadline is not None and time.monotonic() > deadline:
        for p in self._procs:
          if p.poll() is None:
            p.kill()
        break
      time.sleep(0.1)
    for p in self._procs:
      p.wait()
    return first

  def _report(self, first: int | None) -> int:
    codes = [p.returncode for p in self._procs]
    if all(c == 0 for c in codes):
      return 0
    if all(c == EXIT_PREEMPTED for c in codes):
      print("every process checkpointed and stopped (preempted); rerun the same command to "
            "resume", flush=True)
      return EXIT_PREEMPTED
    if all(c == EXIT_USER_ERROR for c in codes):
      return EXIT_USER_ERROR  # each printed its error line
    lost = first if first is not None else next(i for i, c in enumerate(codes) if c)
    others = ", ".join(f"process {i}: {describe_exit(c)}" for i, c in enumerate(codes)
                       if i != lost)
    print(f"error: lost process {lost} ({describe_exit(codes[lost])}); {others}. Rerun the "
          "same command to resume from the last checkpoint", file=sys.stderr, flush=True)
    return 1


def main(argv: Sequence[str]) -> None:
  job = Job(trainer_args=list(argv[1:]), processes=FLAGS.processes,
            devices_per_process=FLAGS.devices_per_process, port=FLAGS.port,
            grace_s=FLAGS.grace_s, trainer=FLAGS.trainer)
  print("$ " + shlex.join(job.trainer_args), flush=True)
  sys.exit(job.run())


if __name__ == "__main__":
  define_flags()
  cli.run(main)
