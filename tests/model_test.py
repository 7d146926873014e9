"""Model: size ladder, Kaplan's N ≈ 12·n_layer·d_model², shapes and causality."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bscan import model as model_lib


def _cfg(size: str, vocab: int = 256, max_len: int = 64) -> model_lib.ModelConfig:
  n_layer, d_model, n_heads = model_lib.SIZES[size]
  return model_lib.ModelConfig(n_layer, d_model, n_heads, vocab, max_len)


def _param_counts(cfg: model_lib.ModelConfig) -> tuple[int, int]:
  """(non-embedding, embedding) counts of the real parameter tree, from shapes only."""
  model = model_lib.Transformer(cfg)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  params = shapes["params"]
  embed = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params["embed"]))
  total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  return total - embed, embed


@pytest.mark.parametrize("size", model_lib.LADDER)
def test_ladder_non_embedding_count_matches_kaplan_within_one_percent(size):
  cfg = _cfg(size, vocab=50257, max_len=1024)
  non_embed, embed = _param_counts(cfg)
  assert non_embed == model_lib.non_embedding_params(cfg)
  assert embed == model_lib.embedding_params(cfg)
  kaplan = 12 * cfg.n_layer * cfg.d_model**2
  assert abs(non_embed / kaplan - 1) < 0.01, (size, non_embed, kaplan)


def test_ladder_names_are_the_papers():
  assert model_lib.SIZES["3m"][:2] == (4, 256)
  assert model_lib.SIZES["85m"][:2] == (12, 768)
  assert model_lib.SIZES["708m"][:2] == (36, 1280)


def test_logits_shape_and_causality():
  cfg = _cfg("tiny")
  model = model_lib.Transformer(cfg)
  ids = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)
  params = model.init(jax.random.key(0), ids)["params"]
  logits = model.apply({"params": params}, ids)
  assert logits.shape == (2, 16, cfg.vocab_size) and logits.dtype == jnp.float32
  # Changing token 10 must not change logits at positions < 10.
  changed = model.apply({"params": params}, ids.at[:, 10].set((ids[:, 10] + 1) % 256))
  np.testing.assert_array_equal(logits[:, :10], changed[:, :10])
  assert not np.allclose(logits[:, 10:], changed[:, 10:])


def test_initial_loss_is_near_uniform():
  cfg = _cfg("tiny")
  model = model_lib.Transformer(cfg)
  batch = jax.random.randint(jax.random.key(2), (4, 17), 0, cfg.vocab_size)
  params = model.init(jax.random.key(0), batch[:, :-1])["params"]
  loss = model_lib.loss_fn(model, params, batch)
  assert abs(float(loss) - np.log(cfg.vocab_size)) < 0.1


def test_tied_embedding_output_layer():
  cfg = _cfg("tiny")
  params = model_lib.Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  assert set(params["params"]) == {"embed", "block_0", "block_1", "ln_f"}
  assert set(params["params"]["embed"]) == {"token", "position"}


def test_bfloat16_compute_keeps_float32_params_and_logits():
  cfg = model_lib.ModelConfig(2, 32, 2, 256, 64, dtype="bfloat16")
  model = model_lib.Transformer(cfg)
  ids = jnp.zeros((1, 8), jnp.int32)
  params = model.init(jax.random.key(0), ids)["params"]
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  assert model.apply({"params": params}, ids).dtype == jnp.float32


@pytest.mark.parametrize("t", [1, 7, 16])
def test_causal_attention_matches_jax_dot_product_attention(t):
  # The model's written-out attention against the library call: outputs and gradients.
  q, k, v, c = (jax.random.normal(key, (2, t, 3, 8)) for key in
                jax.random.split(jax.random.key(0), 4))
  ref = lambda q, k, v: jnp.sum(jax.nn.dot_product_attention(q, k, v, is_causal=True) * c)
  ours = lambda q, k, v: jnp.sum(model_lib.causal_attention(q, k, v) * c)
  np.testing.assert_allclose(model_lib.causal_attention(q, k, v),
                             jax.nn.dot_product_attention(q, k, v, is_causal=True),
                             rtol=1e-5, atol=1e-6)
  for g, g_ref in zip(jax.grad(ours, (0, 1, 2))(q, k, v), jax.grad(ref, (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5)


def test_causal_attention_bfloat16_is_close_to_float32():
  q, k, v = (jax.random.normal(key, (2, 16, 2, 8)) for key in
             jax.random.split(jax.random.key(1), 3))
  y16 = model_lib.causal_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
  assert y16.dtype == jnp.bfloat16
  np.testing.assert_allclose(y16.astype(jnp.float32), model_lib.causal_attention(q, k, v),
                             atol=0.05)


def test_loss_and_gradients_match_the_library_layers():
  # The whole model against itself built on jax.nn.dot_product_attention.
  cfg = _cfg("tiny")
  model = model_lib.Transformer(cfg)
  batch = jax.random.randint(jax.random.key(3), (2, 17), 0, cfg.vocab_size)
  params = model.init(jax.random.key(0), batch[:, :-1])["params"]
  loss, grads = jax.value_and_grad(lambda p: model_lib.loss_fn(model, p, batch))(params)
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(model_lib, "causal_attention",
               lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True))
    ref_loss, ref_grads = jax.value_and_grad(lambda p: model_lib.loss_fn(model, p, batch))(
        params)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
