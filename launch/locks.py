"""One lock file per sweep point, so two launchers sharing a sweep never run a point twice.

A lock is created atomically with O_CREAT|O_EXCL and holds the launcher's pid, the
trainer child's pid, each pid's start time (/proc/PID/stat field 22, on Linux), the host
and the time. It is stale when it was written on this host and none of its pids is alive;
a pid whose start time differs from the recorded one was reused by another process and
counts as dead, so a crashed launcher's lock does not live on in an unrelated process. A
stale lock is broken under a short-lived '.break' lock so two launchers cannot both break
it and both win. Locks need a POSIX file system (local disk or NFS). GCS has no O_EXCL,
so for a gs:// sweep the locks live on a local or NFS path (`--lock_dir`); launchers on
different machines must share that path to see each other's locks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import time
from typing import Any

_BREAK_STALE_S = 60.0  # a '.break' lock (or an empty lock) older than this was left by a crash


def _proc_stat(pid: int) -> list[str] | None:
  """Fields 3.. of /proc/PID/stat (after 'pid (comm)'), or None where unreadable (non-Linux)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()
  except (OSError, IndexError):
    return None


def process_start_time(pid: int) -> int | None:
  """The pid's start time in clock ticks since boot (stat field 22), None where unknown."""
  fields = _proc_stat(pid)
  try:
    return int(fields[22 - 3]) if fields else None
  except (IndexError, ValueError):
    return None


def pid_alive(pid: int, start_time: int | None = None) -> bool:
  """Whether a process with this pid runs on this host (zombies count as dead).

  With start_time (from process_start_time when the pid was recorded), a process whose
  start time differs is another one that reuses the pid, and the recorded one is dead.
  """
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass
  fields = _proc_stat(pid)
  if fields is None:
    return True
  if fields[0] == "Z":  # Linux: a zombie waits for its (dead) parent's reaper but runs nothing
    return False
  if start_time is not None:
    now = process_start_time(pid)
    return now is None or now == start_time
  return True


@dataclasses.dataclass
class PointLock:
  """An exclusive lock file for one point, e.g. LOCK_DIR/3m/b64/lr1e-3/s0.lock."""

  path: str
  held: bool = False

  def owner(self) -> dict[str, Any] | None:
    """The lock's content, or None when there is no lock file or it is unreadable."""
    try:
      with open(self.path) as f:
        return json.load(f)
    except (OSError, ValueError):
      return None

  def describe_owner(self) -> str:
    """Who holds the lock, for messages."""
    o = self.owner() or {}
    return (f"pid {o.get('pid')} (trainer pid {o.get('child_pid')}) on {o.get('host')} "
            f"since {o.get('time')}; lock file {self.path}")

  def _write(self, fd: int, child_pid: int | None) -> None:
    content = {"pid": os.getpid(), "pid_start": process_start_time(os.getpid()),
               "child_pid": child_pid,
               "child_start": process_start_time(child_pid) if child_pid else None,
               "host": socket.gethostname(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    os.write(fd, json.dumps(content).encode())

  def _is_stale(self) -> bool:
    o = self.owner()
    if o is None:  # empty or torn: a launcher died between create and write, or is writing now
      try:
        return time.time() - os.path.getmtime(self.path) > _BREAK_STALE_S
      except OSError:
        return False
    if o.get("host") != socket.gethostname():
      return False  # cannot see another host's processes
    owners = [(o.get(pid), o.get(start)) for pid, start in
              (("pid", "pid_start"), ("child_pid", "child_start"))]
    return not any(pid_alive(p, s if isinstance(s, int) else None)
                   for p, s in owners if isinstance(p, int))

  def try_acquire(self) -> bool:
    """Takes the lock; False when a live owner holds it. Breaks stale locks."""
    os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
    for _ in range(2):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        if not self._break_if_stale():
          return False
        continue
      try:
        self._write(fd, None)
      finally:
        os.close(fd)
      self.held = True
      return True
    return False

  def _break_if_stale(self) -> bool:
    """Removes a stale lock, serialised by a '.break' lock; True when it was removed."""
    breaker = self.path + ".break"
    with contextlib.suppress(OSError):
      if time.time() - os.path.getmtime(breaker) > _BREAK_STALE_S:
        os.unlink(breaker)
    try:
      os.close(os.open(breaker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
      return False  # another launcher is breaking it right now
    try:
      if not self._is_stale():  # re-check under the breaker: it may have been retaken
        return False
      with contextlib.suppress(FileNotFoundError):
        os.unlink(self.path)
      return True
    finally:
      os.unlink(breaker)

  def set_child(self, child_pid: int) -> None:
    """Records the trainer's pid, so the lock stays live if only the launcher dies."""
    tmp = f"{self.path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o644)
    try:
      self._write(fd, child_pid)
    finally:
      os.close(fd)
    os.replace(tmp, self.path)  # atomic: readers see the old or the new owner, never neither

  def release(self) -> None:
    """Removes the lock if this object holds it."""
    if self.held:
      with contextlib.suppress(FileNotFoundError):
        os.unlink(self.path)
      self.held = False
