"""`launch.tpu up --watch`: keeps a (spot) sweep going until every point is done or diverged.

Every --poll_s seconds, for each slice that still has unfinished points:
  - no queued resource (never created, or deleted behind our back): create it;
  - FAILED, SUSPENDED (what a preempted spot slice's queued resource becomes) or PREEMPTED:
    delete it, then create it again once it is gone;
  - ACTIVE, not yet set up in this watch: set it up and start its unfinished points;
  - ACTIVE, set up, and no worker runs its points any more (they ended or crashed): start the
    unfinished ones again; they resume from their checkpoints. Whether workers still run them
    is asked over ssh when the logs copied to the sweep dir say the run ended, and otherwise
    every IDLE_PROBE_POLLS polls (ssh to every worker is slow and costly);
  - otherwise (WAITING_FOR_RESOURCES, PROVISIONING, SUSPENDING, DELETING, ...): wait, at most
    --wait_timeout_s.
Recreations and restarts are each bounded per slice by --max_recreations; a slice past either
is given up (listed at the end, exit 1). Each action is one line; the watch ends with a
summary: points done and diverged, slices created and recreated, point runs started.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

from bscan import sweep as sweep_lib
from bscan import workdir as workdir_lib
from launch import tpu
from launch import tpu_inputs
from launch import worker_logs

RECREATE_STATES = ("FAILED", "SUSPENDED", "PREEMPTED")
IDLE_PROBE_POLLS = 10


@dataclasses.dataclass
class _Slice:
  """What the watch knows and did about one slice."""

  exists: bool = False  # a queued resource was seen, so a missing one was deleted
  deleting: bool = False  # we deleted it to recreate it
  set_up: bool = False  # set up and started on its current queued resource
  waiting_since: float | None = None
  created: int = 0
  recreations: int = 0
  restarts: int = 0
  starts: int = 0
  started_points: int = 0  # in its latest start
  polls_since_probe: int = 0


def _statuses(points: Sequence[sweep_lib.ExpandedPoint]) -> str:
  return "; ".join(f"{p.arg}: {workdir_lib.describe(workdir_lib.read_status_or_damaged(p.workdir))}"
                   for p in points)


def _run_ended(launcher: tpu.TpuLauncher, name: str, s: _Slice) -> bool:
  """Whether every worker's copied log of the latest start has an exit line for each point."""
  try:
    logs = worker_logs.latest_logs(launcher.sweep_dir, name)
  except Exception:  # pylint: disable=broad-exception-caught  (a hint; the ssh probe decides)
    return False
  return len(logs) == launcher.hosts and all(
      text.count(worker_logs.EXIT_PREFIX) >= s.started_points for text in logs.values())


def _start(launcher: tpu.TpuLauncher, name: str, points: Sequence[sweep_lib.ExpandedPoint],
           s: _Slice) -> None:
  outcome = launcher.start(name, points)
  s.starts += outcome == "started"
  s.started_points, s.polls_since_probe = len(points), 0  # also when already running


def _step(launcher: tpu.TpuLauncher, name: str, points: Sequence[sweep_lib.ExpandedPoint],
          s: _Slice, now: float) -> str:
  """One poll of one slice; returns why the watch gives up on it, or ''."""
  try:
    state = launcher.describe(name)
  except tpu.CommandError as e:
    if not tpu.not_found(e):
      launcher.say(f"{name}: cannot read its queued resource's state; retrying "
                    f"({str(e).splitlines()[-1]})")
      return ""
    state = ""
  if state == "ACTIVE":
    return _active(launcher, name, points, s)
  if state in RECREATE_STATES or not state:
    return _recreate(launcher, name, points, s, state, now)
  s.exists = True  # waiting: queued, provisioning, suspending, deleting
  s.waiting_since = now if s.waiting_since is None else s.waiting_since
  if now - s.waiting_since > launcher.wait_timeout_s:
    return f"still {state} after {launcher.wait_timeout_s:.0f}s (--wait_timeout_s)"
  return ""


def _active(launcher: tpu.TpuLauncher, name: str, points: Sequence[sweep_lib.ExpandedPoint],
            s: _Slice) -> str:
  """An ACTIVE slice: set up and start it once; start its points again once they stopped."""
  s.exists, s.waiting_since = True, None
  if not s.set_up:
    launcher.setup(name)
    s.set_up = True
    _start(launcher, name, points, s)
    return ""
  s.polls_since_probe += 1
  if s.polls_since_probe < IDLE_PROBE_POLLS and not _run_ended(launcher, name, s):
    return ""
  s.polls_since_probe = 0
  if not launcher.idle(name):
    return ""
  points = [p for p in points  # read again: a point may have finished since the poll began
            if not workdir_lib.is_final(workdir_lib.read_status_or_damaged(p.workdir))]
  if not points:
    return ""
  lost = worker_logs.lost_processes_of(launcher.sweep_dir, name)
  why = "".join(f"; {p.arg}: {lost[p.arg]}" for p in points if p.arg in lost)
  launcher.say(f"{name}: {len(points)} point(s) unfinished and no longer running "
                f"({_statuses(points)}){why}")
  if s.restarts >= launcher.max_recreations:
    return (f"its points stopped unfinished {s.restarts + 1} times; see "
            f"{worker_logs.log_dir(launcher.sweep_dir, name)}/")
  s.restarts += 1
  launcher.say(f"{name}: starting them again ({s.restarts}/{launcher.max_recreations})")
  _start(launcher, name, points, s)
  return ""


