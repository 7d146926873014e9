"""Noisy quadratic model (NQM): exact expected SGD loss curves, noise scales and B_crit.

McCandlish et al. 2018 (arXiv:1812.06162) and Zhang et al. 2019 (arXiv:1907.04164), in the
eigenbasis of H (H diagonal). Per-example loss l_i(theta) = 1/2 theta^T H theta + xi_i^T theta,
xi_i ~ N(0, Sigma), Sigma diagonal with variances `sigma2`: the expected loss is
L(theta) = 1/2 theta^T H theta, its gradient G = H theta, and the per-example gradient covariance
is Sigma. One token is one example, so batch sizes here are in tokens, as in the analysis.

Plain SGD with a batch of B examples, theta <- theta - lr (H theta + mean of B xi_i), moves each
eigendirection independently, and its second moment m_i = E[theta_i^2] obeys the linear recursion
m <- (1 - lr h)^2 m + lr^2 sigma2 / B exactly, so E[L] = 1/2 sum h m is known in closed form. That
gives the batch-size scan without sampling noise: `exact_scan` runs the real analysis protocol
(bscan.analysis.targets.steps_to_target, bscan.analysis.fit.fit_critical_batch) on those expected
curves, so B_crit can be compared with the noise scales B_noise and B_simple with no seed scatter.

Imports no JAX: the JAX trainer side imports `Problem` and `make_problem` from here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd

from bscan.analysis import fit as fit_lib
from bscan.analysis import targets as targets_lib

_CHUNK = 4096  # steps per block of the closed-form curve: [chunk, d] float64 stays small
_LOG_FLOOR = -1e4  # log(0) stand-in for directions that lr h = 1 zeroes in one step
# targets.steps_to_target is envelope + _first_reach; targets.steps_to_targets calls them the same
# way (one envelope per run, then every target), which saves a smoothing pass per target here.
_first_reach = targets_lib._first_reach  # pylint: disable=protected-access


@dataclasses.dataclass(frozen=True)
class Problem:
  """An NQM in the eigenbasis of H."""

  h: np.ndarray  # float64[d] Hessian eigenvalues
  sigma2: np.ndarray  # float64[d] per-example gradient-noise variance along each eigendirection
  theta0: np.ndarray  # float64[d] initial parameters

  @property
  def dim(self) -> int:
    """Number of eigendirections."""
    return len(self.h)


def make_problem(dim: int, condition: float, noise: float, seed: int = 0) -> Problem:
  """NQM with h log-spaced from 1 down to 1/condition, Sigma = noise * H and theta0 ~ N(0, 1).

  h = np.geomspace(1, 1 / condition, dim) (descending, h_max = 1); sigma2 = noise * h (Sigma
  proportional to H, the usual NQM choice: the gradient noise is largest along the sharp
  directions); theta0 = np.random.default_rng(seed).standard_normal(dim), the generator's first
  draw, float64, theta0[i] paired with h[i]. The JAX trainer uses this same theta0 as its init.
  """
  if dim < 1:
    raise ValueError(f"dim must be >= 1, got {dim}")
  if not condition >= 1:
    raise ValueError(f"condition must be >= 1, got {condition}")
  if not noise >= 0:
    raise ValueError(f"noise must be >= 0, got {noise}")
  h = np.geomspace(1.0, 1.0 / condition, dim)
  theta0 = np.random.default_rng(seed).standard_normal(dim)
  return Problem(h=h, sigma2=noise * h, theta0=theta0)


def loss(p: Problem, theta: np.ndarray) -> float:
  """Expected per-example loss L(theta) = 1/2 sum h theta^2."""
  return float(0.5 * np.sum(p.h * np.asarray(theta, float) ** 2))


def b_simple_from_moments(p: Problem, m: np.ndarray) -> float:
  """tr Sigma / |G|^2 with theta^2 replaced by second moments m: sum sigma2 / sum h^2 m."""
  return float(np.sum(p.sigma2) / np.sum(p.h ** 2 * np.asarray(m, float)))


def b_noise_from_moments(p: Problem, m: np.ndarray) -> float:
  """tr(H Sigma) / G^T H G with theta^2 replaced by m: sum h sigma2 / sum h^3 m."""
  return float(np.sum(p.h * p.sigma2) / np.sum(p.h ** 3 * np.asarray(m, float)))


def b_simple(p: Problem, theta: np.ndarray) -> float:
  """McCandlish's simple noise scale tr Sigma / |G|^2 at theta (in examples = tokens)."""
  return b_simple_from_moments(p, np.asarray(theta, float) ** 2)


