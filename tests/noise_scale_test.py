"""Tests of the noise-scale estimators against float64 numpy references (closed forms, exact
sample identities, and unbiasedness over many random batches of a finite population)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from bscan import noise_scale as ns

# ----------------------------------------------------------------------------------------------
# Small models with analytic per-example gradients in float64 numpy (independent of JAX).


def _softmax_population(n=200, d=6, c=3, seed=0):
  """A finite population for softmax regression and a parameter point away from the optimum."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d))
  w_true = rng.normal(size=(d, c))
  y = np.argmax(x @ w_true + rng.gumbel(size=(n, c)), axis=1)
  params = {"w": 0.3 * rng.normal(size=(d, c)), "b": 0.1 * rng.normal(size=(c,))}
  return x, y, params


def _softmax_per_example_grads(x, y, params):
  """float64 [n, P] per-example gradients of softmax cross-entropy (w then b, as ravelled)."""
  z = x @ params["w"] + params["b"]
  p = np.exp(z - z.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  r = p - np.eye(p.shape[1])[y]  # dL/dz
  gw = x[:, :, None] * r[:, None, :]
  return np.concatenate([r, gw.reshape(len(x), -1)], axis=1)  # 'b' sorts before 'w'


def _softmax_loss(params, mb):
  x, y = mb
  logp = jax.nn.log_softmax(x @ params["w"] + params["b"])
  return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))


def _f32(tree):
  return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), tree)


def _microbatch_norms(loss_fn, params, mbs):
  """(mean_k |g_k|², |mean_k g_k|²) of K microbatches stacked on axis 0, as the train step."""
  grads = jax.vmap(jax.grad(loss_fn), in_axes=(None, 0))(params, mbs)
  small = jnp.mean(jax.vmap(ns.tree_sq_norm)(grads))
  big = ns.tree_sq_norm(jax.tree_util.tree_map(lambda g: g.mean(0), grads))
  return small, big


# ----------------------------------------------------------------------------------------------
# 1. Closed forms, undefined case, EMA bias correction, jit.


def test_unbiased_estimates_hand_computed():
  # b_small=4, b_big=32, E|G_small|²=2, |G_big|²=1:
  # |G|² = (32·1 − 4·2)/28 = 6/7;  tr Σ = (2 − 1)/(1/4 − 1/32) = 32/7.
  gsq, trace = ns.unbiased_estimates(2.0, 1.0, 4, 32)
  np.testing.assert_allclose([gsq, trace], [6 / 7, 32 / 7], rtol=1e-6)
  assert gsq.dtype == trace.dtype == jnp.float32
  # Pure noise: E|G_small|² = 8·|G_big|² at K=8 gives |G|² = 0 exactly; a raw estimate may be < 0.
  gsq, _ = ns.unbiased_estimates(8.0, 1.0, 4, 32)
  np.testing.assert_allclose(gsq, 0.0, atol=1e-6)
  gsq, _ = ns.unbiased_estimates(9.0, 1.0, 4, 32)
  assert gsq < 0


def test_equal_batch_sizes_give_nan_not_inf():
  gsq, trace = ns.unbiased_estimates(2.0, 1.0, 16, 16)
  assert np.isnan(gsq) and np.isnan(trace)
  state, m = jax.jit(ns.update)(ns.init(["embed"]), 2.0, 1.0, 16, 16, 0.9, {"embed": (2.0, 1.0)})
  assert all(np.isnan(m[k]) for k in ("ns_gsq", "ns_trace", "b_simple", "ns_group/embed/b_simple"))
  assert not any(np.isinf(v) for v in jax.tree_util.tree_leaves((state, m)))
  # The undefined step is not folded into the EMAs, so later defined steps are unaffected.
  assert int(state.count) == 0 and float(state.ema_gsq) == 0.0
  # And gradients through the estimator stay finite (the untaken branch is guarded).
  dg = jax.grad(lambda s: ns.unbiased_estimates(s, 1.0, 16, 16)[0])(2.0)
  assert np.isfinite(dg)


