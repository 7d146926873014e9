"""launch.local with the real trainer: SIGKILL mid-sweep, rerun, every step exactly once."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = REPO / "tests/tiny_scan_config.py"
POINTS = ("tiny/b2", "tiny/b4", "tiny/b8")


def _launch(sweep_dir: pathlib.Path, env: dict) -> subprocess.Popen:
  return subprocess.Popen(
      [sys.executable, "-m", "launch.local", f"--config={CONFIG}", f"--workdir={sweep_dir}",
       "--noanalysis"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True, start_new_session=True)


def _rows(path: pathlib.Path) -> list[dict]:
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def test_sigkill_and_rerun_finishes_every_point_exactly_once(tmp_path):
  env = {**os.environ, "BSCAN_DATA_DIR": str(tmp_path / "data"), "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": ""}  # one real CPU device, as a user's run would have
  sweep_dir = tmp_path / "sweep"
  proc = _launch(sweep_dir, env)
  first = sweep_dir / POINTS[0] / "metrics.jsonl"
  deadline = time.time() + 240
  while len(_rows(first)) < 12 and proc.poll() is None and time.time() < deadline:
    time.sleep(0.2)
  assert proc.poll() is None, proc.communicate()[0]
  os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its trainer, mid-run
  proc.wait()
  assert len(_rows(first)) < 30

  proc = _launch(sweep_dir, env)
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out
  for point in POINTS:
    status = json.loads((sweep_dir / point / "status.json").read_text())
    assert status["status"] == "done", (point, status)
    assert [r["step"] for r in _rows(sweep_dir / point / "metrics.jsonl")] == list(range(1, 31))
  saved = json.loads((sweep_dir / "sweep.json").read_text())
  assert saved["targets"] == [4.0, 3.5] and len(saved["points"]) == 3
