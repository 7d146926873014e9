r"""Chaos check of a sweep: random kills of trainers and the launcher must change no result.

  python scripts/chaos.py --workdir=/tmp/chaos [--kills=100] [--seed=0] [--parallel=2] \
      [--config=tests/chaos_scan_config.py] [--life_s=SECONDS]

1. Runs the sweep undisturbed (`python -m launch.local ... --noanalysis`) into DIR/reference, and
   `python -m bscan.analysis` on it.
2. Runs it into DIR/chaos/round1 while, at random moments drawn from a seeded RNG, it kills a
   trainer (SIGKILL or SIGTERM, at an age drawn uniformly over a trainer's life, or right as one
   of its checkpoints is being written) or the launcher (SIGKILL alone, SIGKILL with its
   trainers, SIGTERM), rerunning the launcher until every point is final (done or diverged). A
   round that finishes with kills left is followed by a fresh one (round2, ...) until every kill
   is spent. The time scale, a trainer's life, is measured in the reference unless given.
3. Analyses each round and compares it with the reference: every run's metric rows (wall-clock
   columns aside) equal, every step once, the same final status, `critical_batch.csv`
   byte-identical. Prints one summary line; exit status 0 only when every round is identical.

Both sweeps use DIR/data (the corpus) and a JAX compilation cache (it spares restarts their
compile time; a cached executable computes the same bits). Every launcher runs in its own
process group; whatever is left of them is killed on exit, Ctrl-C and SIGTERM included.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bscan import sweep as sweep_lib  # noqa: E402  (once the repo is importable)
from bscan import workdir as workdir_lib  # noqa: E402
from bscan.errors import ConfigError  # noqa: E402

# kind -> (victim, signal, weight); the summary groups kinds by their first word.
KINDS: dict[str, tuple[str, signal.Signals, int]] = {
    "trainer SIGKILL": ("trainer", signal.SIGKILL, 3),
    "trainer SIGTERM": ("trainer", signal.SIGTERM, 2),
    "mid-checkpoint SIGKILL": ("checkpoint", signal.SIGKILL, 2),
    "mid-checkpoint SIGTERM": ("checkpoint", signal.SIGTERM, 1),
    "launcher SIGKILL": ("launcher", signal.SIGKILL, 1),
    "launcher+trainers SIGKILL": ("group", signal.SIGKILL, 1),
    "launcher SIGTERM": ("launcher", signal.SIGTERM, 1),
}
STUCK_LAUNCHES = 3  # launches in a row that end unfinished with no kill: a bug, not chaos


class ChaosError(RuntimeError):
  """The sweep cannot finish: a failing reference, a point stuck, a timeout."""


@dataclasses.dataclass(frozen=True)
class Point:
  """A sweep point: its path relative to the sweep dir, and its workdir."""

  relpath: str
  workdir: str


def expand(sweep: sweep_lib.Sweep, sweep_dir: Path) -> list[Point]:
  """The sweep's points under `sweep_dir`."""
  return [Point(sweep_lib.point_relpath(p.point), p.workdir)
          for p in sweep_lib.expand(sweep, str(sweep_dir))]


def read_status(workdir: str) -> workdir_lib.Status | None:
  """A point's status; a damaged status.json reads as not final (its rerun reports it)."""
  try:
    return workdir_lib.read_status(workdir)
  except ConfigError:
    return None


def unfinished(points: Sequence[Point]) -> list[str]:
  """The points that are not done or diverged."""
  return [p.relpath for p in points if not workdir_lib.is_final(read_status(p.workdir))]


def progress(points: Sequence[Point]) -> tuple[tuple[int, int], ...]:
  """Size and mtime of each point's metrics and status files: they change while runs move."""
  out = []
  for p in points:
    for name in (workdir_lib.METRICS, workdir_lib.STATUS):
      try:
        st = os.stat(Path(p.workdir) / name)
        out.append((st.st_size, st.st_mtime_ns))
      except FileNotFoundError:
        out.append((0, 0))
  return tuple(out)


def checkpoint_entries(points: Sequence[Point]) -> set[tuple[str, str, int, int]]:
  """(workdir, name, inode, mtime) of each entry of each point's checkpoint dir."""
  entries = set()
  for p in points:
    try:
      with os.scandir(Path(p.workdir) / workdir_lib.CHECKPOINTS) as it:
        listed = list(it)
    except FileNotFoundError:
      continue
    for e in listed:
      try:
        st = e.stat(follow_symlinks=False)
      except FileNotFoundError:
        continue  # renamed or deleted since listed
      entries.add((p.workdir, e.name, st.st_ino, st.st_mtime_ns))
  return entries