def test_ema_bias_correction_matches_numpy():
  rng = np.random.default_rng(1)
  n, decay, b_small, b_big = 7, 0.9, 4.0, 32.0
  big = rng.uniform(0.5, 1.5, size=n)
  small = big * rng.uniform(1.5, 6.0, size=n)
  update = jax.jit(ns.update)
  state = ns.init()
  for t in range(n):
    state, m = update(state, small[t], big[t], b_small, b_big, decay)
  # float64 reference: per-step estimates, then EMA with 1 − decay^n bias correction.
  gsq = (b_big * big - b_small * small) / (b_big - b_small)
  trace = (small - big) / (1 / b_small - 1 / b_big)
  w = (1 - decay) * decay ** np.arange(n - 1, -1, -1)
  ema_gsq, ema_trace = w @ gsq / (1 - decay**n), w @ trace / (1 - decay**n)
  got_gsq, got_trace = ns.ema_estimates(state, decay)
  np.testing.assert_allclose([got_gsq, got_trace], [ema_gsq, ema_trace], rtol=1e-5)
  np.testing.assert_allclose(m["b_simple"], ema_trace / ema_gsq, rtol=1e-5)
  np.testing.assert_allclose(ns.b_simple(state), ema_trace / ema_gsq, rtol=1e-5)
  np.testing.assert_allclose([m["ns_gsq"], m["ns_trace"]], [gsq[-1], trace[-1]], rtol=1e-5)
  assert int(state.count) == n
  assert set(m) == {"ns_g_small_sq", "ns_g_big_sq", "ns_gsq", "ns_trace", "b_simple"}


def test_b_simple_undefined_before_first_step_and_for_nonpositive_gsq():
  assert np.isnan(ns.b_simple(ns.init()))
  assert all(np.isnan(x) for x in ns.ema_estimates(ns.init(), 0.99))
  # One pure-noise step with a negative |G|² estimate: logged raw, ratio NaN (never inf).
  state, m = ns.update(ns.init(), 9.0, 1.0, 4, 32, 0.99)
  assert m["ns_gsq"] < 0 and np.isnan(m["b_simple"])


def test_group_update_uses_the_same_formulas_per_group():
  groups = ("embed", "block_0/attn")
  sq = {"embed": (3.0, 1.0), "block_0/attn": (2.0, 1.5)}
  state, m = jax.jit(ns.update, static_argnames="decay")(
      ns.init(groups), 5.0, 2.5, 4, 32, decay=0.95, group_sq=sq)
  for g, (small, big) in sq.items():
    gsq, trace = ns.unbiased_estimates(small, big, 4, 32)
    np.testing.assert_allclose(m[f"ns_group/{g}/b_simple"], trace / gsq, rtol=1e-6)
  with pytest.raises(ValueError, match="groups"):
    ns.update(ns.init(groups), 5.0, 2.5, 4, 32, 0.95, {"embed": (1.0, 1.0)})


# ----------------------------------------------------------------------------------------------
# 2. One example per microbatch: the estimates are the unbiased sample statistics exactly.


def test_per_example_microbatches_give_sample_covariance_exactly():
  x, y, params = _softmax_population(n=24, seed=2)
  ref = _softmax_per_example_grads(x, y, params)  # float64 [B, P]
  b = len(x)
  mbs = (jnp.asarray(x[:, None], jnp.float32), jnp.asarray(y[:, None]))  # K = B microbatches of 1
  p32 = _f32(params)
  per_ex = jax.vmap(jax.grad(_softmax_loss), in_axes=(None, 0))(p32, mbs)
  flat = np.concatenate([np.asarray(per_ex["b"]), np.asarray(per_ex["w"]).reshape(b, -1)], 1)
  np.testing.assert_allclose(flat, ref, rtol=1e-5, atol=1e-6)  # JAX grads = analytic grads

  small, big = jax.jit(functools.partial(_microbatch_norms, _softmax_loss))(p32, mbs)
  gsq, trace = ns.unbiased_estimates(small, big, 1, b)
  mean = ref.mean(0)
  trace_ref = np.trace(np.cov(ref, rowvar=False, ddof=1))  # unbiased sample covariance
  mean_sq = (ref**2).sum(1).mean()
  np.testing.assert_allclose(trace_ref, b / (b - 1) * (mean_sq - mean @ mean), rtol=1e-12)
  gsq_ref = (b * (mean @ mean) - mean_sq) / (b - 1)
  np.testing.assert_allclose(gsq_ref, mean @ mean - trace_ref / b, rtol=1e-10)
  np.testing.assert_allclose(trace, trace_ref, rtol=2e-5)
  np.testing.assert_allclose(gsq, gsq_ref, rtol=2e-5, atol=1e-5 * mean_sq)


# ----------------------------------------------------------------------------------------------
# 3. Unbiasedness over random batches drawn with replacement from a finite population.


