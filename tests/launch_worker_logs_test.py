"""launch.worker_logs: a worker's log copied whole into the sweep dir while the points run and
at their end (SIGTERM ignored), each point's exit status, and lost processes read back."""

import os
import signal
import subprocess
import sys
import time

from launch import remote
from launch import worker_logs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _wait(condition, what: str, timeout: float = 20) -> None:
  deadline = time.time() + timeout
  while not condition():
    assert time.time() < deadline, f"timed out waiting for {what}"
    time.sleep(0.05)


def _read(path) -> str:
  return path.read_text() if path.exists() else ""


def test_log_is_copied_during_the_run_and_at_its_end(tmp_path):
  """Lines reach the local log at once and the copy within --every_s; SIGTERM changes nothing."""
  local, dest = tmp_path / "s.log", tmp_path / "sweep" / "logs" / "s" / "t-host.log"
  local.write_text("an earlier run's line\n")  # the worker's own log keeps its history
  proc = subprocess.Popen(
      [sys.executable, "-m", "launch.worker_logs", f"--log={local}", f"--dest={dest}",
       "--every_s=0.2"], cwd=REPO, stdin=subprocess.PIPE, start_new_session=True)
  try:
    proc.stdin.write(b"step 1\n")
    proc.stdin.flush()
    _wait(lambda: _read(dest) == "step 1\n", "the first copy")  # this run's lines only
    proc.send_signal(signal.SIGTERM)  # a preemption notice: the points' last lines still come
    proc.stdin.write(b"step 2\nbscan: exit status 0 of point size=3m\n")
    proc.stdin.close()
    assert proc.wait(timeout=20) == 0
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
  assert dest.read_text() == "step 1\nstep 2\nbscan: exit status 0 of point size=3m\n"
  assert local.read_text() == "an earlier run's line\n" + dest.read_text()
  assert [p.name for p in dest.parent.iterdir()] == ["t-host.log"]  # no temporary left


def test_a_copy_that_fails_never_stops_the_points(tmp_path):
  """An unwritable destination is reported once in the local log; every line still arrives."""
  blocker = tmp_path / "file"
  blocker.write_text("")
  local = tmp_path / "s.log"
  result = subprocess.run(
      [sys.executable, "-m", "launch.worker_logs", f"--log={local}",
       f"--dest={blocker}/logs/h.log", "--every_s=0.05"], cwd=REPO,
      input=b"".join(b"line %d\n" % i for i in range(50)), timeout=30, check=False)
  assert result.returncode == 0
  text = local.read_text()
  assert all(f"line {i}\n" in text for i in range(50))
  assert text.count(f"bscan: cannot copy this log to {blocker}/logs/h.log") == 1


def test_points_script_runs_points_in_order_with_exit_lines_and_a_copy(tmp_path):
  """The worker's script: header, each point, its exit status, the log in LOG_DEST."""
  home = tmp_path / "home"
  (home / "bin").mkdir(parents=True)
  (home / "bin" / "hostname").write_text("#!/bin/sh\necho pod-w1\n")
  (home / "bin" / "hostname").chmod(0o755)
  dest = tmp_path / "sweep dir" / "logs" / "pod"
  script = remote.points_script(
      [["bash", "-c", "echo first; exit 3"], ["bash", "-c", "echo 'it''s second'"]],
      ["size=3m,batch=8", "size=3m,batch=16"], python=sys.executable, log="pod.log",
      log_dest=f"{dest}/STAMP-", copy_every_s=60, header="bscan: start STAMP on")
  env = {**os.environ, "HOME": str(home), "PATH": f"{home}/bin:{os.environ['PATH']}",
         "PYTHONPATH": REPO}
  subprocess.run(["bash", "-c", script], cwd=home, env=env, check=True, timeout=60)
  expected = ("bscan: start STAMP on pod-w1\nfirst\nbscan: exit status 3 of point size=3m,batch=8"
              "\nits second\nbscan: exit status 0 of point size=3m,batch=16\n")
  assert (dest / "STAMP-pod-w1.log").read_text() == expected
  assert (home / "pod.log").read_text() == expected
  assert worker_logs.exit_statuses(expected) == {"size=3m,batch=8": 3, "size=3m,batch=16": 0}
  logs = worker_logs.latest_logs(str(tmp_path / "sweep dir"), "pod")
  assert logs == {"pod-w1": expected}


def test_a_job_that_aborted_names_the_lost_process():
  """Exit 134 on the survivors (JAX's abort when a peer is gone) names the worker that was not."""
  line = "bscan: exit status {} of point size=3m,batch=8\n"
  logs = {"t1v-n-ab-w-0": line.format(134), "t1v-n-ab-w-1": line.format(137),
          "t1v-n-ab-w-2": line.format(134), "t1v-n-ab-w-3": "no exit line: the worker went away"}
  assert worker_logs.lost_processes(logs) == {"size=3m,batch=8": (
      "lost process 1, 3 (t1v-n-ab-w-1 exited 137, t1v-n-ab-w-3 gave no exit status; the "
      "others aborted with exit 134)")}
  everyone = {h: line.format(134) for h in ("a-w0", "a-w1")}
  assert worker_logs.lost_processes(everyone)["size=3m,batch=8"].startswith(
      "lost a process: all 2 workers aborted with exit 134")
  fine = {h: line.format(0) for h in ("a-w0", "a-w1")}
  assert worker_logs.lost_processes(fine) == {}
