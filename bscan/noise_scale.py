"""Gradient noise scale estimators (McCandlish et al. 2018, App. A.1): B_simple and B_noise.

B_simple = tr(Σ)/|G|² from the squared norms of the microbatch-mean and global-mean gradients,
with EMAs of numerator and denominator kept in the train state. B_noise = tr(HΣ)/(GᵀHG) from
quadratic forms gᵀHg with H taken on a held-out microbatch (H from the gradients' own batch is
biased by O(1/B), the size of the term being measured).

Batch sizes `b_small`, `b_big` can be in any unit (tokens or sequences); the noise scales come
out in that unit. Everything is float32 whatever the parameter dtype.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import flax
import jax
import jax.numpy as jnp
from jax import lax

PyTree = Any
_F32 = jnp.float32


@flax.struct.dataclass
class NoiseScaleState:
  """EMAs of the per-step |G|² and tr Σ estimates (global and per parameter group)."""

  ema_gsq: jax.Array  # f32 scalar, not bias-corrected
  ema_trace: jax.Array  # f32 scalar, not bias-corrected
  count: jax.Array  # i32 scalar: finite estimates folded in so far
  group_ema_gsq: jax.Array  # f32[n_groups], in `group_names` order
  group_ema_trace: jax.Array  # f32[n_groups]
  group_count: jax.Array  # i32[n_groups]
  # Static so that checkpoints hold only arrays (group names contain '/').
  group_names: tuple[str, ...] = flax.struct.field(pytree_node=False, default=())


def init(groups: Sequence[str] = ()) -> NoiseScaleState:
  """Empty state; `groups` names the parameter groups tracked separately (see `param_groups`)."""
  groups = tuple(groups)
  if len(set(groups)) != len(groups):
    raise ValueError(f"duplicate group names: {groups}")
  n = len(groups)
  return NoiseScaleState(
      ema_gsq=jnp.zeros((), _F32), ema_trace=jnp.zeros((), _F32), count=jnp.zeros((), jnp.int32),
      group_ema_gsq=jnp.zeros((n,), _F32), group_ema_trace=jnp.zeros((n,), _F32),
      group_count=jnp.zeros((n,), jnp.int32), group_names=groups)


def unbiased_estimates(g_small_sq, g_big_sq, b_small, b_big) -> tuple[jax.Array, jax.Array]:
  """(|G|², tr Σ) from E|G_small|² and |G_big|²; NaN where b_small == b_big. Elementwise."""
  g_small_sq, g_big_sq = jnp.asarray(g_small_sq, _F32), jnp.asarray(g_big_sq, _F32)
  b_small, b_big = jnp.asarray(b_small, _F32), jnp.asarray(b_big, _F32)
  diff = b_big - b_small
  defined = diff != 0
  safe = jnp.where(defined, diff, 1.0)  # keeps the untaken branch finite (no inf, no NaN grads)
  gsq = (b_big * g_big_sq - b_small * g_small_sq) / safe
  # 1/(1/b_small - 1/b_big) = b_small*b_big/(b_big - b_small), without the two reciprocals.
  trace = (g_small_sq - g_big_sq) * (b_small * b_big / safe)
  nan = jnp.array(jnp.nan, _F32)
  return jnp.where(defined, gsq, nan), jnp.where(defined, trace, nan)


def _ratio(num: jax.Array, den: jax.Array, defined: jax.Array) -> jax.Array:
  """num/den where `defined` and den > 0, else NaN (a noise scale needs a positive |G|²)."""
  ok = defined & (den > 0)
  return jnp.where(ok, num / jnp.where(ok, den, 1.0), jnp.nan).astype(_F32)


def _ema_step(ema_gsq, ema_trace, count, gsq, trace, decay):
  """One EMA step; non-finite estimates (e.g. b_small == b_big) leave the EMA untouched."""
  finite = jnp.isfinite(gsq) & jnp.isfinite(trace)
  mix = lambda e, x: jnp.where(finite, decay * e + (1.0 - decay) * x, e).astype(_F32)
  return mix(ema_gsq, gsq), mix(ema_trace, trace), count + finite.astype(jnp.int32)


def update(
    state: NoiseScaleState,
    g_small_sq,
    g_big_sq,
    b_small,
    b_big,
    decay: float,
    group_sq: Mapping[str, tuple[jax.Array, jax.Array]] | None = None,
) -> tuple[NoiseScaleState, dict[str, jax.Array]]:
  """Folds one step's norms into the EMAs; returns the new state and this step's metrics.

  `group_sq` maps each group of `state.group_names` to its (E|G_small|², |G_big|²) pair, e.g.
  `{g: (small[g], big[g]) for g in small}` from two `group_sq_norms` results.
  Metrics: raw per-step norms and estimates (|G|² may be negative: logged as is) and B_simple
  from the EMAs (NaN until defined), in the units of b_small/b_big.
  """
  decay = jnp.asarray(decay, _F32)
  gsq, trace = unbiased_estimates(g_small_sq, g_big_sq, b_small, b_big)
  ema_gsq, ema_trace, count = _ema_step(
      state.ema_gsq, state.ema_trace, state.count, gsq, trace, decay)
  new = state.replace(ema_gsq=ema_gsq, ema_trace=ema_trace, count=count)
  metrics = {
      "ns_g_small_sq": jnp.asarray(g_small_sq, _F32),
      "ns_g_big_sq": jnp.asarray(g_big_sq, _F32),
      "ns_gsq": gsq,
      "ns_trace": trace,
  }
  if group_sq is not None:
    if set(group_sq) != set(state.group_names):
      raise ValueError(f"group_sq has groups {sorted(group_sq)}, state has {state.group_names}")
    small = jnp.stack([jnp.asarray(group_sq[g][0], _F32) for g in state.group_names])
    big = jnp.stack([jnp.asarray(group_sq[g][1], _F32) for g in state.group_names])
    g_gsq, g_trace = unbiased_estimates(small, big, b_small, b_big)
    g_ema_gsq, g_ema_trace, g_count = _ema_step(
        state.group_ema_gsq, state.group_ema_trace, state.group_count, g_gsq, g_trace, decay)
    new = new.replace(group_ema_gsq=g_ema_gsq, group_ema_trace=g_ema_trace, group_count=g_count)
  metrics["b_simple"] = b_simple(new)
  if group_sq is not None:
    for g, b in group_b_simple(new).items():
      metrics[f"ns_group/{g}/b_simple"] = b
  return new, metrics


def b_simple(state: NoiseScaleState) -> jax.Array:
  """EMA(tr Σ)/EMA(|G|²); NaN before the first finite step or while EMA(|G|²) <= 0."""
  # One decay for both EMAs: the bias correction cancels in the ratio.
  return _ratio(state.ema_trace, state.ema_gsq, state.count > 0)


def group_b_simple(state: NoiseScaleState) -> dict[str, jax.Array]:
  """Per-group EMA(tr Σ)/EMA(|G|²), NaN where undefined."""
  b = _ratio(state.group_ema_trace, state.group_ema_gsq, state.group_count > 0)
  return {g: b[i] for i, g in enumerate(state.group_names)}


def ema_estimates(state: NoiseScaleState, decay: float) -> tuple[jax.Array, jax.Array]:
  """Bias-corrected (EMA |G|², EMA tr Σ); NaN before the first finite step."""
  count = state.count
  norm = 1.0 - jnp.power(jnp.asarray(decay, _F32), count.astype(_F32))
  ok = count > 0
  safe = jnp.where(ok, norm, 1.0)
  return (jnp.where(ok, state.ema_gsq / safe, jnp.nan).astype(_F32),
          jnp.where(ok, state.ema_trace / safe, jnp.nan).astype(_F32))


# ----------------------------------------------------------------------------------------------
# Squared norms of parameter trees, globally and per layer group.


def tree_sq_norm(tree: PyTree) -> jax.Array:
  """Sum of squared entries of all leaves, accumulated in float32 whatever the leaf dtype."""
  leaves = jax.tree_util.tree_leaves(tree)
  return sum((jnp.sum(jnp.square(jnp.asarray(x).astype(_F32))) for x in leaves),
             jnp.zeros((), _F32))


def tree_vdot(a: PyTree, b: PyTree) -> jax.Array:
  """Σ a·b over matching leaves, in float32."""
  prods = jax.tree_util.tree_map(lambda x, y: jnp.sum(x.astype(_F32) * y.astype(_F32)), a, b)
  return sum(jax.tree_util.tree_leaves(prods), jnp.zeros((), _F32))


def _key_name(k: Any) -> str:
  """One path entry as a string: jax key-path entries (DictKey, GetAttrKey, ...) or str."""
  if isinstance(k, jax.tree_util.DictKey):
    return str(k.key)
  if isinstance(k, jax.tree_util.GetAttrKey):
    return k.name
  if isinstance(k, jax.tree_util.SequenceKey):
    return str(k.idx)
  if isinstance(k, jax.tree_util.FlattenedIndexKey):
    return str(k.key)
  return str(k)


_BLOCK = re.compile(r"block_\d+")
_BLOCK_PARTS = {"ln1": "attn", "attn": "attn", "ln2": "mlp", "mlp": "mlp"}


def layer_group(path: Sequence[Any]) -> str:
  """Parameter path -> group: 'embed', 'block_i/attn', 'block_i/mlp' or 'final_norm'."""
  names = [_key_name(k) for k in path]
  if names and names[0] == "params":  # a full flax variables dict
    names = names[1:]
  if names:
    head = names[0]
    if head == "embed":
      return "embed"
    if head == "ln_f":
      return "final_norm"
    if _BLOCK.fullmatch(head) and len(names) > 1 and names[1] in _BLOCK_PARTS:
      return f"{head}/{_BLOCK_PARTS[names[1]]}"
  raise ValueError(f"parameter path {'/'.join(names)!r} belongs to no layer group")


def _group_order(group: str) -> tuple[int, int, str]:
  """Sort key in model order: embed, block_0/attn, block_0/mlp, block_1/..., final_norm."""
  if group == "embed":
    return (0, 0, group)
  if group == "final_norm":
    return (2, 0, group)
  m = re.fullmatch(r"block_(\d+)/(.*)", group)
  return (1, int(m.group(1)), m.group(2)) if m else (3, 0, group)


GroupOf = Callable[[Sequence[Any]], str]  # parameter path -> its group's name


def group_sq_norms(tree: PyTree, group_of: GroupOf = layer_group) -> dict[str, jax.Array]:
  """Sum of squared entries per parameter group (float32), in model order.

  `group_of` is the model's own grouping (the transformer's layers by default): a model
  plugged into the trainer supplies its groups with its loss.
  """
  sums: dict[str, jax.Array] = {}
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    g = group_of(path)
    sq = jnp.sum(jnp.square(jnp.asarray(x).astype(_F32)))
    sums[g] = sums[g] + sq if g in sums else sq
  return {g: sums[g] for g in sorted(sums, key=_group_order)}


def param_groups(tree: PyTree, group_of: GroupOf = layer_group) -> tuple[str, ...]:
  """Group names of a parameter tree in model order (the `groups` argument of `init`)."""
  paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
  return tuple(sorted({group_of(p) for p in paths}, key=_group_order))


# ----------------------------------------------------------------------------------------------
# Hessian-weighted noise scale B_noise = tr(HΣ)/(GᵀHG) (McCandlish eq. 2.8).


def _varying_axes(x: jax.Array) -> frozenset[str]:
  """The shard_map axes over which `x` is device-varying (empty outside shard_map)."""
  mat = getattr(jax.typeof(x), "manual_axis_type", None)
  return frozenset(mat.varying) if mat is not None else frozenset()


def _cast_varying(x: jax.Array, axes: frozenset[str]) -> jax.Array:
  """`x` made device-varying over `axes` too (pcast of an already varying axis is an error)."""
  missing = tuple(sorted(axes - _varying_axes(x)))
  return lax.pcast(x, missing, to="varying") if missing else x


def _as_varying(tree: PyTree, axis_name: str) -> PyTree:
  """Marks all leaves device-varying over `axis_name` (inside shard_map).

  Differentiating w.r.t. replicated (unvarying) parameters inside shard_map returns the psum of
  the per-device gradients; per-device gradients need varying parameters.
  """
  return jax.tree_util.tree_map(lambda x: _cast_varying(x, frozenset([axis_name])), tree)


def _like_primal(v: PyTree, primal: PyTree) -> PyTree:
  """Tangents made varying wherever their primals are (a linearized function requires it)."""
  return jax.tree_util.tree_map(lambda t, p: _cast_varying(t, _varying_axes(p)), v, primal)


@dataclasses.dataclass(frozen=True)
class GaussNewton:
  """Gauss–Newton curvature JᵀH_outJ of loss = loss_from_logits(logits_fn(params, mb), mb)."""

  logits_fn: Callable[[PyTree, PyTree], jax.Array]
  loss_from_logits: Callable[[jax.Array, PyTree], jax.Array]


Curvature = Literal["hessian"] | GaussNewton


def quadratic_form(
    loss_fn: Callable[[PyTree, PyTree], jax.Array],
    params: PyTree,
    microbatch: PyTree,
    curvature: Curvature = "hessian",
) -> Callable[[PyTree], jax.Array]:
  """v -> vᵀ C v (float32), C = Hessian or Gauss–Newton matrix of the loss on `microbatch`."""
  if isinstance(curvature, GaussNewton):
    # gᵀ(JᵀH_out J)g = (Jg)ᵀ H_out (Jg): one jvp of the logits, then an output-space hvp.
    logits, jvp_logits = jax.linearize(lambda p: curvature.logits_fn(p, microbatch), params)
    out_grad = jax.grad(lambda z: curvature.loss_from_logits(z, microbatch))
    _, hvp_out = jax.linearize(out_grad, logits)

    def gn_form(v: PyTree) -> jax.Array:
      jv = jvp_logits(_like_primal(v, params))
      return tree_vdot(jv, hvp_out(jv))

    return gn_form
  if curvature != "hessian":
    raise ValueError(f"curvature must be 'hessian' or a GaussNewton(logits_fn, loss_from_logits), "
                     f"got {curvature!r}")
  # Forward-over-reverse: linearize the gradient once, reuse it for every vector.
  _, hvp = jax.linearize(jax.grad(lambda p: loss_fn(p, microbatch)), params)

  def hessian_form(v: PyTree) -> jax.Array:
    v = _like_primal(v, params)
    return tree_vdot(v, hvp(v))

  return hessian_form


def hessian_noise_terms(
    loss_fn: Callable[[PyTree, PyTree], jax.Array],
    params: PyTree,
    grad_microbatches: PyTree,
    hvp_microbatch: PyTree,
    b_small,
    curvature: Curvature = "hessian",
    axis_name: str | None = None,
) -> dict[str, jax.Array]:
  """One step's B_noise terms from K >= 2 gradient microbatches and one held-out microbatch.

  q_small = mean_k g_kᵀCg_k, q_big = ḡᵀCḡ with C from `hvp_microbatch` (independent of the g_k,
  else E[gᵀCg] = GᵀCG + tr(CΣ)/B is biased). B_big = K·b_small. b_noise is NaN and
  ns_b_noise_undefined is 1 where GᵀCG <= 0; nothing is clipped.
  Inside shard_map pass `axis_name`: each device then holds K microbatches and its own held-out
  one, ḡ is the global mean, q_small and q_big are averaged over devices and B_big = K·D·b_small.
  """
  k = jax.tree_util.tree_leaves(grad_microbatches)[0].shape[0]
  n_dev = 1 if axis_name is None else lax.psum(1, axis_name)  # a Python int
  if k * n_dev < 2:
    raise ValueError(f"need K >= 2 gradient microbatches in all, got {k} x {n_dev} devices")
  if axis_name is not None:
    params = _as_varying(params, axis_name)
  quad = quadratic_form(loss_fn, params, hvp_microbatch, curvature)
  grad_fn = jax.grad(loss_fn)
  zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, _F32), params)
  init_carry = (zeros, jnp.zeros((), _F32))
  if axis_name is not None:  # the scan carry must be varying like the per-device gradients
    init_carry = _as_varying(init_carry, axis_name)

  def body(carry, mb):
    g_sum, q_sum = carry
    g = grad_fn(params, mb)
    g_sum = jax.tree_util.tree_map(lambda s, x: s + x.astype(_F32), g_sum, g)
    return (g_sum, q_sum + quad(g)), None

  (g_sum, q_sum), _ = lax.scan(body, init_carry, grad_microbatches)
  g_mean = jax.tree_util.tree_map(lambda s: s / k, g_sum)
  q_small = q_sum / k
  if axis_name is not None:
    g_mean = lax.pmean(g_mean, axis_name)
  g_mean = jax.tree_util.tree_map(lambda s, p: s.astype(p.dtype), g_mean, params)
  q_big = quad(g_mean)
  if axis_name is not None:
    q_small, q_big = lax.pmean((q_small, q_big), axis_name)
  b_small = jnp.asarray(b_small, _F32)
  ghg, trhs = unbiased_estimates(q_small, q_big, b_small, k * n_dev * b_small)
  undefined = ~(ghg > 0)  # also true for NaN
  return {
      "ns_q_small": q_small,
      "ns_q_big": q_big,
      "ns_ghg": ghg,
      "ns_trhs": trhs,
      "b_noise": _ratio(trhs, ghg, jnp.isfinite(trhs)),
      "ns_b_noise_undefined": undefined.astype(_F32),
  }
