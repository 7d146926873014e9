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
