r"""TPU worker logs: copied into the sweep dir by each worker, read back by the launcher.

On a worker, a slice's points write their output into

  python -m launch.worker_logs --log=SLICE.log --dest=SWEEP_DIR/logs/SLICE/STAMP-HOST.log

which appends each line to the worker's own log and rewrites DEST with everything it received
every --every_s seconds and at the end: object stores (gs://) have no append, and a log is
small. So the log of a preempted spot slice survives in the sweep dir up to its last copy.
A copy that fails is retried at the next one and never stops the points; SIGTERM (what a
preemption notice sends every process) is ignored, so the points' last lines still arrive.

After each point the worker's script prints `bscan: exit status RC of point ARG`. JAX aborts
every surviving process of a job with exit 134 when a peer dies, so a point whose workers exit
134, except one, lost that one: `lost_processes` names it ("lost process 1").
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
from collections.abc import Mapping, Sequence

LOGS = "logs"  # SWEEP_DIR/logs/SLICE/STAMP-HOST.log
EXIT_ABORTED = 134  # JAX's abort (SIGABRT) of the survivors when a peer process is gone
EXIT_PREFIX = "bscan: exit status "
_EXIT_RE = re.compile(r"^bscan: exit status (\d+) of point (.*)$")
_WORKER_RE = re.compile(r"w-?(\d+)$")  # TPU VM hostnames end in -w-<worker> (fake: -w<worker>)


def log_dir(sweep_dir: str, slice_name: str) -> str:
  return f"{sweep_dir.rstrip('/')}/{LOGS}/{slice_name}"


def exit_statuses(text: str) -> dict[str, int]:
  """Each point's last exit status in a worker log: {arg: status}."""
  found = {}
  for line in text.splitlines():
    m = _EXIT_RE.match(line.strip())
    if m:
      found[m.group(2)] = int(m.group(1))
  return found


def worker_index(host: str) -> str:
  """The worker (JAX process) number of a hostname, e.g. 't1v-n-1a2b-w-3' -> '3'."""
  m = _WORKER_RE.search(host)
  return m.group(1) if m else host


def lost_processes(logs: Mapping[str, str]) -> dict[str, str]:
  """{point arg: 'lost process N (...)'} for points whose job aborted (exit 134) on a worker.

  logs maps each worker's hostname to its log of one start. The workers that did not exit 134
  are the lost ones: killed (137), crashed, or silent (the whole worker went away).
  """
  statuses = {host: exit_statuses(text) for host, text in logs.items()}
  args = [a for s in statuses.values() for a in s]
  found = {}
  for arg in dict.fromkeys(args):
    by_host = {h: s.get(arg) for h, s in statuses.items()}
    if EXIT_ABORTED not in by_host.values():
      continue
    lost = sorted((h for h, rc in by_host.items() if rc != EXIT_ABORTED), key=worker_index)
    if not lost:
      found[arg] = (f"lost a process: all {len(by_host)} workers aborted with exit "
                    f"{EXIT_ABORTED} (a peer died; see their logs)")
      continue
    what = ", ".join(f"{h} exited {by_host[h]}" if by_host[h] is not None
                     else f"{h} gave no exit status" for h in lost)
    found[arg] = (f"lost process {', '.join(worker_index(h) for h in lost)} ({what}; the "
                  f"others aborted with exit {EXIT_ABORTED})")
  return found


def latest_logs(sweep_dir: str, slice_name: str) -> dict[str, str]:
  """The worker logs of a slice's latest start: {hostname: text}; {} when there are none."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  directory = epath.Path(log_dir(sweep_dir, slice_name))
  try:
    names = sorted(p.name for p in directory.iterdir() if p.name.endswith(".log"))
  except (FileNotFoundError, NotADirectoryError):
    return {}
  if not names:
    return {}
  stamp = names[-1].split("-", 1)[0]
  return {n[len(stamp) + 1:-len(".log")]: (directory / n).read_bytes().decode(errors="replace")
          for n in names if n.startswith(stamp + "-")}


def lost_processes_of(sweep_dir: str, slice_name: str) -> dict[str, str]:
  """lost_processes of a slice's latest start; {} when its logs cannot be read (a hint only)."""
  try:
    return lost_processes(latest_logs(sweep_dir, slice_name))
  except Exception:  # pylint: disable=broad-exception-caught
    return {}


class _Copier:
  """Rewrites dest with the bytes received so far, at most every every_s seconds."""

  def __init__(self, dest: str, every_s: float, local: str):
    self.dest, self.every_s, self.local = dest, every_s, local
    self.data = bytearray()
    self.lock = threading.Lock()
    self.copied = 0
    self.warned = False

  def add(self, line: bytes) -> None:
    with self.lock:
      self.data += line

  def copy(self) -> None:
    with self.lock:
      if self.copied == len(self.data):
        return
      data, self.copied = bytes(self.data), len(self.data)
    try:
      _write(self.dest, data)
    except Exception as e:  # pylint: disable=broad-exception-caught  (never stop the points)
      with self.lock:
        self.copied = 0  # retry at the next copy
      if not self.warned:
        self.warned = True
        with open(self.local, "ab") as f:
          f.write(f"bscan: cannot copy this log to {self.dest} ({type(e).__name__}: {e}); "
                  "retrying\n".encode())


def _write(dest: str, data: bytes) -> None:
  """Whole-object write: a put on gs://, write-then-rename on a file system."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  path = epath.Path(dest)
  path.parent.mkdir(parents=True, exist_ok=True)
  if "://" in dest:
    path.write_bytes(data)
    return
  tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
  tmp.write_bytes(data)
  tmp.replace(path)


def main(argv: Sequence[str]) -> int:
  """--log=LOCAL --dest=DEST [--every_s=60] [--tee]: copies stdin to LOCAL (+stdout), DEST."""
  opts = dict(a[2:].split("=", 1) if "=" in a else (a[2:], "1") for a in argv[1:])
  if not {"log", "dest"} <= set(opts) <= {"log", "dest", "every_s", "tee"}:
    sys.exit(f"usage: {main.__doc__}")
  local, dest = opts["log"], opts["dest"]
  every_s, tee = float(opts.get("every_s", 60)), opts.get("tee") == "1"
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  copier = _Copier(dest, every_s, local)
  done = threading.Event()

  def periodic():
    while not done.wait(every_s):
      copier.copy()

  thread = threading.Thread(target=periodic, daemon=True)
  thread.start()
  with open(local, "ab", buffering=0) as out:
    for line in sys.stdin.buffer:
      out.write(line)
      copier.add(line)
      if tee:
        sys.stdout.buffer.write(line)
        sys.stdout.buffer.flush()
  done.set()
  thread.join()
  copier.copy()
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
