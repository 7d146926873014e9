"""launch.tpu on the simulated pod (tests/fake_gcloud) with the fake trainer: up, status,
delete with a vanished slice, --watch through a preemption and a deletion, lost processes.

The real trainer on the same pod is tests/launch_tpu_pod_test.py; these runs take seconds.
"""

import os
import signal
import subprocess
import sys
import time

import pytest

from bscan import workdir as workdir_lib
from fake_gcloud import fakepod
from launch import tpu

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GCLOUD = os.path.join(REPO, "tests", "fake_gcloud", "gcloud")
STEPS = 40


@pytest.fixture
def pod(tmp_path):
  """A fake pod's state dir, its launcher environment and sweep config; all processes killed."""
  state = tmp_path / "pod"
  state.mkdir()
  config = tmp_path / "two.py"
  config.write_text(
      "import ml_collections\nfrom bscan import sweep as sweep_lib\n"
      "def get_config(arg=''):\n"
      "  return ml_collections.ConfigDict(sweep_lib.parse_point_arg(arg))\n"
      "def sweep():\n  return sweep_lib.Sweep(points=[{'size': 'tiny', 'batch': b} for b in "
      "(2, 4)], targets=(3.0,))\n")
  env = {**os.environ, fakepod.STATE_ENV: str(state), fakepod.PYTHON_ENV: sys.executable,
         fakepod.WAITS_ENV: "1"}
  try:
    yield state, env, str(config)
  finally:
    fakepod.kill_all(str(state))


def _args(config: str, sweep_dir: str, *extra: str, trainer: str = "") -> list[str]:
  return [sys.executable, "-m", "launch.tpu", f"--config={config}", f"--workdir={sweep_dir}",
          "--zone=us-central2-b", f"--gcloud={GCLOUD}", "--remote_python=~/python",
          "--pip_extra=", "--package=bscan==0.1.0", "--poll_s=0.2", "--log_copy_s=0.3",
          f"--trainer={trainer or os.path.join(REPO, 'tests', 'fake_trainer.py')}",
          f"--env=FAKE_TRAINER_STEPS={STEPS}", "--env=FAKE_TRAINER_STEP_S=0.1", *extra]


def _launch(action: str, config: str, sweep_dir: str, env: dict, *extra: str,
            timeout: float = 60, trainer: str = "") -> subprocess.CompletedProcess:
  argv = _args(config, sweep_dir, *extra, trainer=trainer)
  return subprocess.run(argv[:3] + [action] + argv[3:], cwd=REPO, env=env, text=True,
                        capture_output=True, timeout=timeout, check=False)


def _steps(workdir: str) -> list[int]:
  return [r[workdir_lib.Col.STEP] for r in workdir_lib.read_metrics(workdir)[0]]


def _wait(condition, timeout: float, what: str) -> None:
  deadline = time.time() + timeout
  while not condition():
    assert time.time() < deadline, f"timed out waiting for {what}"
    time.sleep(0.1)


def _final(sweep_dir: str) -> bool:
  return all(workdir_lib.is_final(workdir_lib.read_status_or_damaged(f"{sweep_dir}/tiny/b{b}"))
             for b in (2, 4))


def test_up_status_and_delete_with_a_vanished_slice(pod, tmp_path):
  """up runs every point on its slice; status shows them; delete reports a gone slice too."""
  state, env, config = pod
  sweep_dir = str(tmp_path / "sweep")
  prefix = tpu.default_prefix(sweep_dir)
  result = _launch("up", config, sweep_dir, env)
  assert result.returncode == 0, result.stdout + result.stderr
  assert result.stdout.count("started 1 point(s) on 1 worker(s)") == 2
  _wait(lambda: _final(sweep_dir), 60, "both points")
  for b in (2, 4):
    assert _steps(f"{sweep_dir}/tiny/b{b}") == list(range(1, STEPS + 1))
  # the image's pip ran on every worker, with the launcher's requirement
  assert (state / "pip.log").read_text().splitlines() == [
      f"{prefix}-{i}-w0 -m pip install -q bscan==0.1.0" for i in (0, 1)]
  # logs copied to the sweep dir, with each point's exit status
  _wait(lambda: all(tpu.worker_logs.latest_logs(sweep_dir, f"{prefix}-{i}") for i in (0, 1)),
        10, "the logs' copies")
  _wait(lambda: "bscan: exit status 0 of point size=tiny,batch=4" in "".join(
      tpu.worker_logs.latest_logs(sweep_dir, f"{prefix}-1").values()), 10, "the final copy")

  result = _launch("status", config, sweep_dir, env)
  assert result.returncode == 0, result.stderr
  assert f"{prefix}-0 size=tiny,batch=2: done (step {STEPS}, reached cap)" in result.stdout
  assert f"{prefix}-1 size=tiny,batch=4: done (step {STEPS}, reached cap)" in result.stdout
  assert result.stdout.count(" ACTIVE") == 2

  fakepod.vanish(str(state), f"{prefix}-0")  # deleted elsewhere, e.g. in the console
  result = _launch("delete", config, sweep_dir, env)
  assert result.returncode == 0, result.stdout + result.stderr
  assert result.stdout.splitlines() == [f"{prefix}-0: already gone", f"{prefix}-1: deleted",
                                        "delete: 1 deleted, 1 already gone, 0 failed"]
  assert fakepod.resources(str(state)) == []
  assert fakepod.kill_all(str(state)) == 0  # no worker process outlived its slice


