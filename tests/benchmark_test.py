"""Benchmark: runs end to end at tiny shapes (no timing assertions), FLOPs, JSON, torch twin."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bscan import benchmark
from bscan import model as model_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = benchmark.BenchConfig(sizes=("tiny",), batch=4, seq_len=8, microbatch=1, vocab_size=32,
                             rounds=2, steps_per_round=1, hessian_calls=1)


def test_flops_per_token_against_a_hand_count():
  # 3m: 4 layers × 256, T = 256, V = 257.
  cfg = model_lib.ModelConfig(n_layer=4, d_model=256, n_heads=4, vocab_size=257, max_len=256)
  per_layer = (256 * 768 + 768) + (256 * 256 + 256) + (256 * 1024 + 1024) + (1024 * 256 + 256)
  per_layer += 2 * 2 * 256  # two LayerNorms
  n = 4 * per_layer + 2 * 256  # + final LayerNorm
  assert n == 3_159_552
  forward = 2 * n + 2 * 4 * 256 * 256 + 2 * 256 * 257  # params, q·kᵀ and p·v, output layer
  assert benchmark.flops_per_token(cfg, seq_len=256) == 3 * forward


def test_runs_end_to_end_at_tiny_shapes_with_a_reference():
  calls = []

  def reference(mcfg, lay, seq_len):
    assert mcfg.n_layer == 2 and seq_len == 8
    return lambda: calls.append(lay.microbatch)

  result = benchmark.run(TINY, reference, "fake")
  (r,) = result["sizes"]
  assert r["num_microbatches"] == 4 and r["microbatch"] == 1
  assert r["tokens_per_s"] > 0 and r["fake_tokens_per_s"] > 0 and r["bscan_over_fake"] > 0
  assert 0 < r["mfu"] and r["compile_s"] > 0 and r["memory_bytes"] > 0
  assert r["batch1_step_s"] > 0 and r["hessian_call_s"] > 0
  assert len(r["rounds"]["noise_on"]) == TINY.rounds
  assert set(calls) == {1}  # the reference got the same layout, and the batch-1 one
  text = benchmark.report(result)
  assert "bscan/fake" in text and "6·N_nonembedding" in text and " 4×1 " in text


def test_binary_writes_json(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  out = tmp_path / "bench.json"
  cmd = [sys.executable, "-m", "experiments.benchmark", "--size=tiny,25k", "--seq_len=8",
         "--batch=4", "--microbatch=2", "--vocab_size=32", "--rounds=1", "--steps_per_round=1",
         "--torch=false", "--nooverhead", f"--json={out}"]
  text = subprocess.run(cmd, check=True, cwd=REPO, env=env, timeout=300, capture_output=True,
                        text=True).stdout
  assert "noise on/off" in text and "MFU" in text
  result = json.loads(out.read_text())
  assert set(result) >= {"config", "flop_formula", "matmul_gflops", "jax_version", "device",
                         "max_rss_bytes", "sizes"}
  assert [r["size"] for r in result["sizes"]] == ["tiny", "25k"]
  assert set(result["sizes"][0]) >= {
      "tokens_per_s", "mfu", "flops_per_token", "noise_on_off_ratio", "compile_s",
      "memory_bytes", "num_microbatches", "step_s"}
  assert result["reference"] is None


@pytest.mark.parametrize("size", ["tiny", "3m"])
def test_torch_reference_has_the_models_parameter_count(size):
  torch_reference = pytest.importorskip("benchmarks.torch_reference", exc_type=ImportError)
  n_layer, d_model, n_heads = model_lib.SIZES[size]
  cfg = model_lib.ModelConfig(n_layer, d_model, n_heads, vocab_size=257, max_len=64)
  ref = torch_reference.Transformer(n_layer, d_model, n_heads, 257, 64)
  shapes = jax.eval_shape(model_lib.Transformer(cfg).init, jax.random.key(0),
                          jnp.zeros((1, 8), jnp.int32))["params"]
  total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  assert torch_reference.non_embedding_params(ref) == model_lib.non_embedding_params(cfg)
  assert sum(p.numel() for p in ref.parameters()) == total


def test_torch_reference_step_trains():
  torch_reference = pytest.importorskip("benchmarks.torch_reference", exc_type=ImportError)
  step = torch_reference.make_step(2, 32, 2, 257, seq_len=16, batch=4, microbatch=2)
  first = step()
  assert abs(first - np.log(257)) < 0.2  # same init scale: starts near uniform
  assert min(step() for _ in range(5)) < first


def test_end_to_end_reads_the_trainers_speed(pystdlib_cfg, tmp_path):
  from experiments.configs import base  # pylint: disable=g-import-not-at-top
  from tiny_run import tiny  # pylint: disable=g-import-not-at-top
  cfg = tiny(base.get_base_config(), pystdlib_cfg, steps=6)
  speed = benchmark.end_to_end(cfg, str(tmp_path / "run"), warmup=2)
  assert 0 < speed < float("inf")


def test_bfloat16_compute_keeps_float32_state():
  cfg = dataclasses.replace(TINY, dtype="bfloat16", overhead=False, hessian_calls=0)
  (r,) = benchmark.run(cfg)["sizes"]
  assert r["tokens_per_s"] > 0
  # pylint: disable-next=protected-access
  mcfg, lay = benchmark._model_config("tiny", cfg), benchmark._layout(cfg, cfg.batch)
  assert mcfg.dtype == "bfloat16"
  step = benchmark.build_step(mcfg, lay, cfg.seq_len, True)
  dtypes = {x.dtype for x in jax.tree.leaves((step.state.params, step.state.opt_state,
                                               step.state.noise))
            if jnp.issubdtype(x.dtype, jnp.floating)}
  assert dtypes == {jnp.dtype("float32")}