def test_estimates_unbiased_over_random_batches():
  x, y, params = _softmax_population(n=200, seed=3)
  ref = _softmax_per_example_grads(x, y, params)
  g_pop = ref.mean(0)
  gsq_pop = g_pop @ g_pop  # |G|²
  trace_pop = ((ref - g_pop) ** 2).sum(1).mean()  # tr Σ, population covariance (ddof=0)

  draws, k, b = 2000, 8, 4  # B_big = 32 in microbatches of 4
  idx = np.random.default_rng(4).integers(0, len(x), size=(draws, k, b))  # i.i.d. draws
  mbs = (jnp.asarray(x[idx], jnp.float32), jnp.asarray(y[idx]))
  norms = jax.vmap(functools.partial(_microbatch_norms, _softmax_loss), in_axes=(None, 0))
  small, big = jax.jit(norms)(_f32(params), mbs)
  gsq, trace = (np.asarray(a, np.float64) for a in ns.unbiased_estimates(small, big, b, k * b))

  # Measured (seeds 3/4): |G|² 0.2866 vs exact 0.2901 (SE 0.0032, −1.1 SE, −1.2%); tr Σ 5.026
  # vs exact 5.043 (SE 0.024, −0.7 SE, −0.4%); exact B_simple 17.4 examples.
  # Tolerance: 4 standard errors of the mean (4 SE ≈ 4.3% of |G|², 1.9% of tr Σ).
  for est, exact in ((gsq, gsq_pop), (trace, trace_pop)):
    se = est.std(ddof=1) / np.sqrt(draws)
    assert 4 * se < 0.1 * exact, "the check must be sharp enough to catch a 10% bias"
    assert abs(est.mean() - exact) < 4 * se, (est.mean(), exact, se)


# ----------------------------------------------------------------------------------------------
# 4. Squared norms and layer groups on a tree shaped like the transformer's parameters.


def _fake_transformer_params(n_layer=11, d=4, dtype=jnp.float32):
  """A parameter tree with the key structure of bscan.model.Transformer (random values)."""
  rng = np.random.default_rng(0)
  arr = lambda *shape: jnp.asarray(rng.normal(size=shape), dtype)
  ln = lambda: {"scale": arr(d), "bias": arr(d)}
  dense = lambda i, o: {"kernel": arr(i, o), "bias": arr(o)}
  tree = {"embed": {"token": arr(10, d), "position": arr(8, d)}, "ln_f": ln()}
  for i in range(n_layer):
    tree[f"block_{i}"] = {"ln1": ln(), "attn": {"qkv": dense(d, 3 * d), "proj": dense(d, d)},
                          "ln2": ln(), "mlp": {"fc": dense(d, 4 * d), "proj": dense(4 * d, d)}}
  return tree


def test_layer_group_mapping():
  assert ns.layer_group(("embed", "token")) == "embed"
  assert ns.layer_group(("block_3", "ln1", "scale")) == "block_3/attn"
  assert ns.layer_group(("block_3", "attn", "qkv", "kernel")) == "block_3/attn"
  assert ns.layer_group(("block_10", "ln2", "bias")) == "block_10/mlp"
  assert ns.layer_group(("block_10", "mlp", "fc", "kernel")) == "block_10/mlp"
  assert ns.layer_group(("ln_f", "scale")) == "final_norm"
  assert ns.layer_group(("params", "ln_f", "bias")) == "final_norm"
  key_path = (jax.tree_util.DictKey("block_2"), jax.tree_util.DictKey("mlp"))
  assert ns.layer_group(key_path) == "block_2/mlp"
  with pytest.raises(ValueError, match="no layer group"):
    ns.layer_group(("lm_head", "kernel"))

  tree = _fake_transformer_params(n_layer=11)
  groups = ns.param_groups(tree)
  expected = (("embed",) + tuple(f"block_{i}/{p}" for i in range(11) for p in ("attn", "mlp"))
              + ("final_norm",))
  assert groups == expected  # model order: block_2 before block_10
  assert ns.param_groups({"params": tree}) == expected