def b_noise(p: Problem, theta: np.ndarray) -> float:
  """McCandlish's noise scale tr(H Sigma) / G^T H G at theta (in examples = tokens)."""
  return b_noise_from_moments(p, np.asarray(theta, float) ** 2)


def check_lr(p: Problem, lr: float) -> None:
  """Raises ValueError unless 0 < lr < 2 / h_max (SGD on the NQM diverges beyond)."""
  h_max = float(np.max(p.h))
  if not 0 < lr < 2.0 / h_max:
    raise ValueError(f"lr={lr!r} is outside (0, 2/h_max) = (0, {2.0 / h_max:g}): "
                     "SGD on this quadratic is unstable (its loss diverges)")


def _check(p: Problem, batch: int, lr: float) -> None:
  """Validates a (batch, lr) run of problem p."""
  if batch < 1:
    raise ValueError(f"batch must be >= 1, got {batch}")
  check_lr(p, lr)


def noise_floor_moments(p: Problem, batch: int, lr: float) -> np.ndarray:
  """Fixed point of the recursion: m* = lr sigma2 / (B h (2 - lr h)), float64[d]."""
  _check(p, batch, lr)
  return lr * p.sigma2 / (batch * p.h * (2.0 - lr * p.h))


def _log_contraction(p: Problem, lr: float) -> np.ndarray:
  """log (1 - lr h)^2 per direction, accurate for small lr h (log1p)."""
  x = lr * p.h
  with np.errstate(divide="ignore"):
    log_abs = np.where(x < 1, np.log1p(-np.minimum(x, 1.0)), np.log(np.abs(x - 1.0)))
  return np.maximum(2.0 * log_abs, _LOG_FLOOR)


def second_moments(p: Problem, batch: int, lr: float, step: int) -> np.ndarray:
  """E[theta_t^2] per direction after `step` SGD updates from theta0, float64[d].

  Closed form of m <- a m + c with a = (1 - lr h)^2, c = lr^2 sigma2 / B: m_t = m* + a^t (m0 - m*)
  with the fixed point m* = c / (1 - a), written so no 1 - a^t cancels when lr h is tiny.
  """
  m_star = noise_floor_moments(p, batch, lr)
  decay = np.exp(step * _log_contraction(p, lr))
  return m_star + decay * (p.theta0 ** 2 - m_star)


def _powers(p: Problem, lr: float, n: int = _CHUNK) -> np.ndarray:
  """a_i^k = (1 - lr h_i)^(2k) for k < n, float64[n, d]: one block of the curve, reused."""
  return np.exp(np.arange(n, dtype=float)[:, None] * _log_contraction(p, lr)[None, :])


def _curve_parts(p: Problem, batch: int, lr: float) -> tuple[np.ndarray, float]:
  """(weights, floor) with E[L(theta_t)] = floor + sum_i weights_i a_i^t."""
  m_star = noise_floor_moments(p, batch, lr)
  return 0.5 * p.h * (p.theta0 ** 2 - m_star), float(0.5 * np.sum(p.h * m_star))


