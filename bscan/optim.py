"""AdamW or SGD with warmup then constant (scan default), cosine or linear decay; clipping."""

import jax
import ml_collections
import optax

from bscan import config as config_lib


def schedule(cfg: ml_collections.ConfigDict, peak_lr: float) -> optax.Schedule:
  """Learning rate per step: linear warmup, then constant or a decay to the step cap."""
  warmup = config_lib.warmup_steps(cfg)
  total = config_lib.max_steps(cfg)
  if cfg.optim.schedule == "constant":
    # A constant rate keeps steps-to-target independent of the run's planned length.
    after = optax.constant_schedule(peak_lr)
  elif cfg.optim.schedule == "cosine":
    after = optax.cosine_decay_schedule(peak_lr, max(total - warmup, 1),
                                        alpha=cfg.optim.final_lr_fraction)
  else:
    after = optax.linear_schedule(peak_lr, peak_lr * cfg.optim.final_lr_fraction,
                                  max(total - warmup, 1))
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak_lr, warmup), after], [warmup])


def _decay_mask(params):
  """Weight decay on matrices (embedding tables included), not on biases or norm scales."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def optimizer(cfg: ml_collections.ConfigDict, lr: optax.Schedule) -> optax.GradientTransformation:
  """Clip by global norm (if set), then AdamW or SGD (decoupled weight decay for SGD too)."""
  o = cfg.optim
  if o.name == "sgd":
    parts = [optax.add_decayed_weights(o.weight_decay, _decay_mask)] if o.weight_decay else []
    base = optax.chain(*parts, optax.sgd(lr, momentum=o.momentum or None))
  else:
    base = optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                       mask=_decay_mask)
  return optax.chain(optax.clip_by_global_norm(o.clip_norm), base) if o.clip_norm else base
