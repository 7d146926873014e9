r"""Runs every point of a sweep on this machine, N at a time, resumably.

  python -m launch.local --config=experiments/configs/scan.py --workdir=runs/scan \
      [--parallel=2] [--pack=4] [--noanalysis] [--analyze_unfinished]

Each point runs as `python -m experiments.train --config=FILE:ARG --workdir=POINT_DIR
--multihost=off` with its output in SWEEP_DIR/logs/<point>.log. With --pack=N, up to N points
that differ only in lr and seed train in one trainer as one vmapped step (--pack_arg), each in
its own workdir with the rows of its solo run; the trainer's output goes to the first one's log.
Points whose status.json says done or diverged are skipped; others (new, interrupted, preempted, failed) run, and the
trainer resumes them from their checkpoint. A lock file per point (see launch/locks.py)
keeps two launchers sharing a sweep from running a point twice. A failing point never stops
the others. At the end every point that is not final (failed, preempted, running elsewhere,
not started) is listed with why, the exit code is 1, and the analysis runs only with
--analyze_unfinished. Ctrl-C (SIGINT) or SIGTERM stops launching and sends SIGTERM to the
running trainers, which checkpoint and exit (status `preempted`); rerun to resume. Bad
inputs exit 2 with one `error:` line.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import importlib.util
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import IO, Any

from absl import flags
import tqdm

from bscan import batch_schedule
from bscan import sweep as sweep_lib
from bscan import workdir as workdir_lib
from bscan.errors import ConfigError
from launch import cli
from launch import locks

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines this binary's flags (only when run as one, so the module imports cleanly)."""
  flags.DEFINE_string("config", None, "Scan config file defining sweep().", required=True)
  flags.DEFINE_string("workdir", None, "Sweep dir (local path or gs://).", required=True)
  flags.DEFINE_integer("parallel", 1, "Trainer processes run at the same time.")
  flags.DEFINE_integer(
      "pack", 1, "Points trained together in one trainer (one vmapped step): up to this many "
      "points that differ only in lr and seed share a process. 1 = one point per process.")
  flags.DEFINE_string(
      "trainer", "experiments.train", "Trainer module (python -m) or .py file run per point.")
  flags.DEFINE_string("python", shlex.quote(sys.executable),
                      "Python interpreter for the trainer (shell words).")
  flags.DEFINE_string(
      "lock_dir", "", "Where per-point locks live: a local/NFS path. Default SWEEP_DIR/.locks; "
      "for gs:// sweeps ~/.cache/bscan/locks/<sweep> (only launchers on this host see it).")
  flags.DEFINE_string(
      "trainer_logs", "",
      "Trainer logs. Default SWEEP_DIR/logs; ~/.cache/bscan/logs/<sweep> for gs:// sweeps.")
  flags.DEFINE_boolean("analysis", True, "Run python -m bscan.analysis at the end.")
  flags.DEFINE_boolean(
      "analyze_unfinished", False,
      "Run the analysis even when some points are not final (it fits what has finished).")
  flags.DEFINE_float(
      "term_timeout_s", 120.0, "Seconds a trainer gets after SIGTERM to checkpoint, then SIGKILL.")


EXIT_FAILED, EXIT_INTERRUPTED = 1, 130


PACK_AXES = ("lr", "seed", "replicate")  # points differing only in these share a trainer


@dataclasses.dataclass
class _Running:
  """A trainer child process and what it holds: its point(s), their locks, its log."""

  points: list[sweep_lib.ExpandedPoint]
  proc: subprocess.Popen[bytes]
  locks: list[locks.PointLock]
  log: IO[bytes]
  log_path: str
  start: float
  terminated: bool = False
  term_time: float = 0.0


def pack_points(points: Sequence[sweep_lib.ExpandedPoint], size: int,
                packable: Callable[[sweep_lib.ExpandedPoint], bool] = lambda p: True
                ) -> list[list[sweep_lib.ExpandedPoint]]:
  """Groups points that differ only in PACK_AXES, at most `size` per group, in sweep order;
  a point that is not `packable` trains alone."""
  groups: dict[tuple, list[list[sweep_lib.ExpandedPoint]]] = {}
  order = []
  for p in points:
    if not packable(p):
      order.append([p])
      continue
    key = tuple(sorted((k, str(v)) for k, v in p.point.items() if k not in PACK_AXES))
    packs = groups.setdefault(key, [])
    if not packs or len(packs[-1]) >= size:
      packs.append([])
      order.append(packs[-1])
    packs[-1].append(p)
  return order


