"""Tests for launch.local (with tests/fake_trainer.py) and launch.locks."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from bscan import workdir as workdir_lib
from launch import locks

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
FIXTURE = os.path.join(TESTS, "sweep_fixture_config.py")
FAKE = os.path.join(TESTS, "fake_trainer.py")
GOOD = ["tiny/b2/lr1e-3/s0", "tiny/b2/lr1e-3/s1", "tiny/b4/lr1e-3/s0", "tiny/b4/lr1e-3/s1"]
FAILING = "tiny/b8/lr3e-4/s0/fail1"


def _launch(workdir: str, *flags: str, steps: int = 6, step_s: float = 0.03,
            config: str = FIXTURE) -> subprocess.Popen:
  """Starts launch.local in its own process group (so the test can signal the group)."""
  env = {**os.environ, "FAKE_TRAINER_STEPS": str(steps), "FAKE_TRAINER_STEP_S": str(step_s)}
  return subprocess.Popen(
      [sys.executable, "-m", "launch.local", f"--config={config}", f"--workdir={workdir}",
       f"--trainer={FAKE}", "--noanalysis", *flags],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      start_new_session=True)


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
  try:
    out, err = proc.communicate(timeout=60)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)  # leave nothing running
    raise
  return proc.returncode, out + err


def _state(workdir: str) -> str:
  status = workdir_lib.read_status(workdir)
  return status.status if status else ""


def _steps(workdir: str, rel: str) -> list[int]:
  rows, bad = workdir_lib.read_metrics(os.path.join(workdir, rel))
  assert not bad, bad
  return [r[workdir_lib.Col.STEP] for r in rows]


def _runs(workdir: str, rel: str) -> int:
  """How many times the launcher started this point's trainer (one '$ cmd' line per start)."""
  with open(os.path.join(workdir, "logs", rel + ".log")) as f:
    return sum(line.startswith("$ ") for line in f)


def _assert_complete(workdir: str, steps: int) -> None:
  """Every good point done with each step exactly once; the failing point failed at step 2."""
  for rel in GOOD:
    assert _state(os.path.join(workdir, rel)) == "done", rel
    assert _steps(workdir, rel) == list(range(1, steps + 1)), rel
  assert _state(os.path.join(workdir, FAILING)) == "failed"
  assert _steps(workdir, FAILING) == [1]


def test_sweep_runs_reports_failure_and_rerun_skips_done(tmp_path):
  """A failing point is reported and fails the exit code; the others finish and stay done."""
  rc, out = _finish(_launch(str(tmp_path), "--parallel=2"))
  assert rc == 1, out
  assert "fail=1: failed: RuntimeError: fake failure (fail=1)" in out
  assert "4 done, 1 failed" in out and "1 of 5 point(s) not finished:" in out
  _assert_complete(str(tmp_path), 6)
  assert json.loads((tmp_path / "sweep.json").read_text())["targets"] == [3.0, 2.5]
  rc, out = _finish(_launch(str(tmp_path)))
  assert rc == 1 and "4 already finished" in out, out
  assert [_runs(str(tmp_path), rel) for rel in GOOD] == [1] * 4
  assert _runs(str(tmp_path), FAILING) == 2  # failed points are retried, final ones never


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_interrupted_sweep_resumes_with_each_step_once(tmp_path, sig: signal.Signals):
  """Ctrl-C (SIGINT) or SIGKILL of the launcher's group mid-sweep, then a rerun, finishes it."""
  proc = _launch(str(tmp_path), "--parallel=2", steps=20)
  deadline = time.time() + 30
  while len(workdir_lib.read_metrics(str(tmp_path / GOOD[0]))[0]) < 3:
    assert time.time() < deadline and proc.poll() is None, _finish(proc)[1]
    time.sleep(0.02)
  os.killpg(proc.pid, sig)  # the whole group, as a terminal's Ctrl-C or `kill -9 -PGID` does
  rc, out = _finish(proc)
  if sig == signal.SIGINT:
    assert rc == 130 and "interrupted at preempted" in out, out
    # The trainer ignored the SIGINT and stopped on the launcher's SIGTERM instead.
    assert workdir_lib.read_status(str(tmp_path / GOOD[0])).reason == "stopped by SIGTERM"
    assert _state(str(tmp_path / GOOD[0])) == "preempted"
  else:
    assert rc == -signal.SIGKILL
    assert _state(str(tmp_path / GOOD[0])) == "running"
  rc, out = _finish(_launch(str(tmp_path), "--parallel=2", steps=20))
  assert rc == 1 and "4 done, 1 failed" in out, out
  _assert_complete(str(tmp_path), 20)


