"""Fixed batches against batches that grow: steps and tokens to each target, and the saving.

Every run (fixed batch, declared ramp or controller; `ramp` column of bscan.analysis.load) is
read the way the scan reads it: steps to a target from the smoothed train-loss curve
(bscan.analysis.targets), tokens to it from the run's own token column at that step (a ramp's
steps differ in tokens), plus the tokens a branched controller spent in branches it did not
keep. Runs are named by their mode: 'fixed 8' or the ramp's label.

The claim tested, per target and ramp mode: the ramp reaches the target in at least
`saving` fewer optimizer steps than the best fixed batch whose tokens to the target are at most
`token_slack` times the ramp's (geometric means over seeds). Runs of one seed read one token
stream and start from one init, so seeds pair: the step ratio's interval and p-values come
from the paired log differences (Student t over seeds). "Met" needs the one-sided test of
ratio ≥ 1 − saving to reject at `alpha`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from bscan.analysis import fit as fit_lib
from bscan.analysis import targets as targets_lib
from bscan.workdir import Col

FIXED = "fixed"
COLUMNS = ("mode", "seed", "size", "seq_len", "target", "steps", "tokens", "overhead_tokens",
           "total_tokens", "batch_at_target")


def mode_of(run: pd.Series) -> str:
  """'fixed 8' for a run at one batch of 8 sequences, else its ramp label."""
  return run["ramp"] or f"{FIXED} {int(run['batch_sequences'])}"


def _at(step: np.ndarray, values: np.ndarray, at: float) -> float:
  """values (a per-step column) at fractional step `at`; NaN-free columns only."""
  ok = np.isfinite(values)
  if not ok.any() or not math.isfinite(at):
    return math.nan
  return float(np.interp(at, step[ok], values[ok]))


def per_run(runs: pd.DataFrame, losses: Sequence[float],
            window: float = targets_lib.DEFAULT_WINDOW,
            min_step: float = targets_lib.DEFAULT_MIN_STEP) -> pd.DataFrame:
  """One row per (run, target): steps and tokens to it (NaN where not reached)."""
  rows = []
  for _, run in runs.iterrows():
    step, loss = targets_lib.finite_prefix(run[Col.STEP], run[Col.TRAIN_LOSS])
    reached = targets_lib.steps_to_losses(step, loss, losses, window, min_step)
    n = len(step)
    overhead = np.nan_to_num(np.asarray(run.get(Col.OVERHEAD_TOKENS, np.zeros(n)))[:n])
    for target, steps in zip(losses, reached):
      tokens = _at(step, run[Col.TOKENS][:n], steps)
      extra = _at(step, overhead, steps) if math.isfinite(steps) else math.nan
      batch = run.get(Col.BATCH)
      batch = _at(step, np.asarray(batch)[:n], steps) if batch is not None else math.nan
      rows.append({"mode": mode_of(run), "seed": int(run["seed"]), "size": run["size"],
                   "seq_len": int(run["seq_len"]), "target": float(target), "steps": steps,
                   "tokens": tokens,
                   "overhead_tokens": extra, "total_tokens": tokens + extra,
                   "batch_at_target": batch if math.isfinite(batch) else run["batch_sequences"]})
  return pd.DataFrame(rows, columns=COLUMNS)


def _log_interval(values: np.ndarray, confidence: float) -> tuple[float, float, float]:
  """Geometric mean and its Student-t interval over seeds (NaN interval with one seed)."""
  logs = np.log(values[np.isfinite(values) & (values > 0)])
  if not len(logs):
    return math.nan, math.nan, math.nan
  mean = float(np.mean(logs))
  if len(logs) < 2:
    return math.exp(mean), math.nan, math.nan
  half = stats.t.ppf(0.5 + confidence / 2, len(logs) - 1) * np.std(logs, ddof=1) / math.sqrt(
      len(logs))
  return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def mode_order(mode: str) -> tuple[int, float, str]:
  """Fixed batches first, by batch; then the ramps by name."""
  if mode.startswith(FIXED + " "):
    return 0, float(mode.split()[1]), mode
  return 1, 0.0, mode


def summary(rows: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
  """Per (target, mode): seeds run and reached, steps and total tokens (geometric means with
  intervals over seeds)."""
  out = []
  for (target, mode), group in rows.groupby(["target", "mode"], sort=False):
    steps, tokens = group["steps"].to_numpy(float), group["total_tokens"].to_numpy(float)
    s, s_lo, s_hi = _log_interval(steps, confidence)
    e, e_lo, e_hi = _log_interval(tokens, confidence)
    out.append({"target": target, "mode": mode, "seeds": len(group),
                "reached": int(np.isfinite(steps).sum()), "steps": s, "steps_lo": s_lo,
                "steps_hi": s_hi, "tokens": e, "tokens_lo": e_lo, "tokens_hi": e_hi})
  table = pd.DataFrame(out)
  if table.empty:
    return table
  table["_order"] = table["mode"].map(mode_order)
  table = table.sort_values(["target", "_order"], ascending=[False, True], kind="stable")
  return table.drop(columns="_order").reset_index(drop=True)


def fixed_batch(mode: str) -> float:
  """The batch (sequences) of a 'fixed B' mode, NaN for a ramp."""
  return float(mode.split()[1]) if mode.startswith(FIXED + " ") else math.nan


def frontier(rows: pd.DataFrame, target: float) -> fit_lib.CriticalBatchFit | None:
  """The fixed batches' S(B) = S_min + E_min/B at `target`, B in tokens (every seed a point);
  None with fewer than three batch sizes."""
  at = rows[(rows["target"] == target) & rows["mode"].str.startswith(FIXED + " ")]
  batches = at["mode"].map(fixed_batch) * at["seq_len"]
  try:
    return fit_lib.fit_critical_batch(batches.to_numpy(float), at["steps"].to_numpy(float))
  except fit_lib.TooFewBatchSizesError:
    return None


def frontier_steps(fit: fit_lib.CriticalBatchFit, tokens: float) -> float:
  """Steps a fixed batch needs on the fitted frontier when it uses `tokens` to the target:
  E = S_min·B + E_min gives B, then S = S_min + E_min/B (NaN at or below E_min)."""
  if not tokens > fit.e_min:
    return math.nan
  return fit.s_min + fit.e_min * fit.s_min / (tokens - fit.e_min)


@dataclasses.dataclass(frozen=True)
class Claim:
  """A ramp against the best fixed batch within its token budget, at one target."""

  target: float
  mode: str
  baseline: str  # the fixed mode compared with ('' when none is within the budget)
  steps_ratio: float  # ramp / baseline, geometric mean of the paired ratios
  ratio_lo: float
  ratio_hi: float
  tokens_ratio: float  # ramp's total tokens / baseline's (geometric means)
  seeds: int  # pairs
  p_fewer: float  # one-sided, H0: ratio ≥ 1
  p_saving: float  # one-sided, H0: ratio ≥ 1 − saving
  saving: float
  met: bool
  # The ramp's steps over the fixed-batch frontier's at its tokens (< 1: beats every fixed
  # batch, tested or not); NaN without a frontier.
  frontier_ratio: float = math.nan


def claim(rows: pd.DataFrame, target: float, mode: str, token_slack: float = 1.1,
          saving: float = 0.3, alpha: float = 0.05, confidence: float = 0.95) -> Claim:
  """Tests `mode` at `target` against the fastest fixed batch with ≤ token_slack × its tokens."""
  at = rows[rows["target"] == target]
  means = summary(at, confidence).set_index("mode")
  budget = token_slack * means.loc[mode, "tokens"]
  fixed = means[[m.startswith(FIXED + " ") for m in means.index]]
  eligible = fixed[(fixed["tokens"] <= budget) & (fixed["reached"] == fixed["seeds"])]
  nan = math.nan
  fit = frontier(rows, target)
  on_frontier = nan if fit is None else means.loc[mode, "steps"] / frontier_steps(
      fit, means.loc[mode, "tokens"])
  if eligible.empty or not math.isfinite(budget):
    return Claim(target, mode, "", nan, nan, nan, nan, 0, nan, nan, saving, False, on_frontier)
  baseline = str(eligible["steps"].idxmin())
  ours = at[at["mode"] == mode].set_index("seed")["steps"]
  theirs = at[at["mode"] == baseline].set_index("seed")["steps"]
  d = np.log(ours / theirs.reindex(ours.index)).dropna().to_numpy(float)
  tokens_ratio = float(means.loc[mode, "tokens"] / means.loc[baseline, "tokens"])
  if len(d) < 2:
    return Claim(target, mode, baseline, float(np.exp(d.mean())) if len(d) else nan, nan, nan,
                 tokens_ratio, len(d), nan, nan, saving, False, on_frontier)
  se = np.std(d, ddof=1) / math.sqrt(len(d))
  half = stats.t.ppf(0.5 + confidence / 2, len(d) - 1) * se
  mean = float(d.mean())

  def p_below(bound: float) -> float:  # one-sided: mean log ratio < log(bound)
    if se == 0:
      return 0.0 if mean < math.log(bound) else 1.0
    return float(stats.t.cdf((mean - math.log(bound)) / se, len(d) - 1))

  p_saving = p_below(1 - saving)
  return Claim(target, mode, baseline, math.exp(mean), math.exp(mean - half),
               math.exp(mean + half), tokens_ratio, len(d), p_below(1.0), p_saving, saving,
               p_saving < alpha, on_frontier)


def claims(rows: pd.DataFrame, target: float, **kwargs) -> pd.DataFrame:
  """`claim` for every ramp mode at `target`, one row each."""
  modes = [m for m in rows["mode"].unique() if not m.startswith(FIXED + " ")]
  return pd.DataFrame([dataclasses.asdict(claim(rows, target, m, **kwargs))
                       for m in sorted(modes)])


def lowest_common_target(rows: pd.DataFrame) -> float:
  """The lowest target every run reached (NaN when none is)."""
  reached = rows.groupby("target")["steps"].apply(lambda s: bool(np.isfinite(s).all()))
  ok = reached[reached].index
  return float(min(ok)) if len(ok) else math.nan


@dataclasses.dataclass(frozen=True)
class IdealRamp:
  """What the best possible ramp could save, in Kaplan's S–E picture applied locally.

  Between two targets a run at batch B spends ΔS_min·(1 + B_crit/B) steps and
  ΔS_min·(B_crit + B) tokens (B_crit of that stretch). For any ramp, by Cauchy–Schwarz,
  (S/S_min − 1)(E/E_min − 1) ≥ rho = (Σ √B_crit ΔS_min)² / (S_min · Σ B_crit ΔS_min),
  with equality for B ∝ √B_crit; one fixed batch has exactly 1. rho near 1 (B_crit nearly
  constant where the steps are spent) leaves a ramp nothing to gain.
  """

  rho: float
  steps_at_equal_tokens: float  # best ramp / fixed batch at the same tokens, at B = B_crit
  steps_vs_slack: float  # best ramp / the best fixed batch with token_slack × its tokens


def ideal_ramp(rows: pd.DataFrame, losses: Sequence[float], token_slack: float = 1.1
               ) -> IdealRamp:
  """rho from the fixed batches' S_min(L) and B_crit(L) at each target (the stretch before
  the first target taken at its B_crit, which can only understate the spread)."""
  fits = [frontier(rows, t) for t in sorted(losses, reverse=True)]
  if any(f is None for f in fits):
    return IdealRamp(math.nan, math.nan, math.nan)
  s_min = np.array([f.s_min for f in fits])
  b_crit = np.array([f.b_crit for f in fits])
  d_s = np.diff(np.concatenate([[0.0], s_min]))
  seg = np.concatenate([[b_crit[0]], np.sqrt(b_crit[1:] * b_crit[:-1])])
  rho = float(np.sum(np.sqrt(seg) * d_s) ** 2 / (s_min[-1] * np.sum(seg * d_s)))
  y = np.geomspace(1e-2, 1e2, 4001)  # the ramp's E/E_min − 1; its S/S_min − 1 is rho / y
  y_fixed = token_slack * (1 + y) - 1
  vs_slack = float(np.min((1 + rho / y) / (1 + 1 / y_fixed)))
  return IdealRamp(rho, (1 + rho) / 2, vs_slack)