def default_state_dir(sweep_dir: str, kind: str) -> str:
  """Default lock/log dir: inside a local sweep dir, under ~/.cache for a gs:// one."""
  if str(sweep_dir).startswith("gs://"):
    key = hashlib.sha256(str(sweep_dir).encode()).hexdigest()[:12]
    name = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename(str(sweep_dir).rstrip("/")))
    return os.path.join(os.path.expanduser("~/.cache/bscan"), kind, f"{name}-{key}")
  return os.path.join(sweep_dir, "." + kind if kind == "locks" else kind)


def _last_line(path: str) -> str:
  try:
    with open(path, "rb") as f:
      f.seek(max(0, os.path.getsize(path) - 4096))
      lines = [l for l in f.read().decode(errors="replace").splitlines() if l.strip()]
    return lines[-1].strip() if lines else ""
  except OSError:
    return ""


@dataclasses.dataclass(frozen=True)
class Unfinished:
  """A point that is not final at the end of a sweep, and why."""

  point: sweep_lib.ExpandedPoint
  status: workdir_lib.Status | None
  why: str

  def __str__(self) -> str:
    return f"{self.point.arg}: {workdir_lib.describe(self.status)}: {self.why}"


@dataclasses.dataclass
class LocalSweep:
  """Runs the points of a sweep as local subprocesses, at most `parallel` at a time."""

  config: str
  sweep_dir: str
  parallel: int = 1
  pack: int = 1
  trainer: str = "experiments.train"
  python: str = shlex.quote(sys.executable)  # shell words
  lock_dir: str = ""
  log_dir: str = ""
  term_timeout_s: float = 120.0
  counts: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
  unfinished: list[Unfinished] = dataclasses.field(default_factory=list)  # set by run()
  _stopping: int = 0

  def __post_init__(self):
    if self.parallel < 1:
      raise ConfigError(f"--parallel={self.parallel}: give the number of points run at the "
                        "same time, >= 1")
    if self.pack < 1:
      raise ConfigError(f"--pack={self.pack}: give the most points one trainer trains "
                        "together, >= 1 (1 = no packing)")
    if self.term_timeout_s < 0:
      raise ConfigError(f"--term_timeout_s={self.term_timeout_s}: give seconds >= 0")
    cli.check_python("python", self.python, here=True)
    if self.trainer.endswith(".py") and not os.path.isfile(self.trainer):
      raise ConfigError(f"--trainer={self.trainer}: no such file; give a .py file or a module "
                        "name such as experiments.train")
    self._default_lock_dir = not self.lock_dir
    self.lock_dir = self.lock_dir or default_state_dir(self.sweep_dir, "locks")
    self.log_dir = self.log_dir or default_state_dir(self.sweep_dir, "logs")

  def _say(self, text: str) -> None:
    tqdm.tqdm.write(text, file=sys.stdout)
    sys.stdout.flush()

  def _on_signal(self, signum: int, frame: Any) -> None:
    del signum, frame  # no I/O here: the main loop reports it
    self._stopping += 1

  def _log_path(self, point: sweep_lib.ExpandedPoint) -> str:
    return os.path.join(self.log_dir, sweep_lib.point_relpath(point.point) + ".log")

  def _start(self, points: list[sweep_lib.ExpandedPoint],
             held: list[locks.PointLock]) -> _Running:
    log_path = self._log_path(points[0])
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    log = open(log_path, "ab")
    packed = [flag for p in points[1:]
              for flag in (f"--pack_arg={p.arg}", f"--pack_workdir={p.workdir}")]
    cmd = sweep_lib.trainer_command(self.python, self.trainer, self.config, points[0], "off",
                                    flags=packed)
    log.write(f"\n$ {' '.join(cmd)}\n".encode())
    log.flush()
    for p in points[1:]:  # each point's own log says where its trainer writes
      os.makedirs(os.path.dirname(self._log_path(p)), exist_ok=True)
      with open(self._log_path(p), "a") as f:
        f.write(f"\npacked with {points[0].arg}: trainer output in {log_path}\n")
    # The child ignores SIGINT (an ignored signal stays ignored across exec, and Python then
    # installs no KeyboardInterrupt handler): Ctrl-C reaches the whole process group, and the
    # trainer must get SIGTERM from us and checkpoint instead of dying mid-step.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
      proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    finally:
      signal.signal(signal.SIGINT, previous)
    for lock in held:
      lock.set_child(proc.pid)
    return _Running(points, proc, held, log, log_path, time.time())

  def _finish(self, r: _Running) -> list[str]:
    """Reads the finished points' statuses and returns their outcomes (and counts them)."""
    r.log.close()
    for lock in r.locks:
      lock.release()
    return [self._outcome(r, point) for point in r.points]

  def _outcome(self, r: _Running, point: sweep_lib.ExpandedPoint) -> str:
    """One point's outcome after its trainer exited (said and counted)."""
    status = workdir_lib.read_status_or_damaged(point.workdir)
    rc = r.proc.returncode
    if workdir_lib.is_final(status):
      outcome, text = status.status, status.describe()
    elif r.terminated:
      outcome = "interrupted"
      text = f"interrupted at {workdir_lib.describe(status)}; rerun resumes it"
    elif status and status.status == workdir_lib.PREEMPTED:  # SIGTERM from outside
      outcome, text = "preempted", f"{status.describe()}; rerun resumes it"
    elif rc != 0:
      reason = status.reason if status and status.status == workdir_lib.FAILED else ""
      outcome = "failed"
      text = f"failed: {reason or f'exit code {rc}'}; last log line: {_last_line(r.log_path)!r}"
    else:
      outcome = "failed"
      text = f"failed: trainer exited 0 but status is {workdir_lib.describe(status)}"
    self.counts[outcome] += 1
    self._say(f"{point.arg}: {text} [{time.time() - r.start:.0f}s, log {r.log_path}]")
    return outcome

  def _packable(self, point: sweep_lib.ExpandedPoint) -> bool:
    """A point whose batch ramps trains alone (its batch parts ways with its pack's)."""
    if self.pack <= 1:
      return True
    cfg = sweep_lib.import_config(self.config).get_config(point.arg)
    return batch_schedule.Ramp.from_config(cfg) is None

  def run(self) -> int:
    """Runs all unfinished points; returns the exit code: 0 all final, 1 some not, 130 stopped."""
    sweep = cli.load_sweep(self.config)
    workdir_lib.check_usable(self.sweep_dir)
    cli.check_local_dir("lock_dir", self.lock_dir)
    cli.check_local_dir("trainer_logs", self.log_dir)
    sweep_lib.write_sweep_json(self.config, sweep, self.sweep_dir)
    points = sweep_lib.expand(sweep, self.sweep_dir)
    # A point whose status changes after this snapshot was run by another launcher meanwhile.
    snapshot = {p.workdir: self._read_status(p) for p in points}
    unfinished = [p for p in points if not workdir_lib.is_final(snapshot[p.workdir])]
    pending = collections.deque(pack_points(unfinished, self.pack, self._packable))
    if self.sweep_dir.startswith("gs://") and self._default_lock_dir:
      self._say(f"note: locks in {self.lock_dir} guard only against launchers on this host; "
                "pass --lock_dir=<NFS path> to share a gs:// sweep between machines")
    self._say(f"sweep {self.config}: {len(points)} points, {len(points) - len(unfinished)} "
              f"already finished, targets {list(sweep.targets)}, parallel {self.parallel}"
              + (f", packed {self.pack} per trainer into {len(pending)}" if self.pack > 1 else ""))
    old_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    bar = tqdm.tqdm(total=len(points), initial=len(points) - len(unfinished), unit="point",
                    desc="points", file=sys.stderr, dynamic_ncols=True)
    running: list[_Running] = []
    announced = 0
    try:
      while running or (pending and not self._stopping):
        while pending and not self._stopping and len(running) < self.parallel:
          group, held = [], []
          for point in pending.popleft():
            lock = self._claim(point, snapshot, bar)
            if lock:
              group.append(point)
              held.append(lock)
          if group:
            running.append(self._start(group, held))
        if self._stopping:
          if self._stopping != announced:
            announced = self._stopping
            how = "terminating" if announced == 1 else "killing"
            self._say(f"interrupted: stop launching, {how} {len(running)} running trainer(s)")
          self._stop(running)
        for r in [r for r in running if r.proc.poll() is not None]:
          running.remove(r)
          bar.update(sum(o in workdir_lib.FINAL_STATES for o in self._finish(r)))
        bar.set_postfix(running=len(running), failed=self.counts["failed"], refresh=False)
        time.sleep(0.05)
    finally:
      for r in running:  # only on an unexpected error: leave no orphan holding a lock
        r.proc.kill()
        r.proc.wait()
        for lock in r.locks:
          lock.release()
      bar.close()
      for s, h in old_handlers.items():
        signal.signal(s, h)
    summary = ", ".join(f"{n} {k}" for k, n in sorted(self.counts.items())) or "nothing to run"
    self._say(f"sweep {self.sweep_dir}: {summary}")
    self.unfinished = [u for u in map(self._unfinished, points) if u]
    if self.unfinished:
      self._say(f"{len(self.unfinished)} of {len(points)} point(s) not finished:")
      for u in self.unfinished:
        self._say(f"  {u}")
    if self._stopping:
      return EXIT_INTERRUPTED
    return EXIT_FAILED if self.unfinished else 0

  def _claim(self, point: sweep_lib.ExpandedPoint, snapshot: dict[str, Any],
             bar: tqdm.tqdm) -> locks.PointLock | None:
    """The point's lock, held, or None (said) when another launcher has it or ran it."""
    lock = self._lock(point)
    if not lock.try_acquire():
      self.counts["elsewhere"] += 1
      self._say(f"{point.arg}: skipped, running in another launcher: {lock.describe_owner()}")
      return None
    status = workdir_lib.read_status_or_damaged(point.workdir)
    if status != snapshot[point.workdir]:
      lock.release()
      self.counts["elsewhere"] += 1
      self._say(f"{point.arg}: skipped, another launcher ran it meanwhile: "
                f"{workdir_lib.describe(status)}")
      bar.update(workdir_lib.is_final(status))
      return None
    return lock

  def _lock(self, point: sweep_lib.ExpandedPoint) -> locks.PointLock:
    return locks.PointLock(
        os.path.join(self.lock_dir, sweep_lib.point_relpath(point.point) + ".lock"))

  def _read_status(self, point: sweep_lib.ExpandedPoint) -> workdir_lib.Status | None:
    """The point's status; a damaged status.json is said and reads as resumable 'failed'."""
    try:
      return workdir_lib.read_status(point.workdir)
    except ConfigError as e:
      self._say(f"{point.arg}: {e}")
      return workdir_lib.Status(workdir_lib.FAILED, reason=str(e))  # = read_status_or_damaged

  def _unfinished(self, point: sweep_lib.ExpandedPoint) -> Unfinished | None:
    """Why a point is not final now (None when it is)."""
    status = workdir_lib.read_status_or_damaged(point.workdir)
    if workdir_lib.is_final(status):
      return None
    lock = self._lock(point)
    if not lock.try_acquire():
      return Unfinished(point, status, f"running elsewhere: {lock.describe_owner()}")
    lock.release()
    state = status.status if status else None
    why = {None: "not started; rerun runs it",
           workdir_lib.PREEMPTED: "rerun resumes it",
           workdir_lib.FAILED: "rerun retries it, resuming from its checkpoint",
           workdir_lib.RUNNING: "no launcher holds its lock (the trainer was killed, or runs "
                                "outside any launcher); rerun resumes it"}[state]
    return Unfinished(point, status, why)

  def _stop(self, running: Sequence[_Running]) -> None:
    """SIGTERM each trainer once (it checkpoints); SIGKILL after a timeout or a 2nd signal."""
    now = time.time()
    for r in running:
      if not r.terminated:
        r.terminated, r.term_time = True, now
        r.proc.terminate()
      elif self._stopping > 1 or now - r.term_time > self.term_timeout_s:
        r.proc.kill()