def _curve_blocks(p: Problem, batch: int, lr: float, powers: np.ndarray | None = None
                  ) -> Iterator[tuple[int, np.ndarray]]:
  """Yields (start, E[L(theta_t)] for t in [start, start + chunk)) for start = 0, chunk, ...

  Each block is one matrix-vector product: a^t = a^(t - start) a^start, with a^(t - start) from
  the shared `powers` block, so a whole curve costs no exp per step.
  """
  weights, floor = _curve_parts(p, batch, lr)
  powers = _powers(p, lr) if powers is None else powers
  log_a, start = _log_contraction(p, lr), 0
  while True:
    # einsum, not @: a BLAS matrix-vector product is ~10x slower here on a shared 2-core host.
    yield start, floor + np.einsum("td,d->t", powers, weights * np.exp(start * log_a))
    start += len(powers)


def expected_loss_curve(p: Problem, batch: int, lr: float, steps: int) -> np.ndarray:
  """E[L] as the trainer logs it: entry t-1 (t = 1..steps) is E[L(theta_{t-1})], float64[steps].

  Plain SGD (constant lr, no momentum, clipping or warmup) with `batch` examples a step. Row t of
  the trainer's log holds the loss at the parameters before step t's update, so entry 0 is
  L(theta0).
  """
  _check(p, batch, lr)
  powers = _powers(p, lr, max(1, min(steps, _CHUNK)))
  blocks = []
  for start, block in _curve_blocks(p, batch, lr, powers):
    if start >= steps:
      break
    blocks.append(block)
  return np.concatenate(blocks)[:steps] if blocks else np.zeros(0)


def _steps_to_targets(p: Problem, batch: int, lr: float, targets: np.ndarray, limits: np.ndarray,
                      window: float, min_step: float, powers: np.ndarray) -> np.ndarray:
  """Steps to each target by the analysis protocol, on the expected curve up to what matters.

  limits[j]: the curve beyond it cannot change target j's answer (its best S so far times
  e^window, or max_steps). Below that the curve stops soon after it first reaches the lowest
  reachable target, once every crossing found has its whole smoothing window (the smoothed
  curve crosses later than the raw one: smoothing a convex curve lifts it), so S is what the
  whole curve would give. Targets at or below the curve's infimum bound floor + sum_i min(w_i, 0)
  are never reached.
  """
  weights, floor = _curve_parts(p, batch, lr)
  reachable = targets > floor + np.sum(np.minimum(weights, 0.0))
  out = np.full(len(targets), np.nan)
  end = int(np.max(np.where(reachable, limits, 0)))
  if end <= 0:
    return out
  stop_loss, grow = float(np.min(targets[reachable])), math.exp(window)
  blocks, gen = [], _curve_blocks(p, batch, lr, powers)
  have, first = 0, None
  while have < end and first is None:  # the raw curve's first step at or below stop_loss
    blocks.append(next(gen)[1])
    below = np.nonzero(blocks[-1] <= stop_loss)[0]
    if len(below):
      first = have + int(below[0]) + 1  # log rows start at step 1
    have += len(blocks[-1])
  n = end if first is None else min(end, math.ceil(first * grow * 1.05) + 2)
  while True:
    while have < n:
      blocks.append(next(gen)[1])
      have += len(blocks[-1])
    curve = np.concatenate(blocks)[:n]
    # targets.steps_to_target for each target, with the envelope computed once per curve.
    s_env, env = targets_lib.envelope(np.arange(1, n + 1, dtype=float), curve, window)
    for j in np.nonzero(reachable)[0]:
      out[j] = _first_reach(s_env, env, targets[j], min_step)
    found = out[np.isfinite(out)]
    need = math.ceil((float(np.max(found)) + 1) * grow) + 1 if len(found) else 0
    if need <= n or n >= end:
      return out
    n = min(end, max(need, math.ceil(n * 1.2)))


def noise_free(p: Problem) -> Problem:
  """The same problem without gradient noise: SGD on it is gradient descent (B = infinity)."""
  return dataclasses.replace(p, sigma2=np.zeros_like(p.sigma2))


