"""Times the real train step with the B_simple norms on and off, interleaved on one host."""

import dataclasses
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import optax

from bscan import model as model_lib
from bscan import noise_scale
from bscan import optim
from bscan import train_step as step_lib


@dataclasses.dataclass(frozen=True)
class BenchConfig:
  """One benchmark: a ladder size, a global batch split into microbatches, and the timing plan."""

  size: str = "3m"
  seq_len: int = 128
  batch: int = 16  # global batch in sequences
  microbatch: int = 4  # sequences per microbatch; K = batch / (devices · microbatch)
  vocab_size: int = 4096
  num_devices: int = 1
  rounds: int = 16
  steps_per_round: int = 3
  hessian_calls: int = 3  # 0 = skip the B_noise (Hessian) cadence timing
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class BenchResult:
  """Per-round mean step times (seconds) of each variant, in round order, plus the config."""

  cfg: BenchConfig
  num_microbatches: int
  step_on: np.ndarray  # float64[rounds]
  step_off: np.ndarray  # float64[rounds]
  hessian: np.ndarray  # float64[hessian_calls] seconds per call
  jax_version: str
  device: str


def _optimizer() -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The runs' optimizer (clip 1.0, AdamW β=(0.9, 0.95)) at a constant learning rate."""
  lr = optax.constant_schedule(1e-3)
  cfg = ml_collections.ConfigDict({"optim": dict(
      b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, clip_norm=1.0)})
  return optim.optimizer(cfg, lr), lr


def _timed(fn: Callable[[], Any], n: int) -> float:
  """Seconds per call of `fn` over n calls, waiting for the last result."""
  start = time.perf_counter()
  out = None
  for _ in range(n):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / n


def run(cfg: BenchConfig) -> BenchResult:
  """Compiles both variants (untimed), then alternates them round by round (ABBA order)."""
  devices = jax.devices()[:cfg.num_devices]
  d = len(devices)
  if cfg.batch % (d * cfg.microbatch):
    raise ValueError(f"batch {cfg.batch} is not a multiple of devices·microbatch "
                     f"{d}·{cfg.microbatch}")
  k = cfg.batch // (d * cfg.microbatch)
  mesh = step_lib.make_mesh(devices)
  n_layer, d_model, n_heads = model_lib.SIZES[cfg.size]
  model = model_lib.Transformer(model_lib.ModelConfig(
      n_layer=n_layer, d_model=d_model, n_heads=n_heads, vocab_size=cfg.vocab_size,
      max_len=cfg.seq_len))
  loss_fn = lambda params, batch: model_lib.loss_fn(model, params, batch)
  init_params = lambda rng: model.init(rng, jnp.zeros((1, cfg.seq_len), jnp.int32))["params"]
  groups = noise_scale.param_groups(jax.eval_shape(init_params, jax.random.key(0)))
  tx, lr = _optimizer()
  tokens = jax.random.randint(jax.random.key(cfg.seed + 1), (cfg.batch, cfg.seq_len + 1), 0,
                              cfg.vocab_size, jnp.int32)
  batch = jax.device_put(tokens, NamedSharding(mesh, P("data")))

  steps, states = {}, {}
  for noise in (True, False):
    sc = step_lib.StepConfig(num_microbatches=k, microbatch=cfg.microbatch,
                             seq_len=cfg.seq_len, num_devices=d, noise=noise)
    steps[noise] = step_lib.make_train_step(loss_fn, tx, lr, sc, mesh)
    state = step_lib.init_state(init_params, tx, jax.random.key(cfg.seed), mesh, groups)
    for _ in range(2):  # compile, then one more warm step; neither is timed
      state, metrics = steps[noise](state, batch)
    states[noise] = jax.block_until_ready((state, metrics))[0]

  def one_step(noise: bool):
    # The state is donated: each call feeds the one the previous call returned.
    states[noise], metrics = steps[noise](states[noise], batch)
    return states[noise], metrics

  times = {True: [], False: []}
  for r in range(cfg.rounds):
    order = (True, False) if r % 2 == 0 else (False, True)  # cancels linear drift in pairs
    for noise in order:
      times[noise].append(_timed(lambda: one_step(noise), cfg.steps_per_round))

  hess = []
  if cfg.hessian_calls:
    sc = step_lib.StepConfig(num_microbatches=k, microbatch=cfg.microbatch,
                             seq_len=cfg.seq_len, num_devices=d)
    hessian_fn = step_lib.make_hessian_fn(loss_fn, sc, mesh)
    params = states[False].params
    jax.block_until_ready(hessian_fn(params, batch))  # compile
    hess = [_timed(lambda: hessian_fn(params, batch), 1) for _ in range(cfg.hessian_calls)]

  return BenchResult(cfg=cfg, num_microbatches=k, step_on=np.array(times[True]),
                     step_off=np.array(times[False]), hessian=np.array(hess),
                     jax_version=jax.__version__, device=str(devices[0].device_kind))


def paired_ratios(result: BenchResult) -> np.ndarray:
  """on/off time of each round: the two variants of a round ran back to back."""
  return result.step_on / result.step_off


def bootstrap_ci(x: np.ndarray, n: int = 10_000, q: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
  """Percentile bootstrap interval of the median of `x`."""
  rng = np.random.default_rng(seed)
  medians = np.median(rng.choice(x, size=(n, len(x)), replace=True), axis=1)
  lo, hi = np.quantile(medians, [(1 - q) / 2, (1 + q) / 2])
  return float(lo), float(hi)


def report(result: BenchResult) -> str:
  """Human-readable summary: config, per-variant medians and IQRs, and the on/off ratio."""
  c = result.cfg
  on, off = result.step_on, result.step_off
  ratios = paired_ratios(result)
  lo, hi = bootstrap_ci(ratios)
  q = lambda x: np.quantile(x, [0.25, 0.75]) * 1e3
  lines = [
      f"config: size={c.size} seq_len={c.seq_len} batch={c.batch} microbatch={c.microbatch} "
      f"K={result.num_microbatches} devices={c.num_devices} vocab={c.vocab_size} "
      f"rounds={c.rounds} steps_per_round={c.steps_per_round}",
      f"jax {result.jax_version} on {result.device}",
      "variant       median ms/step   IQR ms",
      "noise=True    {:14.2f}   {:.2f}-{:.2f}".format(np.median(on) * 1e3, *q(on)),
      "noise=False   {:14.2f}   {:.2f}-{:.2f}".format(np.median(off) * 1e3, *q(off)),
      f"ratio on/off (median of paired rounds): {np.median(ratios):.4f} "
      f"[95% bootstrap {lo:.4f}-{hi:.4f}]; ratio of medians {np.median(on) / np.median(off):.4f}",
  ]
  if len(result.hessian):
    h = np.median(result.hessian)
    lines.append(f"B_noise Hessian call (noise.hessian): {h * 1e3:.2f} ms = "
                 f"{h / np.median(off):.2f} train steps (informational)")
  return "\n".join(lines)