def test_two_launchers_sharing_a_sweep_run_each_point_once(tmp_path):
  """Per-point locks: two concurrent launchers split the points, none runs twice."""
  procs = [_launch(str(tmp_path), "--parallel=2", steps=15) for _ in range(2)]
  outs = [_finish(p)[1] for p in procs]
  _assert_complete(str(tmp_path), 15)
  assert [_runs(str(tmp_path), rel) for rel in [*GOOD, FAILING]] == [1] * 5, outs


def test_lock_is_exclusive_and_stale_locks_are_broken(tmp_path):
  """A held lock excludes others; a lock of a dead pid on this host is broken."""
  path = str(tmp_path / "a" / "p.lock")
  first, second = locks.PointLock(path), locks.PointLock(path)
  assert first.try_acquire() and not second.try_acquire()
  first.release()
  assert second.try_acquire()
  second.release()
  dead = subprocess.Popen(["true"])
  dead.wait()
  owner = {"pid": dead.pid, "child_pid": None, "host": os.uname().nodename, "time": "t"}
  with open(path, "w") as f:
    json.dump(owner, f)
  assert locks.PointLock(path).try_acquire()
  os.unlink(path)
  with open(path, "w") as f:
    json.dump({**owner, "host": "elsewhere"}, f)
  lock = locks.PointLock(path)
  assert not lock.try_acquire() and "elsewhere" in lock.describe_owner()


def test_bad_inputs_fail_clearly(tmp_path):
  """An unknown config or an unusable gs:// sweep dir is one clear line, before any run."""
  rc, out = _finish(_launch(str(tmp_path), config=str(tmp_path / "missing.py")))
  assert rc == 2 and "error: --config: config file" in out and "missing.py" in out
  rc, out = _finish(_launch("gs://bscan-test-no-such-bucket/sweep"))
  assert rc == 2 and "error: --workdir=gs://bscan-test-no-such-bucket/sweep" in out, out


def test_unfinished_points_are_named_exit_1_and_skip_the_analysis(tmp_path):
  """A point running elsewhere (lock held, status running) is listed with why; exit 1; no
  analysis unless asked. A damaged status.json is reported in a line and the point reruns."""
  held = tmp_path / "sweep"
  running, damaged = str(held / GOOD[0]), held / GOOD[1]
  os.makedirs(running)
  workdir_lib.write_status(running, "running", "", 3, 192)
  lock = locks.PointLock(str(held / ".locks" / (GOOD[0] + ".lock")))
  assert lock.try_acquire()  # this test's live pid: another launcher on this host
  damaged.mkdir(parents=True)
  (damaged / workdir_lib.STATUS).write_text('{"status": "done", ')  # torn by hand
  try:
    proc = subprocess.Popen(
        [sys.executable, "-m", "launch.local", f"--config={FIXTURE}", f"--workdir={held}",
         f"--trainer={FAKE}", "--parallel=2"], cwd=REPO, text=True, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, start_new_session=True,
        env={**os.environ, "FAKE_TRAINER_STEPS": "3", "FAKE_TRAINER_STEP_S": "0.01"})
    rc, out = _finish(proc)
  finally:
    lock.release()
  assert rc == 1 and "Traceback" not in out, out
  assert f"{damaged}/status.json is not valid JSON" in out
  assert _state(str(damaged)) == "done" and _steps(str(held), GOOD[1]) == [1, 2, 3]
  assert "2 of 5 point(s) not finished:" in out
  assert (f"  size=tiny,batch=2,lr=0.001,seed=0: running (step 3): running elsewhere: pid "
          f"{os.getpid()}") in out
  assert "  size=tiny,batch=8,lr=0.0003,seed=0,fail=1: failed (step 1, RuntimeError" in out
  assert "analysis not run: 2 point(s) not finished" in out and "analysis:" not in out