def _recreate(launcher: tpu.TpuLauncher, name: str, points: Sequence[sweep_lib.ExpandedPoint],
              s: _Slice, state: str, now: float) -> str:
  """A slice that is gone ('') or FAILED/SUSPENDED/PREEMPTED: delete it, then create it."""
  say, limit = launcher.say, launcher.max_recreations
  if state:
    if s.recreations >= limit:
      return f"queued resource is {state} after {limit} recreation(s)"
    s.recreations += 1
    say(f"{name}: queued resource is {state}; deleting it to recreate it ({s.recreations}/"
        f"{limit}); points: {_statuses(points)}")
    outcome = launcher.delete_one(name)
    if outcome.startswith("failed"):
      say(f"{name}: delete {outcome.splitlines()[0]}; retrying")
    s.deleting, s.set_up, s.waiting_since = True, False, now
    return ""  # created once it is gone: a queued resource being deleted still exists
  if s.exists and not s.deleting:  # deleted behind our back
    if s.recreations >= limit:
      return f"queued resource was gone after {limit} recreation(s)"
    s.recreations += 1
    say(f"{name}: queued resource is gone; recreating it ({s.recreations}/{limit})")
  else:
    say(f"{name}: creating its queued resource" + (" again" if s.deleting else ""))
  if not launcher.create_one(name):
    return launcher.failures.pop(name)
  s.created += not s.exists
  s.exists, s.deleting, s.set_up, s.waiting_since = True, False, False, now
  return ""


def watch(launcher: tpu.TpuLauncher, clock: Callable[[], float] = time.time) -> int:
  """Runs the sweep until every point is final or every unfinished slice is given up."""
  if launcher.dry_run:  # what up would run; the watch itself needs real states
    return launcher.create() | launcher.run()
  launcher.validate_points()
  launcher.check()
  say = launcher.say
  slices = launcher.slices()
  track = {name: _Slice() for name in slices}
  given_up: dict[str, str] = {}
  say(f"watch: {len(launcher.points)} point(s) on {len(slices)} slice(s) of "
      f"{tpu_inputs.describe_topology(launcher.accelerator_type)}, polling every "
      f"{launcher.poll_s:g}s")
  while True:
    pending = {n: ps for n, ps in launcher.pending(quiet=True).items() if n not in given_up}
    if not pending:
      break
    for name, points in pending.items():
      try:
        reason = _step(launcher, name, points, track[name], clock())
      except tpu.CommandError as e:  # setup or start: retried at the next poll, bounded
        s = track[name]
        s.restarts += 1
        reason = (f"setup or start failed {s.restarts} times: {e}"
                  if s.restarts > launcher.max_recreations else "")
        if not reason:
          say(f"{name}: setup or start failed; retrying ({str(e).splitlines()[0]})")
          s.set_up = False
      if reason:
        given_up[name] = reason
        launcher.fail(name, f"giving up: {reason}")
    launcher.sleep(launcher.poll_s)
  return _summary(launcher, track, given_up)


def _summary(launcher: tpu.TpuLauncher, track: dict[str, _Slice],
             given_up: dict[str, str]) -> int:
  say = launcher.say
  statuses = [workdir_lib.read_status_or_damaged(p.workdir) for p in launcher.points]
  done = sum(bool(s and s.status == workdir_lib.DONE) for s in statuses)
  diverged = sum(bool(s and s.status == workdir_lib.DIVERGED) for s in statuses)
  final = done + diverged
  recreated = {n: s.recreations for n, s in track.items() if s.recreations}
  say(f"watch: {final}/{len(statuses)} points final ({done} done, {diverged} diverged); "
      f"slices created {sum(s.created for s in track.values())}, recreated "
      f"{sum(recreated.values())}" + (f" ({', '.join(f'{n}: {k}' for n, k in recreated.items())})"
                                      if recreated else "")
      + f"; point runs started {sum(s.starts for s in track.values())} (restarts "
      f"{sum(s.restarts for s in track.values())})")
  if given_up:
    say(f"watch: gave up on {len(given_up)} slice(s); fix the cause and rerun `up --watch`")
  say("watch: the slices still exist (and bill) until `delete`")
  return 1 if given_up else 0