def test_group_sq_norms_sum_to_tree_sq_norm():
  tree = _fake_transformer_params(n_layer=3)
  assert tuple(ns.group_sq_norms(tree)) == ns.param_groups(tree)  # model order (eager)
  per_group = jax.jit(ns.group_sq_norms)(tree)  # (jit returns dicts in sorted-key order)
  np.testing.assert_allclose(sum(per_group.values()), ns.tree_sq_norm(tree), rtol=1e-6)
  # Each group against float64 numpy over the leaves it should own.
  for i in range(3):
    blk = tree[f"block_{i}"]
    attn = sum((np.asarray(a, np.float64) ** 2).sum()
               for a in jax.tree_util.tree_leaves((blk["ln1"], blk["attn"])))
    np.testing.assert_allclose(per_group[f"block_{i}/attn"], attn, rtol=1e-6)
  np.testing.assert_allclose(
      per_group["final_norm"],
      sum((np.asarray(a, np.float64) ** 2).sum() for a in jax.tree_util.tree_leaves(tree["ln_f"])),
      rtol=1e-6)


def test_tree_sq_norm_accumulates_bfloat16_in_float32():
  v = 1.0 + 2.0**-7  # exact in bfloat16; its square is not
  tree = {"a": jnp.full((100_000,), v, jnp.bfloat16), "b": jnp.full((3, 7), -v, jnp.bfloat16)}
  exact = (100_000 + 21) * v**2
  got = jax.jit(ns.tree_sq_norm)(tree)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, exact, rtol=1e-6)
  grouped = ns.group_sq_norms({"embed": {"token": tree["a"]}, "ln_f": {"scale": tree["b"]}})
  assert all(g.dtype == jnp.float32 for g in grouped.values())
  np.testing.assert_allclose(grouped["embed"], 100_000 * v**2, rtol=1e-6)
  # The naive bfloat16 sum is far off: this is what float32 accumulation protects against.
  naive = jnp.sum(jnp.square(tree["a"])).astype(jnp.float32)
  assert abs(float(naive) - 100_000 * v**2) > 100


# ----------------------------------------------------------------------------------------------
# 5. Hessian-weighted noise scale on logistic regression with exact per-example Hessians.


