"""Config: arg parsing, validation messages, budgets in tokens → steps, learning-rate rules."""

import math

import pytest

from bscan import config as config_lib
from experiments.configs import base


def _cfg(**overrides):
  c = base.get_base_config()
  c.budget.train_tokens = 1_000_000
  for dotted, value in overrides.items():
    *parents, leaf = dotted.split("__")
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def test_parse_arg_types():
  assert config_lib.parse_arg("size=3m,batch=64,lr=1e-3,flag=true") == {
      "size": "3m", "batch": 64, "lr": 1e-3, "flag": True}
  assert config_lib.parse_arg("") == {}
  with pytest.raises(config_lib.ConfigError, match="key=value"):
    config_lib.parse_arg("batch64")


def test_apply_args_and_unknown_keys():
  c = base.apply_args(base.get_base_config(), {"size": "3m", "batch": 64, "lr": 0.002})
  assert (c.model.size, c.batch_size, c.optim.lr) == ("3m", 64, 0.002)
  with pytest.raises(config_lib.ConfigError, match="unknown arg key.*'bach'"):
    config_lib.check_arg_keys({"bach": 1}, base.COMMON_ARGS, "demo.py")


@pytest.mark.parametrize("overrides, message", [
    ({"batch_size": 12}, r"batch_size=12 is not divisible by the 8 devices"),
    ({"batch_size": 16, "microbatch_size": 3}, r"devices × microbatch_size = 8 × 3"),
    ({"model__size": "4m"}, r"model.size='4m' is unknown"),
    ({"optim__lr": -1.0}, r"optim.lr=-1.0 must be positive"),
    ({"seq_len": 2048}, r"longer than the model's context model.max_len=1024"),
    ({"budget__train_tokens": 0}, r"no budget"),
    ({"budget__train_tokens": -5}, r"must be ≥ 0"),
    ({"budget__target_loss": 2.0}, r"needs a cap"),
    ({"optim__schedule": "exp"}, r"optim.schedule='exp' is unknown"),
    ({"log_every_steps": 0}, r"log_every_steps=0 must be ≥ 1"),
    ({"checkpoint__every_steps": 0}, r"checkpoint.every_steps=0 must be ≥ 1"),
    ({"data__eval_sequences": 12}, r"eval_sequences=12 must be a multiple of the 8 devices"),
    ({"noise__enabled": False, "noise__hessian_every": 10}, r"needs noise.enabled=True"),
    ({"budget__target_loss": 2.0, "budget__max_tokens": 10**6, "optim__schedule": "cosine"},
     r"steps-to-target would depend on the planned run length"),
    ({"budget__overshoot": -1.0}, r"budget.overshoot=-1.0 must be ≥ 0"),
])
def test_validate_names_field_and_fix(overrides, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(_cfg(**overrides), num_devices=8)


def test_budget_tokens_to_steps_in_one_place():
  c = _cfg(batch_size=32, seq_len=128)
  assert config_lib.max_steps(c) == math.ceil(1_000_000 / (32 * 128))
  c = _cfg(budget__target_loss=1.5, budget__max_tokens=409_600, batch_size=32, seq_len=128)
  assert config_lib.max_steps(c) == 100  # the cap
  c.optim.warmup_tokens = 40_960
  assert config_lib.warmup_steps(c) == 10


def test_kaplan_lr_rule_and_batch_scaling():
  # Kaplan eq. D.1 at N = 1e8: 0.003239 − 0.0001395·ln(1e8) ≈ 6.6932e-4.
  assert config_lib.kaplan_lr(10**8) == pytest.approx(6.6932e-4, rel=1e-4)
  c = _cfg(optim__lr_rule="kaplan", optim__batch_scaling="sqrt", optim__reference_batch=16,
           batch_size=64)
  assert config_lib.peak_learning_rate(c, 10**8) == pytest.approx(2 * 6.6932e-4, rel=1e-4)
  c = _cfg(optim__name="sgd", optim__batch_scaling="linear", optim__reference_batch=16,
           batch_size=8)
  assert config_lib.peak_learning_rate(c, 10**8) == pytest.approx(0.5e-3)
  c = _cfg(optim__batch_scaling="auto", optim__reference_batch=16, batch_size=64)
  assert config_lib.peak_learning_rate(c, 10**8) == pytest.approx(2e-3)  # √4 for adamw


def test_layout_auto_microbatches():
  lay = config_lib.layout(_cfg(batch_size=64, max_microbatch_size=4), num_devices=8)
  assert (lay.per_device, lay.microbatch, lay.num_microbatches) == (8, 4, 2)
  # One device: at least two microbatches so the noise scale exists.
  lay = config_lib.layout(_cfg(batch_size=8, max_microbatch_size=16), num_devices=1)
  assert (lay.microbatch, lay.num_microbatches) == (4, 2)


def test_non_integral_batch_is_refused():
  with pytest.raises(config_lib.ConfigError, match="batch=64.5 must be an integer"):
    base.apply_args(base.get_base_config(), {"batch": 64.5})


def test_kaplan_config_data_choices():
  from experiments.configs import kaplan  # pylint: disable=g-import-not-at-top
  c4 = kaplan.get_config("size=85m,batch=64")
  assert (c4.data.tfds_name, c4.tokenizer.name, c4.budget.target_loss) == ("c4/en", "tiktoken", 3.6)
  own = kaplan.get_config("size=3m,data=pystdlib")
  assert (own.data.name, own.tokenizer.name, own.budget.target_loss) == ("pystdlib", "bytes", 1.6)
  with pytest.raises(config_lib.ConfigError, match="data='lm1b'"):
    kaplan.get_config("data=lm1b")
  with pytest.raises(config_lib.ConfigError, match="unknown arg key.*'lr'"):
    kaplan.get_config("lr=1e-3")  # the rate comes from eq. D.1; lr_scale scales it


def test_hessian_needs_a_held_out_and_two_gradient_microbatches():
  c = _cfg(batch_size=16, microbatch_size=8, noise__hessian_every=2)  # K = 2 on one device
  with pytest.raises(config_lib.ConfigError, match="held-out microbatch per device"):
    config_lib.validate(c, num_devices=1)
  c.microbatch_size = 4  # K = 4: one held out, three for gradients
  config_lib.validate(c, num_devices=1)
  c.batch_size, c.microbatch_size = 16, 1  # 8 devices × K = 2: 8 gradient microbatches
  config_lib.validate(c, num_devices=8)