def choose_targets(p: Problem, lrs: Sequence[float], n: int = 6, first_step: int = 20,
                   span: float = 25.0) -> np.ndarray:
  """n target losses log-spaced down over a factor `span`, descending, from a start set by GD.

  The highest is the lowest loss noise-free GD logs at step `first_step` at any lr of the grid.
  Noise only raises the expected loss (m_t = m_t(GD) + a variance), so every run of every batch
  size needs >= first_step steps to any target: with first_step well above the protocol's
  min_step (10), no run's crossing is dropped as too early, which would bias S at large B up.
  """
  gd = noise_free(p)
  start = min(float(expected_loss_curve(gd, 1, lr, first_step)[-1]) for lr in lrs)
  return start * np.geomspace(1.0, 1.0 / span, n)


def calibrate_noise(p: Problem, batches: Sequence[int], lrs: Sequence[float], target: float,
                    b_crit: float, max_steps: int, rounds: int = 5) -> float:
  """make_problem's `noise` (Sigma = noise * H) at which the exact scan gives B_crit ~ b_crit.

  p's own sigma2 is ignored: the noise sets Sigma = noise * H. The expected curves depend on
  sigma2 / B only, so S(B; c Sigma) = S(B / c; Sigma) and B_crit is proportional to the noise up
  to how the batch and lr grids sample S(B): best lrs switch as the noise moves, so B_crit jumps
  by up to ~20% on a coarse lr grid, and only the closest of the noises tried is returned. Starts
  from B_crit ~ tr Sigma / (2 target) (noise matters once the floor lr tr Sigma / (4 B) at
  lr ~ 1 rivals the target), then steps log(noise) by log(b_crit / fitted), halved after the
  first round against the jumps.
  """
  noise, best, best_miss = 2.0 * b_crit * target / float(np.sum(p.h)), np.nan, np.inf
  for k in range(rounds):
    trial = dataclasses.replace(p, sigma2=noise * p.h)
    fitted = float(exact_scan(trial, batches, lrs, [target], max_steps)["b_crit"].iloc[0])
    if not np.isfinite(fitted) or fitted <= 0:
      break
    miss = abs(math.log(b_crit / fitted))
    if miss < best_miss:
      best, best_miss = noise, miss
    if miss < 0.01:
      break
    noise *= (b_crit / fitted) ** (1.0 if k == 0 else 0.5)
  if not np.isfinite(best):
    raise ValueError(f"no B_crit fitted at target {target:g} with noise {noise:g}: the batch "
                     "grid or max_steps does not reach it")
  return float(best)


def first_step_at_or_below(p: Problem, batch: int, lr: float, target: float, max_steps: int
                           ) -> int | None:
  """Fewest updates t < max_steps with E[L(theta_t)] <= target, or None."""
  for start, block in _curve_blocks(p, batch, lr):
    if start >= max_steps:
      return None
    below = np.nonzero(block[:max_steps - start] <= target)[0]
    if len(below):
      return start + int(below[0])
  return None  # unreachable: the blocks never end