def test_watch_recreates_a_preempted_and_a_deleted_slice(pod, tmp_path):
  """--watch: a preempted slice and a vanished one are recreated; each step logged once."""
  state, env, config = pod
  sweep_dir = str(tmp_path / "sweep")
  prefix = tpu.default_prefix(sweep_dir)
  argv = _args(config, sweep_dir, "--watch", "--spot")
  proc = subprocess.Popen(argv[:3] + ["up"] + argv[3:], cwd=REPO, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          start_new_session=True)
  try:
    _wait(lambda: all(len(_steps(f"{sweep_dir}/tiny/b{b}")) >= 5 for b in (2, 4)), 60,
          "both points past step 5")
    # the pod test sees what Cloud TPU shows (SUSPENDED); here the node state some tools show
    assert fakepod.preempt(str(state), f"{prefix}-1", "PREEMPTED") > 0
    fakepod.vanish(str(state), f"{prefix}-0")
    out, _ = proc.communicate(timeout=90)
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
  assert proc.returncode == 0, out
  assert f"{prefix}-1: queued resource is PREEMPTED; deleting it to recreate it (1/3)" in out
  assert f"{prefix}-0: queued resource is gone; recreating it (1/3)" in out
  assert (f"watch: 2/2 points final (2 done, 0 diverged); slices created 2, recreated 2 "
          f"({prefix}-0: 1, {prefix}-1: 1)") in out
  for b in (2, 4):
    assert _steps(f"{sweep_dir}/tiny/b{b}") == list(range(1, STEPS + 1))
  assert sorted(r["name"] for r in fakepod.resources(str(state))) == [f"{prefix}-0",
                                                                      f"{prefix}-1"]
  # each start's logs survive: the preempted slice has two starts' logs
  assert len(os.listdir(f"{sweep_dir}/logs/{prefix}-1")) == 2


def test_watch_reports_a_lost_process_and_gives_up_after_its_restarts(pod, tmp_path):
  """Worker 1 dies (SIGKILL), worker 0 aborts (134): 'lost process 1'; bounded restarts."""
  state, env, config = pod
  trainer = tmp_path / "dies.py"
  trainer.write_text(
      "import os, signal, sys\n"
      "if os.environ['FAKE_TPU_WORKER_ID'] == '1':\n  os.kill(os.getpid(), signal.SIGKILL)\n"
      "print('F external/xla/...: Terminating process because the coordinator detected "
      "missing heartbeats', flush=True)\nsys.exit(134)\n")
  sweep_dir = str(tmp_path / "sweep")
  prefix = tpu.default_prefix(sweep_dir)
  result = _launch("up", config, sweep_dir, env, "--watch", "--accelerator_type=v4-16",
                   "--max_recreations=1", trainer=str(trainer), timeout=90)
  assert result.returncode == 1, result.stdout + result.stderr
  out = result.stdout
  lost = (f"lost process 1 ({prefix}-1-w1 exited 137; the others aborted with exit 134)")
  assert out.count(f"size=tiny,batch=4: {lost}") == 2, out  # after the first run and the restart
  assert f"{prefix}-1: starting them again (1/1)" in out
  assert f"{prefix}-1: giving up: its points stopped unfinished 2 times" in out
  assert "watch: gave up on 2 slice(s)" in out
  result = _launch("status", config, sweep_dir, env)
  assert f"{prefix}-1 size=tiny,batch=4: not started; last start: {lost}" in result.stdout
