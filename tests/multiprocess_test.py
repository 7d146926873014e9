"""The trainer as several JAX processes on this machine (gloo on CPU), as on a pod's hosts.

2 processes × 4 devices must train what 1 process × 8 devices trains; a killed or
preempted job resumes to the uninterrupted rows; a missing coordinator or a per-process
workdir fails with one line, in bounded time. Every process started here is killed at the
end of its test, even when the test fails.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

from bscan import workdir as workdir_lib
from bscan.workdir import Col
from launch import multiprocess
import tiny_run

# One worker: the runs share a fixture, and no two multi-process tests run at once (see
# tests/launch_tpu_pod_test.py).
pytestmark = pytest.mark.xdist_group("multiprocess")

CONFIG = "tests/multiprocess_config.py"
RUN_TIMEOUT_S = 300


@pytest.fixture(name="procs")
def _procs():
  """Popen objects started by a test; their process groups are killed at its end."""
  started: list[subprocess.Popen] = []
  yield started
  for p in started:
    try:
      os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
    p.wait()


def _trainer_args(pystdlib_cfg, workdir) -> list[str]:
  return [f"--config={CONFIG}", f"--workdir={workdir}",
          f"--config.data.data_dir={pystdlib_cfg.data.data_dir}"]


def _cached(env: dict[str, str] | None, cache) -> dict[str, str]:
  """env (or ours) with a JAX compilation cache the runs share: a rerun skips compiling."""
  return {**(env or os.environ), "JAX_COMPILATION_CACHE_DIR": str(cache),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


@pytest.fixture(scope="module", name="cache")
def _cache(pytestconfig, tmp_path_factory):
  """Compiled executables kept across sessions (pytest's cache dir), as chaos_test does."""
  provider = getattr(pytestconfig, "cache", None)
  return provider.mkdir("multiprocess_jax_cache") if provider else tmp_path_factory.mktemp("c")


def _start(procs, argv, env=None, cache=None, **kwargs) -> subprocess.Popen:
  if cache is not None:
    env = _cached(env, cache)
  p = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, start_new_session=True, **kwargs)
  procs.append(p)
  return p


def _job(procs, pystdlib_cfg, workdir, cache, grace_s: float = 2.0) -> subprocess.Popen:
  """2 processes × 4 CPU devices through launch.multiprocess."""
  return _start(procs, [sys.executable, "-m", "launch.multiprocess", "--processes=2",
                        "--devices_per_process=4", f"--grace_s={grace_s}", "--",
                        *_trainer_args(pystdlib_cfg, workdir)], cache=cache)


def _finish(p: subprocess.Popen, timeout: float = RUN_TIMEOUT_S) -> tuple[int, str]:
  out, _ = p.communicate(timeout=timeout)
  return p.returncode, out


def _checkpoints(workdir) -> list[int]:
  d = workdir / workdir_lib.CHECKPOINTS
  return sorted(int(c.name) for c in d.iterdir() if c.name.isdigit()) if d.exists() else []


def _wait_for_checkpoint(p: subprocess.Popen, workdir, after: int) -> int:
  deadline = time.monotonic() + RUN_TIMEOUT_S
  while time.monotonic() < deadline:
    done = [s for s in _checkpoints(workdir) if s > after]
    if done:
      return done[0]
    assert p.poll() is None, p.communicate()[0][-3000:]
    time.sleep(0.05)
  raise AssertionError(f"no checkpoint after step {after} in {RUN_TIMEOUT_S}s")


@pytest.fixture(scope="module")
def two_by_four(pystdlib_cfg, tmp_path_factory, cache):
  """An uninterrupted 2 × 4 run: its workdir and rows."""
  workdir = tmp_path_factory.mktemp("two_by_four")
  started: list[subprocess.Popen] = []
  try:
    rc, out = _finish(_job(started, pystdlib_cfg, workdir, cache))
  finally:
    for p in started:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
  assert rc == 0, out[-3000:]
  return workdir, tiny_run.rows(workdir)