def exact_scan(p: Problem, batches: Sequence[int], lrs: Sequence[float],
               targets: Sequence[float], max_steps: int,
               window: float = targets_lib.DEFAULT_WINDOW,
               min_step: float = targets_lib.DEFAULT_MIN_STEP) -> pd.DataFrame:
  """Exact-scan B_crit per target loss, next to B_noise and B_simple at that loss.

  Per batch B and lr: the expected loss curve (up to max_steps) and, per target, steps to it with
  the analysis protocol (targets.steps_to_target on steps 1..n: log-step smoothing, isotonic
  envelope, log-step interpolation, NaN below min_step). Best S over the lr grid per (B, target),
  then per target fit.fit_critical_batch(B in tokens = examples, S) -> S_min, E_min, B_crit.

  b_noise and b_simple are E-weighted: at the first step t at which the expected loss of the
  smallest batch's best-lr run is at or below the target, sum h sigma2 / sum h^3 m_t and
  sum sigma2 / sum h^2 m_t with m_t = E[theta_t^2] (ratios of expectations, not the expectation
  of the ratio). "Smallest batch" is the smallest that reaches the target (column b_ref). The
  same at the largest batch that reaches it (b_noise_large, b_simple_large, b_ref_large): the
  state at a given loss depends on the path, and B_noise with it. The sharp directions of a run
  sit at its own noise floor m* = lr sigma2 / (B h (2 - lr h)) within a few steps, and there
  B_noise = (B / lr) sum h sigma2 / sum h^2 sigma2 / (2 - lr h): a property of the run (B, lr)
  rather than of the loss, whenever those directions dominate G^T H G.

  Returns:
    One row per target: target, n_batches_reaching, s_min, e_min, b_crit (NaN when fewer than 3
    batch sizes reach the target), fit_sigma (residual s.d. of log S: how far S(B) is from
    S_min + E_min/B), b_noise, b_simple, b_ref, b_noise_large, b_simple_large, b_ref_large, and
    per batch B the columns steps_{B} and best_lr_{B} (NaN where no lr reaches the target).
  """
  batches = sorted({int(b) for b in batches})
  lrs = sorted((float(lr) for lr in lrs), reverse=True)  # fast runs first: they cap the rest
  target_arr = np.array([float(t) for t in targets])
  for lr in lrs:
    check_lr(p, lr)
  if batches[0] < 1:
    raise ValueError(f"batch sizes must be >= 1, got {batches[0]}")
  best_s = np.full((len(batches), len(target_arr)), np.nan)
  best_lr = np.full_like(best_s, np.nan)
  grow = math.exp(window)
  for lr in lrs:
    powers = _powers(p, lr, max(1, min(max_steps, _CHUNK)))
    for i, batch in enumerate(batches):
      limits = np.where(np.isfinite(best_s[i]), np.ceil(best_s[i] * grow) + 2, max_steps)
      s = _steps_to_targets(p, batch, lr, target_arr, np.minimum(limits, max_steps).astype(int),
                            window, min_step, powers)
      better = np.isfinite(s) & ~(s >= best_s[i])  # NaN best: anything finite wins
      best_s[i, better], best_lr[i, better] = s[better], lr
  rows = []
  for j, target in enumerate(target_arr):
    reached = np.isfinite(best_s[:, j])
    row = {"target": float(target), "n_batches_reaching": int(reached.sum()), "s_min": np.nan,
           "e_min": np.nan, "b_crit": np.nan, "fit_sigma": np.nan, "b_noise": np.nan,
           "b_simple": np.nan, "b_ref": np.nan, "b_noise_large": np.nan,
           "b_simple_large": np.nan, "b_ref_large": np.nan}
    if reached.sum() >= 3:
      res = fit_lib.fit_critical_batch(np.array(batches, float), best_s[:, j])
      row.update(s_min=res.s_min, e_min=res.e_min, b_crit=res.b_crit, fit_sigma=res.sigma)
    if reached.any():
      ends = np.nonzero(reached)[0]
      for i, suffix in ((ends[0], ""), (ends[-1], "_large")):
        t = first_step_at_or_below(p, batches[i], best_lr[i, j], target, max_steps)
        if t is not None:
          m = second_moments(p, batches[i], best_lr[i, j], t)
          row.update({f"b_noise{suffix}": b_noise_from_moments(p, m),
                      f"b_simple{suffix}": b_simple_from_moments(p, m),
                      f"b_ref{suffix}": float(batches[i])})
    for i, batch in enumerate(batches):
      row[f"steps_{batch}"] = best_s[i, j]
      row[f"best_lr_{batch}"] = best_lr[i, j]
    rows.append(row)
  return pd.DataFrame(rows)
