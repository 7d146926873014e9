"""The data-parallel train step: shard_map over 'data', lax.scan over microbatches, AdamW."""

import dataclasses
import functools
from typing import Any, Callable

import flax
import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
import optax

from bscan import noise_scale

LossFn = Callable[[Any, jax.Array], jax.Array]  # (params, batch int32[m, T+1]) -> mean loss


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training; the noise-scale EMAs live here too."""

  step: jax.Array
  params: Any
  opt_state: Any
  noise: noise_scale.NoiseScaleState


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Static shape of the step: K microbatches of m sequences of T tokens per device."""

  num_microbatches: int
  microbatch: int
  seq_len: int
  num_devices: int
  noise: bool = True
  ema_decay: float = 0.95
  group_of: noise_scale.GroupOf = noise_scale.layer_group  # the model's parameter groups

  @property
  def b_small(self) -> int:
    """Tokens in one microbatch."""
    return self.microbatch * self.seq_len

  @property
  def b_big(self) -> int:
    """Tokens in the global batch."""
    return self.b_small * self.num_microbatches * self.num_devices


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh over all devices; Auto axes so un-annotated inputs are accepted."""
  return Mesh(np.array(devices if devices is not None else jax.devices()), ("data",))


@dataclasses.dataclass(frozen=True)
class LocalGrads:
  """One device's accumulated statistics, before any cross-device reduction."""

  grads: Any  # mean gradient over this device's microbatches
  loss: jax.Array  # mean loss over them
  sq_norms: jax.Array  # float32[K]: |g_k|² of each microbatch's mean gradient
  group_sq: dict[str, jax.Array]  # per layer group, mean over k of |g_k|²


def accumulate(loss_fn: LossFn, params, batch_BxT1: jax.Array, sc: StepConfig,
               axis: str | None = None) -> LocalGrads:
  """Runs the K microbatches through lax.scan, summing gradients and squared norms.

  Inside shard_map pass the mesh `axis`: the scan carry must start device-varying.
  """
  mbs = batch_BxT1.reshape(sc.num_microbatches, sc.microbatch, batch_BxT1.shape[-1])
  grad_fn = jax.value_and_grad(loss_fn)

  def body(carry, mb):
    g_sum, loss_sum, group_sum = carry
    loss, g = grad_fn(params, mb)
    g_sum = jax.tree.map(jnp.add, g_sum, g)
    if sc.noise:
      # Squared norms per group (float32); the total is their sum, so groups cost nothing.
      groups = noise_scale.group_sq_norms(g, sc.group_of)
      group_sum = jax.tree.map(jnp.add, group_sum, groups)
      sq = sum(groups.values())
    else:
      sq = jnp.zeros((), jnp.float32)
    return (g_sum, loss_sum + loss, group_sum), sq

  scalars = (jnp.zeros((), jnp.float32),
             {k: jnp.zeros((), jnp.float32)
              for k in noise_scale.group_sq_norms(params, sc.group_of)}
             if sc.noise else {})
  if axis is not None:  # zeros_like(params) is varying already; the fresh scalars are not.
    scalars = jax.tree.map(lambda x: lax.pcast(x, axis, to="varying"), scalars)
  init = (jax.tree.map(jnp.zeros_like, params), *scalars)
  (g_sum, loss_sum, group_sum), sq_norms = lax.scan(body, init, mbs)
  k = sc.num_microbatches
  return LocalGrads(
      grads=jax.tree.map(lambda g: g / k, g_sum), loss=loss_sum / k, sq_norms=sq_norms,
      group_sq={name: v / k for name, v in group_sum.items()})


def _sharded_grads(loss_fn: LossFn, sc: StepConfig, mesh: Mesh):
  """shard_map'd: each device's LocalGrads, reduced to global means over 'data'."""

  def per_device(params, batch):
    # Without pcast, grads of replicated params come back psum'd over devices (the transpose
    # of shard_map's implicit broadcast), not as this device's own gradient.
    params = lax.pcast(params, "data", to="varying")
    local = accumulate(loss_fn, params, batch, sc, axis="data")
    mean = functools.partial(lax.pmean, axis_name="data")
    return (mean(local.grads), mean(local.loss), mean(jnp.mean(local.sq_norms)),
            mean(local.group_sq))

  return jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("data")),
                       out_specs=(P(), P(), P(), P()))


def per_device_grads(loss_fn: LossFn, sc: StepConfig, mesh: Mesh) -> Callable:
  """For tests and diagnostics: every device's LocalGrads, stacked on a leading axis."""

  def per_device(params, batch):
    params = lax.pcast(params, "data", to="varying")
    local = accumulate(loss_fn, params, batch, sc, axis="data")
    return jax.tree.map(lambda x: x[None], (local.grads, local.loss, local.sq_norms))

  return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("data")),
                               out_specs=P("data")))


