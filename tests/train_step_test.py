"""Train step: 8 fake devices equal 1 device; K microbatches equal one big batch; noise norms."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bscan import model as model_lib
from bscan import noise_scale
from bscan import train_step as step_lib

T = 16
VOCAB = 64


@functools.cache
def _setup():
  cfg = model_lib.ModelConfig(n_layer=2, d_model=32, n_heads=2, vocab_size=VOCAB, max_len=T)
  model = model_lib.Transformer(cfg)
  loss_fn = lambda params, batch: model_lib.loss_fn(model, params, batch)
  init_params = lambda rng: model.init(rng, jnp.zeros((1, T), jnp.int32))["params"]
  return loss_fn, init_params


def _close(actual, desired, rtol=1e-5):
  """float32 tolerance relative to the leaf's scale (single entries can be near zero)."""
  desired = np.asarray(desired)
  np.testing.assert_allclose(actual, desired, rtol=rtol, atol=rtol * np.abs(desired).max())


def _batch(n: int, seed: int = 0) -> np.ndarray:
  return np.asarray(jax.random.randint(jax.random.key(seed), (n, T + 1), 0, VOCAB), np.int32)


def _run_step(devices, batch, microbatch, noise=True):
  loss_fn, init_params = _setup()
  mesh = step_lib.make_mesh(devices)
  d = len(devices)
  sc = step_lib.StepConfig(num_microbatches=len(batch) // d // microbatch, microbatch=microbatch,
                           seq_len=T, num_devices=d, noise=noise, ema_decay=0.9)
  lr = optax.constant_schedule(0.5)
  # SGD: Adam's first step is ≈ lr·sign(g), which turns float32 round-off in gradients that
  # are exactly zero in theory (the key bias of softmax attention) into ±lr differences.
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(lr))
  groups = noise_scale.param_groups(jax.eval_shape(init_params, jax.random.key(0)))
  state = step_lib.init_state(init_params, tx, jax.random.key(0), mesh, groups)
  step = step_lib.make_train_step(loss_fn, tx, lr, sc, mesh)
  state, metrics = step(state, batch)
  return jax.device_get(state), jax.device_get(metrics)


@pytest.mark.parametrize("n", [8, 16])
def test_eight_devices_equal_one_device(n):
  """8 devices × n/8 microbatches vs one device × n microbatches of one sequence each."""
  assert jax.device_count() == 8, "tests/conftest.py sets 8 fake CPU devices"
  batch = _batch(n)
  s8, m8 = _run_step(jax.devices(), batch, microbatch=1)
  s1, m1 = _run_step(jax.devices()[:1], batch, microbatch=1)
  np.testing.assert_allclose(m8["train_loss"], m1["train_loss"], rtol=1e-6)
  np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-5)
  jax.tree.map(_close,
               s8.params, s1.params)
  # Both see 16 microbatches of one sequence: the same noise estimates.
  for key in ("ns_g_small_sq", "ns_g_big_sq", "ns_gsq", "ns_trace", "b_simple"):
    np.testing.assert_allclose(m8[key], m1[key], rtol=1e-4, err_msg=key)


def test_microbatches_equal_one_big_batch():
  batch = _batch(8, seed=1)
  one = jax.devices()[:1]
  s_k, m_k = _run_step(one, batch, microbatch=2, noise=False)  # K = 4
  s_1, m_1 = _run_step(one, batch, microbatch=8, noise=False)  # K = 1
  np.testing.assert_allclose(m_k["train_loss"], m_1["train_loss"], rtol=1e-6)
  jax.tree.map(_close,
               s_k.params, s_1.params)


def _per_example_grads(params, batch):
  loss_fn, _ = _setup()
  return jax.jit(jax.vmap(jax.grad(loss_fn), in_axes=(None, 0)))(params, batch[:, None])


def test_each_device_local_gradient_matches_its_slice():
  loss_fn, init_params = _setup()
  params = init_params(jax.random.key(0))
  batch = _batch(16, seed=2)
  mesh = step_lib.make_mesh()
  sc = step_lib.StepConfig(num_microbatches=2, microbatch=1, seq_len=T, num_devices=8)
  grads, losses, sq_norms = jax.device_get(
      step_lib.per_device_grads(loss_fn, sc, mesh)(params, batch))
  per_example = _per_example_grads(params, batch)
  reference = jax.jit(jax.value_and_grad(loss_fn))
  for dev in range(8):
    ref_loss, ref_grad = reference(params, batch[2 * dev:2 * dev + 2])
    np.testing.assert_allclose(losses[dev], ref_loss, rtol=1e-6)
    jax.tree.map(lambda g, r: _close(g[dev], r),
                 grads, ref_grad)
  # Per-microbatch squared norms (one sequence each) equal per-example gradient norms.
  ref_sq = np.sum([np.sum(np.asarray(g, np.float64).reshape(16, -1)**2, axis=1)
                   for g in jax.tree.leaves(per_example)], axis=0)
  np.testing.assert_allclose(sq_norms.reshape(-1), ref_sq, rtol=1e-5)


def test_noise_estimates_match_per_example_reference():
  """With one sequence per microbatch the step's estimates are exact sample statistics."""
  _, init_params = _setup()
  batch = _batch(16, seed=3)
  _, m = _run_step(jax.devices(), batch, microbatch=1)
  params = init_params(jax.random.key(0))
  g = np.concatenate([np.asarray(x, np.float64).reshape(16, -1)
                      for x in jax.tree.leaves(_per_example_grads(params, batch))], axis=1)
  n = 16
  mean_sq = np.mean(np.sum(g**2, axis=1))
  big_sq = np.sum(g.mean(axis=0)**2)
  # Tokens: B_small = T, B_big = n·T; the estimates are exact functions of these norms.
  b_s, b_b = T, n * T
  gsq = (b_b * big_sq - b_s * mean_sq) / (b_b - b_s)
  trace = (mean_sq - big_sq) / (1 / b_s - 1 / b_b)
  np.testing.assert_allclose(m["ns_g_small_sq"], mean_sq, rtol=1e-5)
  np.testing.assert_allclose(m["ns_g_big_sq"], big_sq, rtol=1e-5)
  np.testing.assert_allclose(m["ns_gsq"], gsq, rtol=1e-3)
  np.testing.assert_allclose(m["ns_trace"], trace, rtol=1e-4)
  # Unbiased sample covariance trace, per sequence, times T tokens per sequence.
  np.testing.assert_allclose(m["ns_trace"] / T, np.sum(np.var(g, axis=0, ddof=1)), rtol=1e-4)


def test_one_microbatch_on_one_device_is_undefined_not_fatal():
  batch = _batch(4, seed=4)
  state, m = _run_step(jax.devices()[:1], batch, microbatch=4)
  assert np.isnan(m["b_simple"]) and np.isnan(m["ns_trace"])
  assert np.isfinite(m["train_loss"]) and int(state.step) == 1