@dataclasses.dataclass
class Chaos:
  """Runs sweeps through launcher process groups, kills at random, cleans up after itself."""

  config: str
  root: Path
  parallel: int
  kills_left: int
  life_s: float  # a trainer's life: trainer kills land at ages in [0, this]
  rng: random.Random
  env: dict[str, str]
  deadline: float
  stall_s: float
  kills: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
  phases: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
  launches: int = 0
  groups: set[int] = dataclasses.field(default_factory=set)  # launcher pids = process groups
  launcher: subprocess.Popen[bytes] | None = None
  start: float = dataclasses.field(default_factory=time.time)

  def __post_init__(self):
    self.order = self.rng.sample(list(KINDS), len(KINDS))  # every kind once first, then drawn

  def say(self, text: str) -> None:
    print(f"[{time.time() - self.start:7.1f}s] {text}", flush=True)

  def members(self) -> list[psutil.Process]:
    """Live processes of our launchers' groups (orphaned trainers included, zombies not)."""
    if self.launcher and self.launcher.returncode is None:  # children in groups of their own
      try:
        for child in psutil.Process(self.launcher.pid).children(recursive=True):
          self.groups.add(os.getpgid(child.pid))
      except (psutil.Error, ProcessLookupError):
        pass
      self.groups.discard(os.getpgrp())  # never our own group
    found, groups = [], set()
    for p in psutil.process_iter(["status"]):
      try:
        group = os.getpgid(p.pid)
      except (ProcessLookupError, PermissionError):
        continue
      if group in self.groups and p.info["status"] != psutil.STATUS_ZOMBIE:
        found.append(p)
        groups.add(group)
    if self.launcher and self.launcher.returncode is None:
      groups.add(self.launcher.pid)  # its pid, so its group id, is ours until it is reaped
    self.groups = groups  # an empty group's id may be reused by anyone: forget it
    return found

  def trainers(self, points: Sequence[Point]) -> dict[str, psutil.Process]:
    """Running trainers by point workdir."""
    flags = {f"--workdir={p.workdir}": p.workdir for p in points}
    found = {}
    for p in self.members():
      try:
        workdir = next((flags[a] for a in p.cmdline() if a in flags), None)
      except psutil.Error:
        continue
      if workdir:
        found[workdir] = p
    return found

  def launch(self, sweep_dir: Path) -> None:
    """Starts launch.local on the sweep in a new process group, its output to a log."""
    sweep_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{sweep_dir}.launcher.log", "ab") as log:
      self.launcher = subprocess.Popen(
          [sys.executable, "-m", "launch.local", f"--config={self.config}",
           f"--workdir={sweep_dir}", f"--parallel={self.parallel}", "--noanalysis"],
          cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
          stdin=subprocess.DEVNULL, start_new_session=True)
    self.groups.add(self.launcher.pid)
    self.launches += 1

  def cleanup(self) -> None:
    """Kills every process left in our groups, and reaps the launcher."""
    if self.launcher and self.launcher.returncode is None:
      try:
        os.killpg(self.launcher.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
      self.launcher.wait()
    for _ in range(3):
      left = self.members()
      if not left:
        return
      for p in left:
        try:
          p.kill()  # psutil refuses a pid that was reused meanwhile
        except psutil.Error:
          pass
      psutil.wait_procs(left, timeout=10)

  def analyze(self, sweep_dir: Path) -> None:
    """python -m bscan.analysis on a finished sweep; ChaosError when it fails."""
    cmd = [sys.executable, "-m", "bscan.analysis", f"--workdir={sweep_dir}",
           f"--out={sweep_dir}/analysis"]
    with open(f"{sweep_dir}.analysis.log", "wb") as log:
      rc = subprocess.run(cmd, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                          check=False).returncode
    if rc:
      raise ChaosError(f"`{' '.join(cmd)}` exited {rc}; see {sweep_dir}.analysis.log")

  def run_sweep(self, sweep_dir: Path, points: Sequence[Point], chaos: bool) -> None:
    """Reruns the launcher until every point is final, killing at random when `chaos`."""
    kind, due, age = None, 0.0, 0.0
    last, last_change = progress(points), time.time()
    quiet, killed = 0, False  # launches in a row ending unfinished with no kill; a kill since
    while True:
      now = time.time()
      if now > self.deadline:
        raise ChaosError(f"timed out; unfinished: {unfinished(points)}")
      if (signature := progress(points)) != last:
        last, last_change = signature, now
      elif now - last_change > self.stall_s:
        raise ChaosError(f"no point of {sweep_dir} moved for {self.stall_s:.0f}s; unfinished: "
                         f"{unfinished(points)}; see {sweep_dir}.launcher.log and its logs/")
      left = unfinished(points)
      if self.launcher is not None and self.launcher.poll() is not None:
        self.say(f"launcher exited {self.launcher.returncode}; unfinished: {left or 'none'}")
        quiet = 0 if killed or not left else quiet + 1
        if left and (quiet >= STUCK_LAUNCHES or not chaos):
          raise ChaosError(f"`python -m launch.local --workdir={sweep_dir}` ended {quiet or 1} "
                           f"time(s) in a row with no kill and unfinished points {left}; see "
                           f"{sweep_dir}.launcher.log and {sweep_dir}/logs/")
        self.launcher, killed = None, False
      if self.launcher is None:
        if not left and not self.members():
          return  # every point final and nothing of ours still running
        busy = self.trainers(points)
        if any(p.workdir not in busy for p in points if p.relpath in left):
          self.launch(sweep_dir)  # a point nobody runs: orphaned trainers cannot finish it
      if chaos and self.kills_left and kind is None:
        kind = self.order.pop() if self.order else self.rng.choices(
            list(KINDS), [w for _, _, w in KINDS.values()])[0]
        delay = self.rng.uniform(0, self.life_s)  # trainer kinds: the victim's age instead
        due, age = (now, delay) if KINDS[kind][0] == "trainer" else (now + delay, 0.0)
      if kind is not None and now >= due and self.fire(kind, points, age):
        self.kills[kind] += 1
        self.kills_left -= 1
        kind, killed = None, True
      else:
        time.sleep(0.1)

  def fire(self, kind: str, points: Sequence[Point], age: float, watch_s: float = 0.2) -> bool:
    """Sends this kind's signal if its victim exists: a launcher, a trainer at least `age`
    seconds old, or one that writes a checkpoint within `watch_s`."""
    victim, sig, _ = KINDS[kind]
    if victim in ("launcher", "group"):
      if self.launcher is None or self.launcher.poll() is not None:
        return False
      if victim == "group":
        os.killpg(self.launcher.pid, sig)
      else:
        self.launcher.send_signal(sig)
      self.say(f"{kind}: launcher pid {self.launcher.pid}")
      return True
    where, trainers, workdir = "", {}, ""
    if victim == "checkpoint":  # a new or changed entry under checkpoints/: a save in flight
      seen, end = checkpoint_entries(points), time.time() + watch_s
      while time.time() < end and not workdir:
        time.sleep(0.005)
        entries = checkpoint_entries(points)
        fresh, seen = sorted(entries - seen), entries
        if fresh and (trainers := self.trainers(points)):
          workdir, name = next(((w, n) for w, n, _, _ in fresh if w in trainers), ("", ""))
          where = f", writing checkpoints/{name}"
    elif trainers := self.trainers(points):
      now = time.time()
      old = sorted(w for w, p in trainers.items() if now - _started(p, now) >= age)
      workdir = self.rng.choice(old) if old else ""
    if not workdir:
      return False
    proc, path = trainers[workdir], Path(workdir) / workdir_lib.STATUS
    try:
      started = path.exists() and path.stat().st_mtime >= _started(proc, time.time())
      proc.send_signal(sig)
    except (psutil.Error, OSError):
      return False  # it ended meanwhile
    self.phases["training" if started else "start-up"] += 1
    self.say(f"{kind}: trainer pid {proc.pid} {Path(workdir).relative_to(self.root)} "
             f"({workdir_lib.describe(read_status(workdir))}{where})")
    return True


def _started(proc: psutil.Process, default: float) -> float:
  """When a process started; `default` when it is gone."""
  try:
    return proc.create_time()
  except psutil.Error:
    return default


def compare(reference: Path, chaos: Path, pairs: Sequence[tuple[Point, Point]]) -> list[str]:
  """What differs between two finished sweeps (empty when identical)."""
  problems = []
  for ref, new in pairs:
    rows = []
    for name, d in (("reference", ref.workdir), ("chaos", new.workdir)):
      found, bad = workdir_lib.read_metrics(d)
      problems += [f"{new.relpath}: {name}: unreadable line {b}" for b in bad]
      steps = collections.Counter(r[workdir_lib.Col.STEP] for r in found)
      if dups := sorted(s for s, n in steps.items() if n > 1):
        problems.append(f"{new.relpath}: {name}: {len(dups)} step(s) logged twice: {dups[:5]}")
      rows.append([{k: v for k, v in r.items() if k not in workdir_lib.WALL_CLOCK_COLUMNS}
                   for r in found])
    if rows[0] != rows[1]:
      first = next((i for i, (a, b) in enumerate(zip(*rows)) if a != b), min(map(len, rows)))
      problems.append(f"{new.relpath}: rows differ from row {first + 1} on (reference "
                      f"{len(rows[0])} rows, chaos {len(rows[1])})")
    a, b = read_status(ref.workdir), read_status(new.workdir)
    if (a and (a.status, a.step, a.reason)) != (b and (b.status, b.step, b.reason)):
      problems.append(f"{new.relpath}: {workdir_lib.describe(b)}, reference "
                      f"{workdir_lib.describe(a)}")
  csv = Path("analysis/critical_batch.csv")
  if not (chaos / csv).is_file() or (reference / csv).read_bytes() != (chaos / csv).read_bytes():
    problems.append(f"{chaos / csv} is missing or differs from {reference / csv}")
  return problems


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the reference and the chaos rounds, prints the summary; returns the exit status."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="Output dir: reference/, chaos/, data/.")
  parser.add_argument("--kills", type=int, default=100, help="Kills in all.")
  parser.add_argument("--seed", type=int, default=0, help="Seed of the kills' RNG.")
  parser.add_argument("--parallel", type=int, default=2, help="launch.local --parallel.")
  parser.add_argument("--config", default="tests/chaos_scan_config.py",
                      help="Scan config (get_config + sweep), relative to the repo.")
  parser.add_argument("--life_s", type=float, default=0.0,
                      help="Time scale: trainers are killed at ages uniform in [0, this], other "
                      "kills come this far apart at most. Default: a trainer's mean life in the "
                      "reference (its sweep's time x parallel / points).")
  parser.add_argument("--compile_cache", default="",
                      help="JAX compilation cache dir (default DIR/jax_cache; 'none': off).")
  parser.add_argument("--timeout_s", type=float, default=4 * 3600.0, help="Give up after.")
  parser.add_argument("--stall_s", type=float, default=600.0,
                      help="Give up when no run moves for this long.")
  args = parser.parse_args(argv)
  root = Path(args.workdir).resolve()
  if (root / "chaos").exists():
    print(f"error: {root / 'chaos'} exists: remove it or use another --workdir", file=sys.stderr)
    return 2
  env = {**os.environ, "BSCAN_DATA_DIR": str(root / "data")}
  if args.compile_cache != "none":
    env.update(JAX_COMPILATION_CACHE_DIR=args.compile_cache or str(root / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  sweep = sweep_lib.load_sweep(str(REPO / args.config))
  chaos = Chaos(config=args.config, root=root, parallel=args.parallel, kills_left=args.kills,
                life_s=args.life_s, rng=random.Random(args.seed), env=env,
                deadline=time.time() + args.timeout_s, stall_s=args.stall_s)
  signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started ignoring it
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the finally below runs
  problems, rounds = [], 0
  try:
    reference = root / "reference"
    ref_points = expand(sweep, reference)
    chaos.say(f"reference: {len(ref_points)} points into {reference}")
    chaos.run_sweep(reference, ref_points, chaos=False)
    if not args.life_s:
      slots = min(args.parallel, len(ref_points))
      chaos.life_s = max((time.time() - chaos.start) * slots / len(ref_points), 10.0)
    chaos.analyze(reference)
    while chaos.kills_left or not rounds:
      rounds += 1
      sweep_dir = root / "chaos" / f"round{rounds}"
      chaos.say(f"chaos round {rounds}: {chaos.kills_left} kills left, time scale "
                f"{chaos.life_s:.0f}s, into {sweep_dir}")
      points = expand(sweep, sweep_dir)
      chaos.run_sweep(sweep_dir, points, chaos=True)
      chaos.analyze(sweep_dir)
      found = compare(reference, sweep_dir, list(zip(ref_points, points)))
      problems += [f"round {rounds}: {p}" for p in found]
      chaos.say(f"round {rounds}: {'different' if found else 'identical'}")
  except ChaosError as e:
    problems.append(f"error: {e}")
  finally:
    chaos.cleanup()
  for p in problems:
    print(p, flush=True)
  groups = collections.Counter()
  for kind, n in chaos.kills.items():
    groups[kind.split()[0].split("+")[0]] += n
  detail = ", ".join(f"{k} {n}" for k, n in sorted(chaos.kills.items()))
  phases = ", ".join(f"{n} in {k}" for k, n in sorted(chaos.phases.items()))
  print(f"chaos: {rounds} round(s) x {len(sweep.points)} = {rounds * len(sweep.points)} runs; "
        f"{sum(chaos.kills.values())} kills: trainer {groups['trainer']}, mid-checkpoint "
        f"{groups['mid-checkpoint']}, launcher {groups['launcher']} ({detail}; trainers killed "
        f"{phases or 'never'}); {chaos.launches} launches; identical: "
        f"{'no' if problems else 'yes'}; {time.time() - chaos.start:.0f}s", flush=True)
  return 1 if problems else 0


if __name__ == "__main__":
  sys.exit(main())
