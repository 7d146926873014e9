"""launch.tpu and the real trainer on a simulated TPU pod (tests/fake_gcloud): 2 slices of a
v4-16 (8 devices on 2 hosts each, every worker a local JAX process, the workers of a slice one
JAX job found by JAX's own cluster detection), one shared dir as the bucket.

`up --watch` runs the sweep; slice 1 is preempted mid-run (its workers SIGKILLed, its queued
resource SUSPENDED); the watch recreates it and the point resumes from its checkpoint, each
step logged once. Then `status`, the analysis on the sweep dir, and `delete` with one queued
resource already gone.
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

# One worker for every multi-process test: JAX's CPU collectives give a job's processes 30 s
# to meet at their first collective, which two such tests at once on 2 cores can exceed.
pytestmark = pytest.mark.xdist_group("multiprocess")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "tests/pod_scan_config.py"
GCLOUD = os.path.join(REPO, "tests", "fake_gcloud", "gcloud")
BATCHES = (8, 16, 32)  # slice 0 runs b8 then b16, slice 1 runs b32
STEPS = 12


def _prepare_data(data_dir: str) -> None:
  """Builds the corpus once: slices are separate jobs and would race to build it."""
  from bscan import data  # pylint: disable=g-import-not-at-top
  import pod_scan_config  # pylint: disable=g-import-not-at-top
  cfg = pod_scan_config.get_config("size=tiny,batch=8")
  cfg.data.data_dir = data_dir
  data.prepare(cfg)


def _rows(workdir: str) -> list[dict]:
  return workdir_lib.read_metrics(workdir)[0]


def _wait(condition, timeout: float, what: str, proc: subprocess.Popen) -> None:
  deadline = time.time() + timeout
  while not condition():
    assert proc.poll() is None, f"the launcher exited while waiting for {what}"
    assert time.time() < deadline, f"timed out waiting for {what}"
    time.sleep(0.05)


def _tpu(action: str, sweep_dir: str, env: dict, *extra: str) -> list[str]:
  return [sys.executable, "-m", "launch.tpu", action, f"--config={CONFIG}",
          f"--workdir={sweep_dir}", "--zone=us-central2-b", "--accelerator_type=v4-16",
          "--points_per_slice=2", f"--gcloud={GCLOUD}", *extra]


def test_pod_sweep_survives_a_preemption_then_analysis_and_delete(tmp_path):
  state, sweep_dir, data_dir = tmp_path / "pod", str(tmp_path / "bucket" / "scan"), str(
      tmp_path / "tensorflow_datasets")
  state.mkdir()
  _prepare_data(data_dir)
  env = {**os.environ, fakepod.STATE_ENV: str(state), fakepod.PYTHON_ENV: sys.executable,
         # the simulated hosts compile with less optimisation: a third less CPU on 2 cores
         fakepod.XLA_FLAGS_ENV: ("--xla_backend_optimization_level=0 "
                                 "--xla_llvm_disable_expensive_passes=true")}
  prefix = tpu.default_prefix(sweep_dir)
  # Settings reach the workers through --env: here a compilation cache they share, so the
  # resumed run does not compile again.
  cache = tmp_path / "jax_cache"
  up = _tpu("up", sweep_dir, env, "--watch", "--spot", "--remote_python=~/python",
            "--pip_extra=", "--package=bscan==0.1.0", "--poll_s=2", "--log_copy_s=1",
            "--max_recreations=2", f"--config_override=data.data_dir={data_dir}",
            f"--env=JAX_COMPILATION_CACHE_DIR={cache}",
            "--env=JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0")
  proc = subprocess.Popen(up, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, start_new_session=True)
  b32 = f"{sweep_dir}/tiny/b32"
  try:
    # Preempt slice 1 after its first checkpoint (step 4) and before its run ends.
    _wait(lambda: len(_rows(b32)) >= 5, 240, "b32 past step 4", proc)
    killed = fakepod.preempt(str(state), f"{prefix}-1")
    preempted_at = len(_rows(b32))
    out, _ = proc.communicate(timeout=300)
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
    fakepod.kill_all(str(state))  # delete below does it too; this is for a failed test
  print(out)  # the watch's account of the sweep (pytest -s shows it)
  assert killed >= 2 and preempted_at < STEPS, (killed, preempted_at)
  assert proc.returncode == 0, out
  assert f"{prefix}-1: queued resource is SUSPENDED; deleting it to recreate it (1/2)" in out
  assert (f"watch: 3/3 points final (3 done, 0 diverged); slices created 2, recreated 1 "
          f"({prefix}-1: 1)") in out, out
  for b in BATCHES:
    workdir = f"{sweep_dir}/tiny/b{b}"
    assert workdir_lib.read_status(workdir).status == workdir_lib.DONE
    assert [r["step"] for r in _rows(workdir)] == list(range(1, STEPS + 1)), b  # each once
    derived = workdir_lib.read_config(workdir).derived
    assert (derived["num_processes"], derived["num_devices"]) == (2, 8)
  # the preempted slice's first start left its logs; the second start has its own
  starts = {n.split("-", 1)[0] for n in os.listdir(f"{sweep_dir}/logs/{prefix}-1")}
  assert len(starts) == 2, starts
  # every worker of the image had bscan "installed" (recorded, skipped)
  assert len((state / "pip.log").read_text().splitlines()) == 6  # 2 + 2 + 2 after recreation

  result = subprocess.run(_tpu("status", sweep_dir, env), cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=60)
  assert result.returncode == 0, result.stderr
  for b, s in zip(BATCHES, (0, 0, 1)):
    assert f"{prefix}-{s} size=tiny,batch={b}: done (step {STEPS}, " in result.stdout

  result = subprocess.run([sys.executable, "-m", "bscan.analysis", f"--workdir={sweep_dir}",
                           f"--out={tmp_path / 'analysis'}"], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=120)
  assert result.returncode == 0, result.stdout + result.stderr
  assert (tmp_path / "analysis" / "critical_batch.csv").exists()

  fakepod.vanish(str(state), f"{prefix}-0")  # deleted elsewhere meanwhile
  result = subprocess.run(_tpu("delete", sweep_dir, env), cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=60)
  assert result.returncode == 0, result.stdout + result.stderr
  assert result.stdout.splitlines() == [f"{prefix}-0: already gone", f"{prefix}-1: deleted",
                                        "delete: 1 deleted, 1 already gone, 0 failed"]
  assert fakepod.resources(str(state)) == [] and fakepod.kill_all(str(state)) == 0
