"""The noisy quadratic model as a task: a ground truth whose critical batch size is exact.

Per-example loss ½θᵀHθ + ξᵢᵀθ in H's eigenbasis, with ξᵢ ~ N(0, Σ) drawn from the two int32
numbers of the example's row (stream, index), so a batch is an ordinary int32 array that the
data-parallel step splits into microbatches like tokens, and the per-example gradients
Hθ + ξᵢ have covariance Σ exactly. One example is one "token". The spectrum, Σ and θ₀ come
from bscan.nqm_theory, which gives B_simple, B_noise and the expected SGD loss curve of every
(batch, step size) in closed form. Rows with a negative stream carry no noise: the held-out
"set" is the exact loss ½θᵀHθ.

The parameters are two groups, the stiffer and the flatter half of the spectrum, so the
per-group noise scale has a known answer too.
"""

from __future__ import annotations

import functools
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bscan import data as data_lib
from bscan import nqm_theory
from bscan import tasks
from bscan.errors import ConfigError

GROUPS = ("stiff", "flat")  # the halves of the spectrum, largest curvatures first
ROW = 2  # int32 numbers per example: (stream, index)


def problem(cfg: ml_collections.ConfigDict) -> nqm_theory.Problem:
  """The run's quadratic: spectrum, noise and θ₀ (fixed by cfg.nqm, not by the run seed)."""
  n = cfg.nqm
  return nqm_theory.make_problem(n.dim, n.condition, n.noise, n.problem_seed)


def split(theta: Any) -> dict[str, Any]:
  """A vector over the spectrum as the parameter tree (its two groups)."""
  half = len(theta) // 2
  return {GROUPS[0]: theta[:half], GROUPS[1]: theta[half:]}


def example_noise(rows: jax.Array, sigma: jax.Array) -> jax.Array:
  """ξ for each row (stream, index): N(0, diag σ²), zero where the stream is negative."""

  def one(row):
    key = jax.random.fold_in(jax.random.key(jnp.maximum(row[0], 0)), row[1])
    return jnp.where(row[0] >= 0, 1.0, 0.0) * sigma * jax.random.normal(key, sigma.shape)

  return jax.vmap(one)(rows)


def loss_fn(params: Any, rows: jax.Array, h: jax.Array, sigma: jax.Array) -> jax.Array:
  """Mean over the rows of ½θᵀHθ + ξᵢᵀθ."""
  theta = jnp.concatenate([params[g] for g in GROUPS])
  xi = jax.lax.stop_gradient(example_noise(rows, sigma))
  return 0.5 * jnp.sum(h * theta**2) + jnp.mean(xi @ theta)


def _group_of(path) -> str:
  name = str(getattr(path[0], "key", path[0]))
  if name not in GROUPS:
    raise ValueError(f"parameter {name!r} is not one of the quadratic's groups {GROUPS}")
  return name


class _Examples:
  """Rows (stream, index) of every global batch, this process's block of them; resumable.

  Example i of the run is row (stream, i mod 2³¹). The global batch is read as the same
  gcd(batch_size, data.shards) shards as text, so any process count that divides it reads
  the same batches and resumes from the same state.
  """

  def __init__(self, cfg: ml_collections.ConfigDict, process_index: int, process_count: int):
    self._stream = data_lib.derived_seed(cfg.seed, 2) % (2**31 - 1)
    self._batch = cfg.batch_size
    self._shards = data_lib.process_shards(cfg, process_index, process_count)
    self._per_shard = cfg.batch_size // data_lib.num_shards(cfg)
    self._step = 0

  def __iter__(self) -> Iterator[np.ndarray]:
    return self

  def __next__(self) -> np.ndarray:
    first = self._step * self._batch + self._shards[0] * self._per_shard
    index = (first + np.arange(len(self._shards) * self._per_shard)) % 2**31
    self._step += 1
    return np.stack([np.full_like(index, self._stream), index], axis=1).astype(np.int32)

  def get_state(self) -> dict:
    return {data_lib.SHARDS_KEY: {str(s): {"step": self._step} for s in self._shards}}

  def set_state(self, state: dict) -> None:
    self._step = int(state[data_lib.SHARDS_KEY][str(self._shards[0])]["step"])


@tasks.register("nqm")
class NoisyQuadratic(tasks.Task):
  """The noisy quadratic model: `cfg.nqm` holds dim, condition, noise and problem_seed."""

  def validate(self) -> None:
    n = self.cfg.get("nqm")
    if n is None:
      raise ConfigError("task='nqm' needs the nqm fields (dim, condition, noise, problem_seed); "
                        "start the config from experiments/configs/nqm.py")
    if n.dim < 2 or n.dim % 2:
      raise ConfigError(f"nqm.dim={n.dim} must be an even number ≥ 2 (two parameter groups)")
    if n.condition < 1 or n.noise <= 0:
      raise ConfigError(f"nqm.condition={n.condition} must be ≥ 1 and nqm.noise={n.noise} "
                        "positive")
    if self.cfg.seq_len != 1:
      raise ConfigError(f"seq_len={self.cfg.seq_len}: the quadratic's examples are one token "
                        "each; set seq_len=1")

  def shape(self) -> tasks.Shape:
    n = self.cfg.nqm
    return tasks.Shape(n_params=n.dim, n_params_embedding=0, n_layer=0, d_model=n.dim,
                       vocab_size=0, dataset=f"nqm(dim={n.dim},condition={n.condition:g},"
                       f"noise={n.noise:g},problem_seed={n.problem_seed})", tokenizer="none")

  def model(self, shape: tasks.Shape) -> tasks.Model:
    del shape
    p = problem(self.cfg)
    h, sigma = jnp.asarray(p.h, jnp.float32), jnp.asarray(np.sqrt(p.sigma2), jnp.float32)
    theta0 = jnp.asarray(p.theta0, jnp.float32)
    return tasks.Model(init_params=lambda rng: split(theta0),
                       loss_fn=functools.partial(loss_fn, h=h, sigma=sigma),
                       group_of=_group_of, curvature="hessian")

  def train_iterator(self, process_index: int, process_count: int) -> _Examples:
    return _Examples(self.cfg, process_index, process_count)

  def eval_batches(self) -> np.ndarray:
    n = self.cfg.data.eval_sequences
    return np.stack([np.full(n, -1), np.arange(n)], axis=1).astype(np.int32)
