"""launch.local with the real trainer: SIGKILL mid-sweep, rerun, every step exactly once."""

import os
import pathlib
import signal
import subprocess
import sys
import time

from bscan import sweep as sweep_lib
from bscan import workdir as workdir_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = REPO / "tests/tiny_scan_config.py"
POINTS = ("tiny/b2", "tiny/b4", "tiny/b8")


def _launch(sweep_dir: pathlib.Path, env: dict) -> subprocess.Popen:
  return subprocess.Popen(
      [sys.executable, "-m", "launch.local", f"--config={CONFIG}", f"--workdir={sweep_dir}",
       "--noanalysis"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True, start_new_session=True)


def _steps(workdir: pathlib.Path) -> list[int]:
  """The steps logged so far (a line being written is not a row yet)."""
  return [r[workdir_lib.Col.STEP] for r in workdir_lib.read_metrics(workdir)[0]]


def test_sigkill_and_rerun_finishes_every_point_exactly_once(tmp_path):
  env = {**os.environ, "BSCAN_DATA_DIR": str(tmp_path / "data"), "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": ""}  # one real CPU device, as a user's run would have
  sweep_dir = tmp_path / "sweep"
  proc = _launch(sweep_dir, env)
  first = sweep_dir / POINTS[0]
  deadline = time.time() + 240
  while len(_steps(first)) < 12 and proc.poll() is None and time.time() < deadline:
    time.sleep(0.2)
  assert proc.poll() is None, proc.communicate()[0]
  os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its trainer, mid-run
  proc.wait()
  assert len(_steps(first)) < 30

  proc = _launch(sweep_dir, env)
  try:
    out, _ = proc.communicate(timeout=600)
  finally:
    if proc.poll() is None:  # timed out: leave no launcher or trainer running
      os.killpg(proc.pid, signal.SIGKILL)
  assert proc.returncode == 0, out
  for point in POINTS:
    status = workdir_lib.read_status(sweep_dir / point)
    assert status and status.status == "done", (point, status)
    assert _steps(sweep_dir / point) == list(range(1, 31))
  saved = sweep_lib.read_sweep_json(str(sweep_dir))
  assert saved["targets"] == [4.0, 3.5] and len(saved["points"]) == 3


def test_pack_trains_points_of_one_shape_in_one_trainer(tmp_path):
  env = {**os.environ, "BSCAN_DATA_DIR": str(tmp_path / "data"), "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": ""}
  sweep_dir = tmp_path / "sweep"
  cmd = [sys.executable, "-m", "launch.local", f"--config={REPO / 'tests/packed_scan_config.py'}",
         f"--workdir={sweep_dir}", "--noanalysis", "--pack=4"]
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout + out.stderr
  assert "packed 4 per trainer into 2" in out.stdout
  for point in ("tiny/b4/lr1e-3", "tiny/b4/lr3e-3", "tiny/b8/lr1e-3"):
    assert workdir_lib.read_status(sweep_dir / point).status == "done"
    assert _steps(sweep_dir / point) == list(range(1, 31))
  log = (sweep_dir / "logs/tiny/b4/lr1e-3.log").read_text()
  assert "--pack_arg=size=tiny,batch=4,lr=0.003" in log and "2 runs packed" in log
  assert "packed with size=tiny,batch=4,lr=0.001" in (
      sweep_dir / "logs/tiny/b4/lr3e-3.log").read_text()