def test_two_processes_train_what_one_process_with_all_devices_trains(
    two_by_four, pystdlib_cfg, tmp_path, procs, cache):
  workdir, rows = two_by_four
  env = multiprocess.process_env(8)
  one = _start(procs, [sys.executable, "-m", "experiments.train", "--multihost=off",
                       *_trainer_args(pystdlib_cfg, tmp_path)], env=env, cache=cache)
  rc, out = _finish(one)
  assert rc == 0, out[-3000:]
  reference = tiny_run.rows(tmp_path)
  assert [r["step"] for r in rows] == [r["step"] for r in reference] == list(range(1, 41))
  for column in ("train_loss", "eval_loss", "grad_norm", "b_simple_tokens", Col.G_BIG_SQ,
                 Col.TRACE):
    a = np.array([r.get(column, np.nan) for r in rows], float)
    b = np.array([r.get(column, np.nan) for r in reference], float)
    assert np.isfinite(a).sum() >= 8 and np.array_equal(np.isfinite(a), np.isfinite(b))
    np.testing.assert_allclose(a[np.isfinite(a)], b[np.isfinite(b)], rtol=2e-5, atol=1e-6,
                               err_msg=column)
  derived = json.loads((workdir / workdir_lib.CONFIG).read_text())["derived"]
  assert (derived["num_processes"], derived["num_devices"], derived["backend"]) == (2, 8, "cpu")
  # Only process 0 writes run files: one row per step, no share token left behind.
  assert not (workdir / workdir_lib.SHARE_TOKEN).exists()
  assert workdir_lib.read_status(workdir).status == workdir_lib.DONE


def test_preempted_and_killed_jobs_resume_to_the_uninterrupted_rows(
    two_by_four, pystdlib_cfg, tmp_path, procs, cache):
  _, expected = two_by_four
  # SIGTERM to both processes (the starter forwards it): they agree on a step and save.
  job = _job(procs, pystdlib_cfg, tmp_path, cache)
  _wait_for_checkpoint(job, tmp_path, after=0)
  job.send_signal(signal.SIGTERM)
  rc, out = _finish(job)
  assert rc == multiprocess.EXIT_PREEMPTED, out[-3000:]
  status = workdir_lib.read_status(tmp_path)
  assert status.status == workdir_lib.PREEMPTED and status.step < 40
  # SIGKILL one process mid-run: the starter stops the other and names the lost one.
  job = _job(procs, pystdlib_cfg, tmp_path, cache)
  resumed = _wait_for_checkpoint(job, tmp_path, after=status.step)
  victim = next(c for c in psutil.Process(job.pid).children()
                if "--process_id=1" in c.cmdline())
  victim.kill()
  rc, out = _finish(job)
  assert rc == 1 and "error: lost process 1 (killed by SIGKILL)" in out, out[-3000:]
  assert f"resumed from the checkpoint at step {status.step}" in out
  assert max(_checkpoints(tmp_path)) >= resumed
  # The rerun finishes: each step exactly once, the rows of the uninterrupted job.
  rc, out = _finish(_job(procs, pystdlib_cfg, tmp_path, cache))
  assert rc == 0, out[-3000:]
  assert tiny_run.rows(tmp_path) == expected


def test_unreachable_coordinator_is_one_line_within_the_timeout(pystdlib_cfg, tmp_path, procs):
  start = time.monotonic()
  p = _start(procs, [sys.executable, "-m", "experiments.train", "--multihost=on",
                     f"--coordinator_address=127.0.0.1:{multiprocess.free_port()}",
                     "--num_processes=2", "--process_id=1", "--initialization_timeout=2",
                     *_trainer_args(pystdlib_cfg, tmp_path)])
  rc, out = _finish(p, timeout=60)
  assert rc == 2 and time.monotonic() - start < 60
  assert out.strip().splitlines()[-1].startswith(
      "error: process 1 cannot reach the coordinator at 127.0.0.1:"), out[-2000:]
  assert "Traceback" not in out


def test_a_workdir_per_process_fails_instead_of_hanging(pystdlib_cfg, tmp_path, procs):
  address = f"127.0.0.1:{multiprocess.free_port()}"
  ps = [_start(procs, multiprocess.process_command(
      "experiments.train", _trainer_args(pystdlib_cfg, tmp_path / f"own{i}"), address, 2, i),
      env=multiprocess.process_env(4)) for i in range(2)]
  for p in ps:
    rc, out = _finish(p, timeout=120)
    assert rc == 2, out[-3000:]
    assert "is not one directory for all 2 processes: process(es) [1] do not see" in out
