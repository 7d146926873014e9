"""Learning rate against batch size: one rule per optimizer family, checked in one place.

When the batch grows by a factor k the step size that keeps training equivalent differs by
optimizer: linear in k for SGD (Goyal et al. 2017; the SDE view of Li et al. 2021), √k for
Adam-family optimizers (Malladi et al. 2022). Applying the other rule silently changes the
experiment, so a rule that does not fit the optimizer is an error unless declared on purpose.
The branched critical batch size and the batch-size ramp both scale through here.
"""

from bscan.errors import ConfigError

OPTIMIZERS = ("adamw", "sgd")
RULES = {"none": 0.0, "sqrt": 0.5, "linear": 1.0}  # rule -> exponent of the batch ratio
FITTING_RULE = {"adamw": "sqrt", "sgd": "linear"}


def resolve(optimizer: str, rule: str, declared: bool = False) -> str:
  """The rule to apply: 'auto' is the optimizer's own; a misfit is an error unless declared."""
  if optimizer not in OPTIMIZERS:
    raise ConfigError(f"optim.name={optimizer!r} is unknown; choose one of {OPTIMIZERS}")
  if rule == "auto":
    return FITTING_RULE[optimizer]
  if rule not in RULES:
    raise ConfigError(f"optim.batch_scaling={rule!r} is unknown; choose one of "
                      f"{('auto',) + tuple(RULES)}")
  fits = FITTING_RULE[optimizer]
  if rule not in ("none", fits) and not declared:
    raise ConfigError(
        f"optim.batch_scaling={rule!r} does not fit optim.name={optimizer!r} (its rule is "
        f"{fits!r}); use 'auto' or {fits!r}, or set optim.declare_scaling=True to scale "
        "this way on purpose")
  return rule


def scaled(lr: float, ratio: float, rule: str) -> float:
  """The learning rate at `ratio` times the reference batch under a resolved rule."""
  if ratio <= 0:
    raise ConfigError(f"batch ratio {ratio} must be positive")
  return lr * ratio ** RULES[rule]
