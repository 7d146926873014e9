"""Local critical batch size from branched runs (Merrill et al. 2025, arXiv:2505.23971, §3.1).

From a checkpoint of a reference run at batch B (tokens), short branches train at k·B for
k = 1, 2, 4, ... (learning rate rescaled for k), each for the same Δ tokens. The local CBS is the
largest k·B whose final loss stays within ε nats of the k = 1 branch. Beyond the paper, each k has
several replicate seeds, and replicate j of every k sees the same data, so branches are compared
in pairs by replicate, the decision at each k is a test rather than a bare threshold, and the CBS
comes with an interval.

Method, per (size, checkpoint):
- Paired excess d_j(k) = final_loss(k, j) - final_loss(1, j). A diverged branch (final loss NaN
  or inf) has d = +inf: its k is beyond ε for certain (a divergence with any probability makes the
  mean excess infinite), and with it every larger k. A replicate whose k = 1 branch diverged (or
  was not run) has nothing to be paired with: it is dropped from every k (a BranchWarning when it
  diverged).
- The true local CBS c* is the largest tested k·B with mean excess δ(k) <= ε, assuming δ rises
  with k and δ(1) = 0. It is resolved only to the grid of k's tested (a missing k coarsens it).
- At each tested k > 1 with n >= 2 pairs: mean excess and one-sided Student-t bounds
  mean ± t(1 - α/m, n - 1) · s/√n, where m is the number of k > 1 tested (Bonferroni).
  "within" when the upper bound <= ε, "beyond" when the lower bound > ε (or a branch diverged),
  else "undecided". The pairing matters: the seed's share of the loss (data order, init) cancels.
- Interval: cbs_lo = B · (largest k that is "within" together with every smaller k; k = 1 when
  k = 2 is not); cbs_hi = B · (the tested k just below the first "beyond" k); inf when no k is
  beyond, i.e. the data give a lower bound only.
- Point estimate: B · (the tested k just below the first k whose mean excess exceeds ε), the
  largest tested k when none does. It always lies in [cbs_lo, cbs_hi].

Coverage: cbs_lo > c* needs a false "within" at the first k past c* (the "within" run stops at
the first k that is not), and cbs_hi < c* needs a false "beyond" at some k <= c*. These involve
at most m distinct one-sided tests, each wrong with probability <= α/m, so by the union bound
(valid however the tests correlate, and they do, through the shared k = 1 branch) the interval
covers c* with probability >= 1 - α: 90% at the default α = 0.1 (the t bounds assume roughly
normal paired differences). Measured in tests/analysis_branches_test.py: 93% in the worst case
(δ = ε at every k up to c*, just above it past c*); 98-100% on smooth δ(k), where only the k's
next to c* are close calls. Testing "beyond" top-down instead (a fixed sequence from the largest k,
no Bonferroni) would give about half the width, but one noisy largest-k branch would then make
cbs_hi = inf however clearly smaller k's are beyond; stopping at the first "beyond" does not.

With one replicate there is no s.d.: the point estimate is returned and cbs_lo = cbs_hi = NaN
(flag "no_interval"). ε is absolute, in nats (a relative ε would move the threshold with the
loss level along the CBS(L) curve).

  result = analyze_branches(branch_runs, epsilon=0.01)
  result.cbs      # one row per (size, checkpoint): cbs, cbs_lo, cbs_hi vs ref_loss
  result.excess   # one row per (size, checkpoint, k): mean excess, its bounds, the decision
  curve_rows(result.cbs)  # long form for a CBS(L) figure; also takes the scan's critical table
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

DEFAULT_EPSILON = 0.01  # nats: loss excess over the k = 1 branch still counted as "no worse"
DEFAULT_ALPHA = 0.1  # 1 - coverage of the CBS interval

WITHIN, BEYOND, UNDECIDED = "within", "beyond", "undecided"
LOWER_BOUND, NO_INTERVAL = "lower_bound", "no_interval"  # flags: cbs_hi = inf; one replicate

INPUT_COLUMNS = ("size", "checkpoint_step", "checkpoint_tokens", "ref_loss", "k", "batch_tokens",
                 "replicate", "final_loss")
CBS_COLUMNS = ("size", "checkpoint_step", "checkpoint_tokens", "ref_loss", "batch_tokens",
               "epsilon", "alpha", "cbs", "cbs_lo", "cbs_hi", "n_replicates", "k_max", "flag")
EXCESS_COLUMNS = ("size", "checkpoint_step", "ref_loss", "k", "batch_tokens", "n", "n_diverged",
                  "mean_excess", "excess_lo", "excess_hi", "decision")
CURVE_COLUMNS = ("method", "size", "loss", "cbs", "cbs_lo", "cbs_hi", "open_above")


class BranchWarning(UserWarning):
  """Branch runs had to be dropped (a k = 1 branch diverged) or a checkpoint has no interval."""


@dataclasses.dataclass(frozen=True)
class LocalCBS:
  """Local CBS at one checkpoint in multiples k of the reference batch, with the per-k tests."""

  k: float  # point estimate
  k_lo: float  # interval; nan with one replicate
  k_hi: float  # inf when no k is confidently beyond
  n_replicates: int  # replicates with a finite k = 1 loss
  ks: np.ndarray  # tested k, ascending, starting at 1
  n: np.ndarray  # pairs per k
  n_diverged: np.ndarray
  mean_excess: np.ndarray  # 0 at k = 1; inf when a branch diverged
  excess_lo: np.ndarray  # one-sided Bonferroni bounds at level 1 - alpha/m each
  excess_hi: np.ndarray
  decision: tuple[str, ...]  # "" at k = 1, then within | beyond | undecided


def local_cbs(ks: Sequence[float], losses_RxK: np.ndarray, epsilon: float = DEFAULT_EPSILON,
              alpha: float = DEFAULT_ALPHA) -> LocalCBS:
  """Local CBS from final losses (replicates x ks; inf = diverged, nan = not run), ks[0] = 1."""
  ks = np.asarray(ks, float)
  losses = np.asarray(losses_RxK, float)
  if ks.ndim != 1 or not len(ks) or ks[0] != 1 or np.any(np.diff(ks) <= 0):
    raise ValueError(f"ks must be ascending and start at 1, got {ks.tolist()}")
  if losses.ndim != 2 or losses.shape[1] != len(ks):
    raise ValueError(f"losses must be (replicates, {len(ks)}), got shape {losses.shape}")
  if not epsilon > 0:
    raise ValueError(f"epsilon must be positive nats, got {epsilon}")
  if not 0 < alpha < 1:
    raise ValueError(f"alpha must be in (0, 1), got {alpha}")
  losses = np.where(np.isnan(losses), np.nan, np.where(np.isfinite(losses), losses, np.inf))
  base = losses[:, 0]
  paired = np.isfinite(base)
  n_replicates = int(paired.sum())
  if not n_replicates:
    raise ValueError("no replicate has a finite k = 1 loss to compare with")
  excess = losses[paired] - base[paired, None]  # inf - finite = inf; nan stays nan
  tested = np.concatenate([[True], (~np.isnan(excess[:, 1:])).any(axis=0)])
  ks, excess = ks[tested], excess[:, tested]

  n_k = len(ks)
  m = max(n_k - 1, 1)  # tests, for Bonferroni
  n = (~np.isnan(excess)).sum(axis=0)
  n_div = np.isinf(excess).sum(axis=0)
  finite = np.isfinite(excess)  # for a k with no divergence, its n pairs
  count = np.maximum(finite.sum(axis=0), 1)
  mean = np.where(finite, excess, 0.0).sum(axis=0) / count
  var = np.where(finite, excess - mean, 0.0) ** 2
  se = np.sqrt(var.sum(axis=0) / np.maximum(count - 1, 1) / count)
  half = stats.t.ppf(1 - alpha / m, np.maximum(n - 1, 1)) * se
  lo, hi = mean - half, mean + half
  mean[n_div > 0] = lo[n_div > 0] = hi[n_div > 0] = np.inf
  mean[0] = lo[0] = hi[0] = 0.0
  decision = [""]
  for i in range(1, n_k):
    if n_div[i]:
      decision.append(BEYOND)
    elif n[i] < 2:
      lo[i] = hi[i] = np.nan
      decision.append(UNDECIDED)
    else:
      decision.append(WITHIN if hi[i] <= epsilon else BEYOND if lo[i] > epsilon else UNDECIDED)

  exceeds = np.flatnonzero(mean[1:] > epsilon)
  k_point = ks[exceeds[0]] if len(exceeds) else ks[-1]  # ks[1:][j] is just above ks[j]
  if n_replicates < 2:
    k_lo = k_hi = np.nan
  else:
    i_lo = 0
    while i_lo + 1 < n_k and decision[i_lo + 1] == WITHIN:
      i_lo += 1
    k_lo = ks[i_lo]
    beyond = [i for i in range(1, n_k) if decision[i] == BEYOND]
    k_hi = ks[beyond[0] - 1] if beyond else np.inf
  return LocalCBS(k=float(k_point), k_lo=float(k_lo), k_hi=float(k_hi), n_replicates=n_replicates,
                  ks=ks, n=n, n_diverged=n_div, mean_excess=mean, excess_lo=lo, excess_hi=hi,
                  decision=tuple(decision))


@dataclasses.dataclass(frozen=True)
class BranchAnalysis:
  """Local CBS per (size, checkpoint) and the per-k excess tests behind it; batches in tokens."""

  cbs: pd.DataFrame  # CBS_COLUMNS
  excess: pd.DataFrame  # EXCESS_COLUMNS


def analyze_branches(branches: pd.DataFrame, epsilon: float = DEFAULT_EPSILON,
                     alpha: float = DEFAULT_ALPHA) -> BranchAnalysis:
  """Local CBS with a >= 1 - alpha interval per (size, checkpoint) from one row per branch run.

  Needs INPUT_COLUMNS; final_loss NaN or inf marks a diverged branch (a run not made has no row).
  """
  missing = [c for c in INPUT_COLUMNS if c not in branches.columns]
  if missing:
    raise ValueError(f"branch table lacks columns {missing}")
  rows, excess_rows = [], []
  size_order = pd.factorize(branches["size"])[0]  # sizes as given: names sort badly, "10m" < "3m"
  col = {c: branches[c].to_numpy() for c in INPUT_COLUMNS}  # numpy per group: pandas is slow
  groups = branches.groupby([size_order, branches["checkpoint_step"]]).indices
  for (_, step), index in sorted(groups.items()):
    size, where = col["size"][index[0]], f"size {col['size'][index[0]]}, checkpoint step {step}"
    ks, reps = col["k"][index].astype(float), col["replicate"][index]
    k_vals, k_idx = np.unique(ks, return_inverse=True)
    r_vals, r_idx = np.unique(reps, return_inverse=True)
    cell = r_idx * len(k_vals) + k_idx
    if len(np.unique(cell)) < len(cell):
      dup = pd.Series(cell).duplicated().to_numpy().argmax()
      raise ValueError(f"{where}: more than one run for k = {ks[dup]:g}, replicate {reps[dup]}")
    batch_tokens = col["batch_tokens"][index].astype(float)
    if not (ks == 1).any():
      raise ValueError(f"{where}: no k = 1 branch to compare with")
    batch = float(batch_tokens[ks == 1][0])
    if not np.allclose(batch_tokens, ks * batch, rtol=1e-6):
      raise ValueError(f"{where}: batch_tokens is not k times the k = 1 batch {batch:g}")
    final = col["final_loss"][index].astype(float)
    values = np.full((len(r_vals), len(k_vals)), np.nan)  # nan: a run not made
    values[r_idx, k_idx] = np.where(np.isfinite(final), final, np.inf)  # inf: diverged
    n_base_diverged = int(np.isinf(values[:, 0]).sum())
    if n_base_diverged:
      warnings.warn(f"{where}: {n_base_diverged} k = 1 branch(es) diverged; their replicates "
                    "are left out of every k", BranchWarning, stacklevel=2)
    res = local_cbs(k_vals, values, epsilon, alpha)
    if res.n_replicates < 2:
      warnings.warn(f"{where}: one usable replicate, so no interval (cbs_lo = cbs_hi = NaN)",
                    BranchWarning, stacklevel=2)
    head = {"size": size, "checkpoint_step": step,
            "checkpoint_tokens": float(col["checkpoint_tokens"][index[0]]),
            "ref_loss": float(col["ref_loss"][index[0]])}
    flag = NO_INTERVAL if res.n_replicates < 2 else LOWER_BOUND if np.isinf(res.k_hi) else ""
    rows.append({**head, "batch_tokens": batch, "epsilon": epsilon, "alpha": alpha,
                 "cbs": res.k * batch, "cbs_lo": res.k_lo * batch, "cbs_hi": res.k_hi * batch,
                 "n_replicates": res.n_replicates, "k_max": float(res.ks[-1]), "flag": flag})
    for i, k in enumerate(res.ks):
      excess_rows.append({
          "size": size, "checkpoint_step": step, "ref_loss": head["ref_loss"], "k": float(k),
          "batch_tokens": k * batch, "n": int(res.n[i]), "n_diverged": int(res.n_diverged[i]),
          "mean_excess": res.mean_excess[i], "excess_lo": res.excess_lo[i],
          "excess_hi": res.excess_hi[i], "decision": res.decision[i]})
  cbs = pd.DataFrame(rows, columns=list(CBS_COLUMNS))
  excess = pd.DataFrame(excess_rows, columns=list(EXCESS_COLUMNS))
  return BranchAnalysis(cbs=cbs, excess=excess)


def curve_rows(table: pd.DataFrame, method: str | None = None) -> pd.DataFrame:
  """CBS(L) rows (CURVE_COLUMNS, tokens) from analyze_branches' cbs or the scan's critical table.

  Branch tables give loss = ref_loss (method "branch"); a scan table (fit.fit_targets, columns
  target/b_crit/b_crit_lo/b_crit_hi) gives loss = target (method "scan"). Sizes keep their order;
  within one, loss falls (the order training visits it); open_above marks cbs_hi = inf.
  """
  if "ref_loss" in table.columns:
    out = pd.DataFrame({"method": method or "branch", "size": table["size"],
                        "loss": table["ref_loss"], "cbs": table["cbs"],
                        "cbs_lo": table["cbs_lo"], "cbs_hi": table["cbs_hi"]})
  elif "b_crit" in table.columns:
    out = pd.DataFrame({"method": method or "scan", "size": table["size"],
                        "loss": table["target"], "cbs": table["b_crit"],
                        "cbs_lo": table["b_crit_lo"], "cbs_hi": table["b_crit_hi"]})
  else:
    raise ValueError("expected analyze_branches(...).cbs (ref_loss, cbs, ...) or a scan critical "
                     f"table (target, b_crit, ...); got columns {list(table.columns)}")
  out = out.astype({"loss": float, "cbs": float, "cbs_lo": float, "cbs_hi": float})
  out["open_above"] = np.isposinf(out["cbs_hi"].to_numpy())
  out["_size"] = pd.factorize(out["size"])[0]  # sizes in the order given, as analyze_branches
  out = out.sort_values(["_size", "loss"], ascending=[True, False], kind="stable")
  return out.reset_index(drop=True)[list(CURVE_COLUMNS)]