def _step_fn(loss_fn: LossFn, sc: StepConfig, mesh: Mesh) -> Callable:
  """The step's body, (state, batch, tx, lr) -> (state, metrics), before jit (and vmap)."""
  grads_fn = _sharded_grads(loss_fn, sc, mesh)

  def step(state: TrainState, batch: jax.Array, tx: optax.GradientTransformation,
           lr: optax.Schedule):
    grads, loss, g_small_sq, group_small = grads_fn(state.params, batch)
    # |G_big|² of the global mean gradient, before clipping (clipping would bias it).
    group_big = noise_scale.group_sq_norms(grads, sc.group_of)
    g_big_sq = sum(group_big.values())
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"train_loss": loss, "grad_norm": jnp.sqrt(g_big_sq), "lr": lr(state.step)}
    noise = state.noise
    if sc.noise:
      group_sq = {g: (group_small[g], group_big[g]) for g in group_big}
      noise, ns_metrics = noise_scale.update(
          noise, g_small_sq, g_big_sq, sc.b_small, sc.b_big, sc.ema_decay, group_sq=group_sq)
      metrics.update(ns_metrics)
    new = TrainState(step=state.step + 1, params=params, opt_state=opt_state, noise=noise)
    return new, metrics

  return step


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, lr: optax.Schedule,
                    sc: StepConfig, mesh: Mesh) -> Callable:
  """Returns jit(step)(state, batch) -> (state, metrics); the state is donated."""
  body = _step_fn(loss_fn, sc, mesh)
  replicated = NamedSharding(mesh, P())
  return jax.jit(lambda state, batch: body(state, batch, tx, lr),
                 in_shardings=(replicated, NamedSharding(mesh, P("data"))),
                 out_shardings=(replicated, replicated), donate_argnums=0)


# (peak learning rate, traced) -> the optimizer and its schedule at that peak.
OptimizerAt = Callable[[jax.Array], tuple[optax.GradientTransformation, optax.Schedule]]


def make_packed_train_step(loss_fn: LossFn, optimizer_at: OptimizerAt, sc: StepConfig,
                           mesh: Mesh) -> Callable:
  """jit(vmap(step))(states, batches, peak_lrs): P runs of one shape as one step.

  Every input has a leading points axis: stacked states (donated), batches int32[P, B, T+1]
  and each run's peak learning rate float32[P]. Each run's optimizer is built at its own
  peak inside the trace, so the math per run is the solo step's.
  """
  body = _step_fn(loss_fn, sc, mesh)

  def one(state, batch, peak):
    tx, lr = optimizer_at(peak)
    return body(state, batch, tx, lr)

  replicated = NamedSharding(mesh, P())
  return jax.jit(jax.vmap(one),
                 in_shardings=(replicated, NamedSharding(mesh, P(None, "data")), replicated),
                 out_shardings=(replicated, replicated), donate_argnums=0)


def init_state(init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation,
               rng: jax.Array, mesh: Mesh, groups: tuple[str, ...]) -> TrainState:
  """Builds the state directly replicated on the mesh (jit with out_shardings)."""

  def init(rng):
    params = init_params(rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      noise=noise_scale.init(groups))

  return jax.jit(init, out_shardings=NamedSharding(mesh, P()))(rng)


def make_eval_fn(loss_fn: LossFn, mesh: Mesh, chunk: int, packed: bool = False) -> Callable:
  """jit(eval)(params, tokens int32[n, T+1] sharded over 'data') -> mean loss.

  Each device evaluates its share `chunk` sequences at a time (a training microbatch), so
  evaluation never needs more memory than training. `packed`: params stacked over runs, one
  shared token set, a loss per run.
  """

  def per_device(params, tokens):
    chunks = tokens.reshape(-1, chunk, tokens.shape[-1])
    return lax.pmean(jnp.mean(lax.map(lambda c: loss_fn(params, c), chunks)), "data")

  fn = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("data")), out_specs=P())
  return jax.jit(jax.vmap(fn, in_axes=(0, None)) if packed else fn)


def make_hessian_fn(loss_fn: LossFn, sc: StepConfig, mesh: Mesh,
                    curvature: noise_scale.Curvature = "hessian",
                    packed: bool = False) -> Callable:
  """jit(fn)(params, batch) -> B_noise terms; each device holds out its last microbatch for H·v.

  H must come from data independent of the gradients it multiplies (same-batch H is biased
  by O(1/B), the size of the term measured), so the gradients use the other K−1
  microbatches: B_small is unchanged, B_big = (K−1)·D·B_small. `packed`: params and
  batches stacked over runs.
  """

  def per_device(params, batch):
    mbs = batch.reshape(sc.num_microbatches, sc.microbatch, batch.shape[-1])
    return noise_scale.hessian_noise_terms(loss_fn, params, mbs[:-1], mbs[-1], sc.b_small,
                                           curvature=curvature, axis_name="data")

  fn = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("data")), out_specs=P())
  data = P(None, "data") if packed else P("data")
  return jax.jit(jax.vmap(fn) if packed else fn,
                 in_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh, data)))
