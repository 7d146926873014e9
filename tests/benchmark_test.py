"""Benchmark: the noise on/off timing runs end to end at tiny shapes (no timing assertions)."""

import os
import pathlib
import subprocess
import sys

import numpy as np

from bscan import benchmark

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_one_round_at_tiny_shapes():
  cfg = benchmark.BenchConfig(size="tiny", seq_len=8, batch=4, microbatch=1, vocab_size=32,
                              rounds=1, steps_per_round=1, hessian_calls=1)
  result = benchmark.run(cfg)
  assert result.num_microbatches == 4
  assert result.step_on.shape == result.step_off.shape == (1,)
  assert np.all(result.step_on > 0) and np.all(result.step_off > 0)
  text = benchmark.report(result)
  assert "ratio on/off" in text and "K=4" in text and "Hessian" in text


def test_binary_runs_at_tiny_shapes():
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  cmd = [sys.executable, "-m", "experiments.benchmark_noise", "--size=tiny", "--seq_len=8",
         "--batch=4", "--microbatch=2", "--vocab_size=32", "--rounds=1", "--steps_per_round=1",
         "--hessian_calls=0"]
  out = subprocess.run(cmd, check=True, cwd=REPO, env=env, timeout=300, capture_output=True,
                       text=True).stdout
  assert "ratio on/off" in out and "K=2" in out
