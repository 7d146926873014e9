"""The noisy quadratic model task against its closed form (bscan.nqm_theory)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bscan import nqm
from bscan import nqm_theory
from bscan import tasks
from bscan import train_step as step_lib
from bscan.errors import ConfigError
from experiments.configs import nqm as nqm_config


def _cfg(arg: str = "batch=32"):
  return nqm_config.get_config(arg)


def _model(cfg):
  task = tasks.get(cfg)
  return task, task.model(task.shape())


def test_per_example_gradients_have_mean_h_theta_and_covariance_sigma():
  cfg = _cfg()
  task, model = _model(cfg)
  p = nqm.problem(cfg)
  params = model.init_params(jax.random.key(0))
  rows = next(task.train_iterator(0, 1))
  rows = np.stack([np.full(4000, rows[0, 0]), np.arange(4000)], axis=1).astype(np.int32)
  grads = jax.vmap(lambda r: jax.grad(model.loss_fn)(params, r[None]))(jnp.asarray(rows))
  g = np.concatenate([np.asarray(grads[k], np.float64) for k in nqm.GROUPS], axis=1)
  se = np.sqrt(p.sigma2 / len(g))
  assert np.all(np.abs(g.mean(0) - p.h * p.theta0) < 5 * se + 1e-5)
  np.testing.assert_allclose(g.var(0), p.sigma2, rtol=0.15)  # 4000 draws: s.e. ≈ 2.2%
  # The held-out rows carry no noise: the eval loss is the exact ½θᵀHθ.
  exact = model.loss_fn(params, jnp.asarray(task.eval_batches()))
  assert float(exact) == pytest.approx(nqm_theory.loss(p, p.theta0), rel=1e-5)


def test_in_step_b_simple_and_b_noise_match_the_closed_form_at_frozen_params():
  cfg = _cfg("batch=72")
  task, model = _model(cfg)
  p = nqm.problem(cfg)
  theta = 0.15 * p.theta0  # part-way down: B_simple near the batch, where it matters
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), nqm.split(theta))
  mesh = step_lib.make_mesh(jax.devices()[:1])
  sc = step_lib.StepConfig(num_microbatches=9, microbatch=8, seq_len=1, num_devices=1,
                           group_of=model.group_of)
  frozen = optax.sgd(0.0)
  step = step_lib.make_train_step(model.loss_fn, frozen, optax.constant_schedule(0.0), sc, mesh)
  hessian = step_lib.make_hessian_fn(model.loss_fn, sc, mesh, model.curvature)
  state = step_lib.init_state(lambda rng: params, frozen, jax.random.key(0), mesh,
                              tuple(nqm.GROUPS))
  it = task.train_iterator(0, 1)
  sums = np.zeros(4)
  n = 400
  for _ in range(n):
    batch = next(it)
    h_terms = hessian(state.params, batch)
    state, m = step(state, batch)
    sums += [m["ns_gsq"], m["ns_trace"], h_terms["ns_ghg"], h_terms["ns_trhs"]]
  gsq, trace, ghg, trhs = sums / n
  assert trace / gsq == pytest.approx(nqm_theory.b_simple(p, theta), rel=0.05)
  assert trhs / ghg == pytest.approx(nqm_theory.b_noise(p, theta), rel=0.05)
  # Each group's B_simple is its own half of the spectrum's.
  half = p.dim // 2
  stiff = nqm_theory.Problem(p.h[:half], p.sigma2[:half], theta[:half])
  assert float(state.noise.group_ema_trace[0] / state.noise.group_ema_gsq[0]) == pytest.approx(
      nqm_theory.b_simple(stiff, stiff.theta0), rel=0.25)  # an EMA: last ~20 steps only


def test_rows_resume_exactly_and_split_over_processes():
  cfg = _cfg("batch=32")
  task = tasks.get(cfg)
  it = task.train_iterator(0, 1)
  next(it)
  state = it.get_state()
  expected = next(it)
  again = task.train_iterator(0, 1)
  again.set_state(state)
  np.testing.assert_array_equal(next(again), expected)
  halves = [task.train_iterator(i, 2) for i in range(2)]
  for h in halves:
    h.set_state(state)
  np.testing.assert_array_equal(np.concatenate([next(h) for h in halves]), expected)
  assert len(np.unique(expected[:, 1])) == 32  # every example its own noise
  other = tasks.get(_cfg("batch=32,seed=1")).train_iterator(0, 1)
  assert next(other)[0, 0] != expected[0, 0]  # another seed, another noise stream


@pytest.mark.parametrize("field, value, message", [
    ("nqm.dim", 3, "nqm.dim=3 must be an even number"),
    ("nqm.condition", 0.5, "nqm.condition=0.5 must be ≥ 1"),
    ("seq_len", 4, "seq_len=4: the quadratic's examples are one token each"),
])
def test_bad_nqm_fields_name_the_field(field, value, message):
  cfg = _cfg()
  *parents, leaf = field.split(".")
  node = cfg
  for part in parents:
    node = node[part]
  node[leaf] = value
  with pytest.raises(ConfigError, match=message):
    tasks.get(cfg).validate()


def test_a_trained_run_follows_the_expected_sgd_curve(tmp_path):
  """The trainer on the quadratic: the exact loss of its iterates tracks E[L(θ_t)]."""
  from bscan import train  # pylint: disable=g-import-not-at-top
  from bscan import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  cfg = _cfg("batch=16,lr=0.5")
  cfg.budget.target_loss, cfg.budget.max_tokens, cfg.budget.train_steps = 0.0, 0, 300
  cfg.eval.per_decade, cfg.eval.every_steps = 0, 10
  cfg.noise.hessian_every, cfg.microbatch_size = 0, 1  # 8 test devices: K = 2 each
  assert train.run(cfg, tmp_path) == "done"
  rows, _ = workdir_lib.read_metrics(tmp_path)
  evals = {r["step"]: r["eval_loss"] for r in rows if r.get("eval_loss") is not None}
  expected = nqm_theory.expected_loss_curve(nqm.problem(cfg), 16, 0.5, 301)
  steps = np.array(sorted(evals))
  # The eval row of step t is L(θ_t), after t updates: entry t of the expected curve.
  ratio = np.array([evals[s] for s in steps]) / expected[steps]
  assert np.all(np.abs(np.log(ratio)) < 0.25), dict(zip(steps.tolist(), ratio.round(3)))
  assert abs(np.mean(np.log(ratio[5:]))) < 0.06  # one noise realisation: within a few %