def _logistic_population(n=300, d=4, seed=5):
  """Inputs with heavy-tailed scales (so curvature and gradient size correlate) and labels."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)) * rng.lognormal(0.0, 0.5, size=(n, 1))
  x[:, -1] = 1.0  # bias feature
  w_true = rng.normal(size=d)
  t = (rng.uniform(size=n) < 1 / (1 + np.exp(-x @ w_true))).astype(np.float64)
  w = 0.5 * rng.normal(size=d)
  return x, t, w


def _logistic_exact(x, t, w):
  """float64 per-example gradients [n, d] and Hessians [n, d, d] of binary cross-entropy."""
  p = 1 / (1 + np.exp(-x @ w))
  g = (p - t)[:, None] * x
  h = (p * (1 - p))[:, None, None] * x[:, :, None] * x[:, None, :]
  return g, h


def _logistic_logits(params, mb):
  return mb[0] @ params["w"]


def _bce_from_logits(z, mb):
  t = mb[1]
  return jnp.mean(jnp.logaddexp(0.0, z) - t * z)  # −[t log σ(z) + (1−t) log(1−σ(z))]


def _logistic_loss(params, mb):
  return _bce_from_logits(_logistic_logits(params, mb), mb)


def _as_mb(x, t, idx):
  return (jnp.asarray(x[idx], jnp.float32), jnp.asarray(t[idx], jnp.float32))


def test_hessian_terms_match_exact_quadratic_forms_on_one_draw():
  x, t, w = _logistic_population()
  g, h = _logistic_exact(x, t, w)
  k, b = 4, 4
  rng = np.random.default_rng(6)
  idx, hold = rng.integers(0, len(x), size=(k, b)), rng.integers(0, len(x), size=b)
  fn = jax.jit(functools.partial(ns.hessian_noise_terms, _logistic_loss, b_small=b))
  out = fn({"w": jnp.asarray(w, jnp.float32)}, _as_mb(x, t, idx), _as_mb(x, t, hold))
  h_hold = h[hold].mean(0)
  g_k = g[idx].mean(1)  # [K, d]
  g_bar = g_k.mean(0)
  q_small = np.einsum("ki,ij,kj->", g_k, h_hold, g_k) / k
  q_big = g_bar @ h_hold @ g_bar
  np.testing.assert_allclose([out["ns_q_small"], out["ns_q_big"]], [q_small, q_big], rtol=1e-5)
  ghg = (k * b * q_big - b * q_small) / (k * b - b)
  trhs = (q_small - q_big) / (1 / b - 1 / (k * b))
  np.testing.assert_allclose([out["ns_ghg"], out["ns_trhs"]], [ghg, trhs], rtol=1e-4)
  if ghg > 0:
    np.testing.assert_allclose(out["b_noise"], trhs / ghg, rtol=1e-4)
    assert out["ns_b_noise_undefined"] == 0
  else:
    assert np.isnan(out["b_noise"]) and out["ns_b_noise_undefined"] == 1


def test_hessian_noise_unbiased_with_held_out_curvature_and_biased_without():
  x, t, w = _logistic_population()
  g, h = _logistic_exact(x, t, w)
  g_pop, h_pop = g.mean(0), h.mean(0)
  sigma = np.cov(g, rowvar=False, ddof=0)
  ghg_pop = g_pop @ h_pop @ g_pop  # GᵀHG
  trhs_pop = np.trace(h_pop @ sigma)  # tr(HΣ)

  draws, k, b = 20000, 4, 4  # B_big = 16 gradient examples + one held-out microbatch of 4
  idx = np.random.default_rng(7).integers(0, len(x), size=(draws, k * b + b))
  grad_mbs = _as_mb(x, t, idx[:, : k * b].reshape(draws, k, b))
  held_out = _as_mb(x, t, idx[:, k * b:])
  same = _as_mb(x, t, idx[:, : k * b])  # curvature from the gradients' own (whole) batch
  params = {"w": jnp.asarray(w, jnp.float32)}
  terms = jax.jit(jax.vmap(
      functools.partial(ns.hessian_noise_terms, _logistic_loss, params, b_small=b)))
  fair, biased = terms(grad_mbs, held_out), terms(grad_mbs, same)

  def mean_se(a):
    a = np.asarray(a, np.float64)
    return a.mean(), a.std(ddof=1) / np.sqrt(len(a))

  # Measured (seeds 5/7), tolerance 4 standard errors of the mean:
  #   held out: GᵀHG 0.03626 vs exact 0.03535 (SE 0.00040, +2.3 SE, +2.6%);
  #             tr(HΣ) 0.2928 vs exact 0.2891 (SE 0.0022, +1.7 SE, +1.3%);
  #             ratio of means 8.07 vs exact B_noise 8.18 examples (−1.3%).
  #   same batch: GᵀHG +50% (+36 SE), tr(HΣ) +36% (+40 SE), ratio of means 7.40 (−9.5%).
  # (Per draw b_noise is undefined, GᵀHG <= 0, in ~15% of draws at B_big = 16.)
  for key, exact in (("ns_ghg", ghg_pop), ("ns_trhs", trhs_pop)):
    m, se = mean_se(fair[key])
    assert 4 * se < 0.1 * abs(exact), "the check must be sharp enough to catch a 10% bias"
    assert abs(m - exact) < 4 * se, (key, m, exact, se)
  for key, exact in (("ns_ghg", ghg_pop), ("ns_trhs", trhs_pop)):
    m, se = mean_se(biased[key])
    assert m - exact > 10 * se and m > 1.2 * exact, (key, m, exact, se)


def test_gauss_newton_equals_hessian_for_logistic_regression():
  x, t, w = _logistic_population()
  rng = np.random.default_rng(8)
  idx, hold = rng.integers(0, len(x), size=(3, 5)), rng.integers(0, len(x), size=5)
  params = {"w": jnp.asarray(w, jnp.float32)}
  args = (params, _as_mb(x, t, idx), _as_mb(x, t, hold), 5)
  hess = jax.jit(functools.partial(ns.hessian_noise_terms, _logistic_loss))(*args)
  gn = ns.GaussNewton(_logistic_logits, _bce_from_logits)
  gauss = jax.jit(functools.partial(ns.hessian_noise_terms, _logistic_loss, curvature=gn))(*args)
  for key in ("ns_q_small", "ns_q_big", "ns_ghg", "ns_trhs"):
    np.testing.assert_allclose(gauss[key], hess[key], rtol=1e-5, err_msg=key)
  with pytest.raises(ValueError, match="GaussNewton"):
    ns.hessian_noise_terms(_logistic_loss, *args, curvature="gauss_newton")


def _mlp_logits(params, mb):
  return jnp.tanh(mb[0] @ params["w1"] + params["b1"]) @ params["w2"]


def _mlp_loss_from_logits(z, mb):
  logp = jax.nn.log_softmax(z)
  return -jnp.mean(jnp.take_along_axis(logp, mb[1][:, None], axis=1))


def test_quadratic_forms_match_dense_matrices_on_mlp():
  # Where Gauss–Newton differs from the Hessian: check both against dense matrices.
  rng = np.random.default_rng(9)
  params = {"w1": rng.normal(size=(3, 5)), "b1": rng.normal(size=5), "w2": rng.normal(size=(5, 4))}
  params = _f32(params)
  mb = (jnp.asarray(rng.normal(size=(6, 3)), jnp.float32), jnp.asarray(rng.integers(0, 4, 6)))
  loss = lambda p, m: _mlp_loss_from_logits(_mlp_logits(p, m), m)
  flat, unravel = ravel_pytree(params)
  v = jnp.asarray(rng.normal(size=flat.shape), jnp.float32)

  @jax.jit
  def dense_and_forms(flat, v):
    hess = jax.hessian(lambda f: loss(unravel(f), mb))(flat)
    jac = jax.jacfwd(lambda f: _mlp_logits(unravel(f), mb))(flat).reshape(-1, flat.size)
    z = _mlp_logits(unravel(flat), mb)
    h_out = jax.hessian(lambda zz: _mlp_loss_from_logits(zz, mb))(z).reshape(z.size, z.size)
    gn = ns.GaussNewton(_mlp_logits, _mlp_loss_from_logits)
    q_h = ns.quadratic_form(loss, unravel(flat), mb)(unravel(v))
    q_gn = ns.quadratic_form(loss, unravel(flat), mb, gn)(unravel(v))
    return hess, jac, h_out, q_h, q_gn

  hess, jac, h_out, q_h, q_gn = (np.asarray(a, np.float64) for a in dense_and_forms(flat, v))
  v64 = np.asarray(v, np.float64)
  np.testing.assert_allclose(q_h, v64 @ hess @ v64, rtol=1e-4)
  np.testing.assert_allclose(q_gn, (jac @ v64) @ h_out @ (jac @ v64), rtol=1e-4)
  assert q_gn >= 0 and abs(q_gn - q_h) > 1e-3 * abs(q_h)  # PSD, and really a different matrix


def test_hessian_noise_terms_rejects_single_microbatch():
  x, t, w = _logistic_population()
  idx = np.zeros((1, 4), int)
  with pytest.raises(ValueError, match="K >= 2"):
    ns.hessian_noise_terms(_logistic_loss, {"w": jnp.asarray(w, jnp.float32)}, _as_mb(x, t, idx),
                           _as_mb(x, t, idx[0]), 4)


def test_hessian_noise_terms_inside_shard_map_use_per_device_gradients():
  # Replicated parameters inside shard_map would give psums of gradients (the transpose of the broadcast);
  # with axis_name the terms equal the float64 reference over all devices' microbatches.
  n_dev = jax.device_count()
  x, t, w = _logistic_population()
  g, h = _logistic_exact(x, t, w)
  k, b = 2, 3
  rng = np.random.default_rng(10)
  idx, hold = rng.integers(0, len(x), size=(n_dev, k, b)), rng.integers(0, len(x), size=(n_dev, b))
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  P = jax.sharding.PartitionSpec

  def per_device(params, grad_mbs, held_out):
    squeeze = lambda tree: jax.tree_util.tree_map(lambda a: a[0], tree)
    return ns.hessian_noise_terms(_logistic_loss, params, squeeze(grad_mbs), squeeze(held_out),
                                  b, axis_name="data")

  sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("data"), P("data")),
                          out_specs=P())
  out = jax.jit(sharded)({"w": jnp.asarray(w, jnp.float32)}, _as_mb(x, t, idx),
                         _as_mb(x, t, hold))
  g_dk = g[idx].mean(2)  # [D, K, d]
  h_d = h[hold].mean(1)  # [D, d, d]: each device's held-out curvature
  g_bar = g_dk.mean((0, 1))
  q_small = np.einsum("dki,dij,dkj->", g_dk, h_d, g_dk) / (n_dev * k)
  q_big = np.einsum("i,dij,j->", g_bar, h_d, g_bar) / n_dev
  np.testing.assert_allclose([out["ns_q_small"], out["ns_q_big"]], [q_small, q_big], rtol=1e-5)
  b_big = n_dev * k * b
  trhs = (q_small - q_big) / (1 / b - 1 / b_big)
  np.testing.assert_allclose(out["ns_trhs"], trhs, rtol=1e-4)
