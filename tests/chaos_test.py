"""scripts/chaos.py in its small form: three tiny points, mixed kills, results identical."""

import os
import pathlib
import subprocess
import sys

import psutil

REPO = pathlib.Path(__file__).resolve().parents[1]
KILLS = 6
TIMEOUT_S = 600  # a bound, not the expected time (~2-3 min on 2 busy cores)


def test_chaos_small_form_gives_identical_results(tmp_path, request):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}  # one CPU device, as a user's
  # Compiled executables are kept across sessions (pytest's cache dir): a rerun skips compiling.
  cache_provider = getattr(request.config, "cache", None)
  cache = cache_provider.mkdir("chaos_jax_cache") if cache_provider else tmp_path / "jax_cache"
  proc = subprocess.Popen(
      [sys.executable, "scripts/chaos.py", f"--workdir={tmp_path}", f"--kills={KILLS}",
       "--seed=3", "--parallel=3", "--life_s=10", f"--compile_cache={cache}",
       f"--timeout_s={TIMEOUT_S - 60}", "--stall_s=180"],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    out, _ = proc.communicate(timeout=TIMEOUT_S)
  except subprocess.TimeoutExpired:
    proc.terminate()  # chaos.py then kills its launchers and trainers
    out, _ = proc.communicate(timeout=60)
  summary = (out.strip().splitlines() or [""])[-1]
  assert proc.returncode == 0 and "identical: yes" in summary, out
  assert f"{KILLS} kills:" in summary, out
  assert "mid-checkpoint 0" not in summary and "launcher 0" not in summary, out
  left = [p.info["cmdline"] for p in psutil.process_iter(["cmdline"])
          if str(tmp_path) in " ".join(p.info["cmdline"] or [])]
  assert not left, left  # nothing of the sweep outlives the command
