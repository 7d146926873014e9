"""Tests for launch.local (with tests/fake_trainer.py), launch.locks and launch.workdirs."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from launch import locks
from launch import workdirs

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
  out, err = proc.communicate(timeout=60)
  return proc.returncode, out + err


def _steps(workdir: str, rel: str) -> list[int]:
  with open(os.path.join(workdir, rel, "metrics.jsonl")) as f:
    return [json.loads(line)["step"] for line in f]


def _runs(workdir: str, rel: str) -> int:
  """How many times the launcher started this point's trainer (one '$ cmd' line per start)."""
  with open(os.path.join(workdir, "logs", rel + ".log")) as f:
    return sum(line.startswith("$ ") for line in f)


def _assert_complete(workdir: str, steps: int) -> None:
  """Every good point done with each step exactly once; the failing point failed at step 2."""
  for rel in GOOD:
    assert workdirs.state(workdirs.read_status(os.path.join(workdir, rel))) == "done", rel
    assert _steps(workdir, rel) == list(range(1, steps + 1)), rel
  assert workdirs.state(workdirs.read_status(os.path.join(workdir, FAILING))) == "failed"
  assert _steps(workdir, FAILING) == [1]


def test_sweep_runs_reports_failure_and_rerun_skips_done(tmp_path):
  """A failing point is reported and fails the exit code; the others finish and stay done."""
  rc, out = _finish(_launch(str(tmp_path), "--parallel=2"))
  assert rc == 1, out
  assert "fail=1: failed: RuntimeError: fake failure (fail=1)" in out
  assert "4 done, 1 failed" in out
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
  first = tmp_path / GOOD[0] / "metrics.jsonl"
  deadline = time.time() + 30
  while not (first.exists() and len(first.read_text().splitlines()) >= 3):
    assert time.time() < deadline and proc.poll() is None, _finish(proc)[1]
    time.sleep(0.02)
  os.killpg(proc.pid, sig)  # the whole group, as a terminal's Ctrl-C or `kill -9 -PGID` does
  rc, out = _finish(proc)
  assert workdirs.state(workdirs.read_status(str(tmp_path / GOOD[0]))) == "running"
  if sig == signal.SIGINT:
    assert rc == 130 and "interrupted at running" in out, out
    # The trainer ignored the SIGINT and stopped on the launcher's SIGTERM instead.
    assert (workdirs.read_status(str(tmp_path / GOOD[0])) or {})["reason"] == "stopped by SIGTERM"
  else:
    assert rc == -signal.SIGKILL
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


class _FakeGcsPath:
  """Stands in for epath.Path on gs:// and raises what gcsfs / google-auth raise."""

  error: Exception = ImportError("Please install gcsfs to access Google Storage")

  def __init__(self, path: str):
    del path

  def exists(self) -> bool:
    raise self.error


def test_gcs_workdir_errors_say_what_to_do(monkeypatch):
  """No gcsfs -> name the extra; no credentials -> say how to log in."""
  monkeypatch.setattr(workdirs.epath, "Path", _FakeGcsPath)
  with pytest.raises(workdirs.WorkdirError, match=r"pip install 'bscan\[gcs\]'"):
    workdirs.check_access("gs://bucket/sweep")

  class DefaultCredentialsError(Exception):
    pass

  monkeypatch.setattr(_FakeGcsPath, "error", DefaultCredentialsError("no credentials found"))
  with pytest.raises(workdirs.WorkdirError, match="application-default login"):
    workdirs.check_access("gs://bucket/sweep")


def test_bad_inputs_fail_clearly(tmp_path):
  """An unknown config or an unusable gs:// sweep dir is one clear line, before any run."""
  rc, out = _finish(_launch(str(tmp_path), config=str(tmp_path / "missing.py")))
  assert rc == 1 and "error: config file" in out and "missing.py" in out
  rc, out = _finish(_launch("gs://bscan-test-no-such-bucket/sweep"))
  assert rc == 1 and "error: cannot access gs://bscan-test-no-such-bucket/sweep" in out, out
