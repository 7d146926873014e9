"""The learning-rate scaling rules: √k for Adam-family, k for SGD, misfits refused."""

import jax.numpy as jnp
import optax
import pytest

from bscan import config as config_lib
from bscan import lr_scaling
from bscan import optim
from bscan.errors import ConfigError
from experiments.configs import base


@pytest.mark.parametrize("optimizer, rule, ratio, expected", [
    ("adamw", "auto", 4.0, 2.0), ("sgd", "auto", 4.0, 4.0), ("adamw", "sqrt", 0.25, 0.5),
    ("sgd", "linear", 8.0, 8.0), ("adamw", "none", 8.0, 1.0), ("sgd", "none", 8.0, 1.0)])
def test_rule_scales_the_rate(optimizer, rule, ratio, expected):
  resolved = lr_scaling.resolve(optimizer, rule)
  assert lr_scaling.scaled(1.0, ratio, resolved) == pytest.approx(expected)


@pytest.mark.parametrize("optimizer, rule", [("adamw", "linear"), ("sgd", "sqrt")])
def test_a_rule_that_does_not_fit_is_an_error_unless_declared(optimizer, rule):
  with pytest.raises(ConfigError, match=f"does not fit optim.name='{optimizer}'.*declare_scaling"):
    lr_scaling.resolve(optimizer, rule)
  assert lr_scaling.resolve(optimizer, rule, declared=True) == rule


def test_unknown_optimizer_or_rule_names_the_field():
  with pytest.raises(ConfigError, match="optim.name='lion' is unknown"):
    lr_scaling.resolve("lion", "auto")
  with pytest.raises(ConfigError, match="optim.batch_scaling='cube' is unknown"):
    lr_scaling.resolve("adamw", "cube")


def test_config_validation_refuses_a_misfit_before_anything_is_built():
  c = base.get_base_config()
  c.budget.train_steps = 10
  c.optim.batch_scaling, c.optim.reference_batch = "linear", 16
  with pytest.raises(ConfigError, match="does not fit"):
    config_lib.validate(c, num_devices=1)


def test_sgd_step_is_plain_sgd():
  c = base.get_base_config()
  c.optim.name, c.optim.clip_norm = "sgd", 0.0
  tx = optim.optimizer(c, optax.constant_schedule(0.1))
  params = {"w": jnp.ones(())}
  updates, _ = tx.update({"w": jnp.full((), 2.0)}, tx.init(params), params)
  assert float(updates["w"]) == pytest.approx(-0.2)