def run_analysis(sweep_dir: str, python: str = shlex.quote(sys.executable)) -> int:
  """Runs `python -m bscan.analysis` on the sweep; returns its exit code (0 when absent)."""
  try:  # bscan.analysis is optional here: the launcher works before it exists
    available = importlib.util.find_spec("bscan.analysis.__main__") is not None
  except ImportError:
    available = False
  if not available:
    print("analysis skipped: bscan.analysis is not available", flush=True)
    return 0
  out = f"{sweep_dir.rstrip('/')}/analysis"
  cmd = [*shlex.split(python), "-m", "bscan.analysis", f"--workdir={sweep_dir}", f"--out={out}"]
  print(f"analysis: {' '.join(cmd)}", flush=True)
  rc = subprocess.run(cmd, check=False).returncode
  print(f"analysis {'written to ' + out if rc == 0 else f'failed (exit code {rc})'}", flush=True)
  return rc


def main(argv: Sequence[str]) -> None:
  cli.no_arguments(argv)
  sweep = LocalSweep(config=FLAGS.config, sweep_dir=FLAGS.workdir, parallel=FLAGS.parallel,
                     pack=FLAGS.pack, trainer=FLAGS.trainer, python=FLAGS.python,
                     lock_dir=FLAGS.lock_dir,
                     log_dir=FLAGS.trainer_logs, term_timeout_s=FLAGS.term_timeout_s)
  rc = sweep.run()
  if rc == EXIT_INTERRUPTED or not FLAGS.analysis:
    sys.exit(rc)
  if sweep.unfinished and not FLAGS.analyze_unfinished:
    # A fit over half-trained runs looks like a result; the user must ask for it.
    print(f"analysis not run: {len(sweep.unfinished)} point(s) not finished; rerun to finish "
          "them, or pass --analyze_unfinished to analyze what has finished", flush=True)
  elif run_analysis(FLAGS.workdir, FLAGS.python):
    rc = rc or EXIT_FAILED
  sys.exit(rc)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