def test_point_preempted_from_outside_is_reported_and_resumes(tmp_path):
  """SIGTERM to a trainer (not from the launcher): status preempted, listed, rerun resumes."""
  proc = _launch(str(tmp_path), steps=30, step_s=0.02)
  lock_path = tmp_path / ".locks" / (GOOD[0] + ".lock")
  deadline = time.time() + 30
  while not (lock_path.exists() and (json.loads(lock_path.read_text() or "{}").get("child_pid"))
             and len(workdir_lib.read_metrics(str(tmp_path / GOOD[0]))[0]) >= 2):
    assert time.time() < deadline and proc.poll() is None, _finish(proc)[1]
    time.sleep(0.02)
  os.kill(json.loads(lock_path.read_text())["child_pid"], signal.SIGTERM)
  rc, out = _finish(proc)
  assert rc == 1 and "1 preempted" in out, out
  assert ("  size=tiny,batch=2,lr=0.001,seed=0: preempted (step "
          in out.split("not finished:")[1]), out
  assert "stopped by SIGTERM): rerun resumes it" in out
  assert _state(str(tmp_path / GOOD[0])) == "preempted"
  rc, out = _finish(_launch(str(tmp_path), steps=30, step_s=0.02))
  assert rc == 1 and "1 done, 1 failed" in out, out
  assert _steps(str(tmp_path), GOOD[0]) == list(range(1, 31))


def test_pack_points_groups_points_that_differ_only_in_lr_and_seed():
  from bscan import sweep as sweep_lib  # pylint: disable=g-import-not-at-top
  from launch import local  # pylint: disable=g-import-not-at-top
  points = [{"size": "tiny", "batch": b, "lr": lr, "seed": s}
            for b in (2, 4) for lr in (1e-3, 3e-3) for s in (0, 1)] + [{"size": "tiny", "batch": 8}]
  expanded = sweep_lib.expand(sweep_lib.Sweep(points=points, targets=(1.0,)), "/s")
  packs = local.pack_points(expanded, 3)
  assert [[p.point.get("batch") for p in pack] for pack in packs] == [
      [2, 2, 2], [2], [4, 4, 4], [4], [8]]
  assert [p.arg for p in packs[1]] == ["size=tiny,batch=2,lr=0.003,seed=1"]
  assert local.pack_points(expanded, 1) == [[p] for p in expanded]
  # Branch sweeps: the replicates of one (checkpoint, k) share a trainer.
  branches = sweep_lib.expand(sweep_lib.Sweep(points=[
      {"at": a, "k": k, "replicate": r} for a in (200, 400) for k in (1, 2) for r in range(3)]),
                              "/b")
  assert [[(p.point["at"], p.point["k"]) for p in pack] for pack in
          local.pack_points(branches, 3)] == [[(a, k)] * 3 for a in (200, 400) for k in (1, 2)]
  # A point whose batch ramps trains alone (launch.local asks its config).
  alone = local.pack_points(expanded, 3, packable=lambda p: p.point.get("batch") != 2)
  assert [[p.point.get("batch") for p in pack] for pack in alone] == [
      [2], [2], [2], [2], [4, 4, 4], [4], [8]]
