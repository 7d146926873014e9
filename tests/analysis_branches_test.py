"""Tests for bscan.analysis.branches: local CBS from branched runs, and its interval's coverage."""

import warnings

import numpy as np
import pandas as pd
import pytest

from bscan.analysis import branches

KS = np.array([1, 2, 4, 8, 16, 32], float)
EPS = 0.01  # nats
BATCH = 65536.0  # reference batch, tokens
LOSS = 3.0


def excess_curve(k_star: float, power: float = 2.0) -> np.ndarray:
  """True mean excess δ(k) = ε (log k / log k*)^power: δ(1) = 0, rising, δ(k*) = ε."""
  return EPS * (np.log2(KS) / np.log2(k_star)) ** power


def true_cbs(delta: np.ndarray) -> float:
  """Largest tested k with δ(k) <= ε."""
  return float(KS[np.flatnonzero(delta <= EPS)[-1]])


def draw_losses(rng: np.random.Generator, delta: np.ndarray, n_draws: int, n_rep: int,
                sigma_run: float, sigma_seed: float = 2 * EPS) -> np.ndarray:
  """Final losses (draws, replicates, ks): a seed effect shared by a replicate's k's, plus noise."""
  # the seed effect (data order, init) drifts a little with k, so pairing removes most of it
  seed = rng.normal(0, sigma_seed, (n_draws, n_rep, 1)) * (1 + 0.02 * np.log2(KS))
  return LOSS + delta + seed + rng.normal(0, sigma_run, (n_draws, n_rep, len(KS)))


def branch_table(losses: np.ndarray, size: str = "10m") -> pd.DataFrame:
  """Tidy branch rows, one checkpoint per draw, as the branch-run loader produces."""
  n_draws, n_rep, n_k = losses.shape
  d, r, i = np.meshgrid(np.arange(n_draws), np.arange(n_rep), np.arange(n_k), indexing="ij")
  d, r, i = d.ravel(), r.ravel(), i.ravel()
  return pd.DataFrame({
      "size": size, "checkpoint_step": 1000 * (d + 1), "checkpoint_tokens": 1000 * (d + 1) * BATCH,
      "ref_loss": LOSS + 1.0 / (d + 1), "k": KS[i].astype(int), "batch_tokens": KS[i] * BATCH,
      "replicate": r, "final_loss": losses.reshape(-1)})


def coverage(cbs: pd.DataFrame, c_star: float) -> tuple[float, float]:
  """Fraction of intervals that hold c* · B, and their median width cbs_hi / cbs_lo."""
  covered = (cbs["cbs_lo"] <= c_star * BATCH) & (c_star * BATCH <= cbs["cbs_hi"])
  return float(covered.mean()), float(np.median(cbs["cbs_hi"] / cbs["cbs_lo"]))


# (name, k*, replicates, run noise in nats, largest median width hi/lo allowed)
SCENARIOS = [
    ("between-grid-points", 6.0, 4, 0.1 * EPS, 2.0),
    ("on-grid-point", 8.0, 4, 0.1 * EPS, 2.0),
    ("noisy-3-replicates", 11.0, 3, 0.1 * EPS, 4.0),
    ("noisy-5-replicates", 11.0, 5, 0.3 * EPS, 4.0),
]


@pytest.mark.parametrize("name,k_star,n_rep,sigma_run,max_width", SCENARIOS,
                         ids=[s[0] for s in SCENARIOS])
def test_interval_covers_known_cbs(name, k_star, n_rep, sigma_run, max_width):
  rng = np.random.default_rng(sum(map(ord, name)))
  delta = excess_curve(k_star)
  c_star = true_cbs(delta)
  n_draws = 300
  cbs = branches.analyze_branches(branch_table(draw_losses(rng, delta, n_draws, n_rep,
                                                           sigma_run))).cbs
  assert len(cbs) == n_draws
  rate, width = coverage(cbs, c_star)
  assert rate >= 0.9, f"{name}: interval held c* = {c_star:g}·B in {rate:.1%} of {n_draws} draws"
  assert width <= max_width, f"{name}: median width cbs_hi/cbs_lo = {width:g} > {max_width:g}"
  assert ((cbs["cbs_lo"] <= cbs["cbs"]) & (cbs["cbs"] <= cbs["cbs_hi"])).all()
  assert (cbs["n_replicates"] == n_rep).all()


def test_coverage_holds_in_the_worst_case():
  # δ sits exactly at ε from k = 2 to 16 (each k can be falsely "beyond") and just above it at
  # 32 (can be falsely "within"): every Bonferroni test is at its edge, so coverage nears 1 - α.
  rng = np.random.default_rng(0)
  delta = np.array([0, 1, 1, 1, 1, 1.02], float) * EPS
  n_draws = 1000
  losses = draw_losses(rng, delta, n_draws, 4, 0.2 * EPS)
  hits = 0
  for draw in losses:
    res = branches.local_cbs(KS, draw, EPS, alpha=0.1)
    hits += res.k_lo <= 16 <= res.k_hi
  rate = hits / n_draws
  # 3 binomial s.e. below the nominal 90%, so a correct method fails this ~0.1% of the time
  assert rate >= 0.9 - 3 * np.sqrt(0.09 / n_draws), (
      f"worst case: interval held c* = 16·B in {rate:.1%} of {n_draws} draws")


def test_noise_free_curve_is_exact():
  losses = LOSS + excess_curve(6.0)[None, :] + np.array([[0.0], [0.01], [-0.02]])
  res = branches.local_cbs(KS, losses, EPS)
  assert (res.k, res.k_lo, res.k_hi) == (4, 4, 4)
  assert res.decision == ("", "within", "within", "beyond", "beyond", "beyond")
  np.testing.assert_allclose(res.mean_excess, excess_curve(6.0), atol=1e-12)


def test_table_columns():
  rng = np.random.default_rng(1)
  result = branches.analyze_branches(branch_table(draw_losses(rng, excess_curve(6.0), 3, 4,
                                                              0.1 * EPS)), epsilon=EPS)
  assert list(result.cbs.columns) == list(branches.CBS_COLUMNS)
  assert list(result.excess.columns) == list(branches.EXCESS_COLUMNS)
  assert len(result.excess) == 3 * len(KS)
  row = result.cbs.iloc[0]
  assert row["epsilon"] == EPS and row["alpha"] == 0.1 and row["batch_tokens"] == BATCH
  assert row["k_max"] == 32 and row["flag"] == ""
  assert result.cbs["checkpoint_step"].tolist() == [1000, 2000, 3000]
  base = result.excess[result.excess["k"] == 1]
  assert (base["mean_excess"] == 0).all() and (base["decision"] == "").all()


def test_diverged_branch_counts_as_beyond():
  # every replicate is well within at k = 8 save one that diverged: 8 is beyond, and so is 16
  losses = LOSS + np.zeros((4, len(KS))) + 1e-4 * np.arange(4)[:, None]
  for bad in (np.nan, np.inf):
    losses_bad = losses.copy()
    losses_bad[2, 3] = bad
    cbs = branches.analyze_branches(branch_table(losses_bad[None])).cbs.iloc[0]
    assert (cbs["cbs"], cbs["cbs_lo"], cbs["cbs_hi"]) == (4 * BATCH, 4 * BATCH, 4 * BATCH)
  res = branches.local_cbs(KS, losses_bad)
  assert res.n_diverged[3] == 1 and np.isposinf(res.mean_excess[3])
  assert res.decision[3] == "beyond"


def test_diverged_baseline_drops_its_replicate():
  losses = LOSS + np.tile(excess_curve(6.0), (4, 1)) + 1e-4 * np.arange(4)[:, None]
  losses[1, 0] = np.nan
  with pytest.warns(branches.BranchWarning, match="1 k = 1 branch"):
    cbs = branches.analyze_branches(branch_table(losses[None])).cbs.iloc[0]
  assert cbs["n_replicates"] == 3 and cbs["cbs"] == 4 * BATCH


def test_single_replicate_has_no_interval():
  losses = LOSS + excess_curve(6.0)[None, :]
  with pytest.warns(branches.BranchWarning, match="no interval"):
    cbs = branches.analyze_branches(branch_table(losses[None])).cbs.iloc[0]
  assert cbs["cbs"] == 4 * BATCH and cbs["n_replicates"] == 1
  assert np.isnan(cbs["cbs_lo"]) and np.isnan(cbs["cbs_hi"]) and cbs["flag"] == "no_interval"


def test_all_within_gives_a_lower_bound():
  losses = LOSS + 1e-4 * np.arange(4)[:, None] + 1e-5 * np.arange(len(KS))[None, :]
  cbs = branches.analyze_branches(branch_table(losses[None])).cbs.iloc[0]
  assert cbs["cbs"] == cbs["cbs_lo"] == 32 * BATCH
  assert np.isposinf(cbs["cbs_hi"]) and cbs["flag"] == "lower_bound"


def test_beyond_at_k2_gives_the_reference_batch():
  losses = LOSS + 1e-4 * np.arange(4)[:, None] + 3 * EPS * (KS > 1)[None, :]
  cbs = branches.analyze_branches(branch_table(losses[None])).cbs.iloc[0]
  assert (cbs["cbs"], cbs["cbs_lo"], cbs["cbs_hi"]) == (BATCH, BATCH, BATCH)


def test_missing_runs_coarsen_the_grid():
  losses = LOSS + np.tile(excess_curve(6.0), (4, 1)) + 1e-4 * np.arange(4)[:, None]
  table = branch_table(losses[None])
  table = table[table["k"] != 4]  # k = 4 never run
  table = table[~((table["k"] == 8) & (table["replicate"] == 0))]  # one k = 8 run missing
  result = branches.analyze_branches(table)
  cbs = result.cbs.iloc[0]
  assert (cbs["cbs"], cbs["cbs_lo"], cbs["cbs_hi"]) == (2 * BATCH, 2 * BATCH, 2 * BATCH)
  assert result.excess["k"].tolist() == [1, 2, 8, 16, 32]
  assert result.excess["n"].tolist() == [4, 4, 3, 4, 4]


@pytest.mark.parametrize("change,message", [
    (lambda t: t[t["k"] != 1], "no k = 1 branch"),
    (lambda t: pd.concat([t, t.iloc[:1]]), "more than one run"),
    (lambda t: t.assign(batch_tokens=t["batch_tokens"] * (1 + (t["k"] == 4))), "k times"),
    (lambda t: t.drop(columns="ref_loss"), "lacks columns"),
])
def test_bad_tables_raise(change, message):
  table = branch_table(LOSS + np.zeros((1, 2, len(KS))))
  with pytest.raises(ValueError, match=message):
    branches.analyze_branches(change(table))


@pytest.mark.parametrize("ks,losses,kwargs,message", [
    ([2, 4], np.zeros((2, 2)), {}, "start at 1"),
    ([1, 4, 2], np.zeros((2, 3)), {}, "ascending"),
    ([1, 2], np.zeros((2, 3)), {}, "shape"),
    ([1, 2], np.zeros((2, 2)), {"epsilon": 0.0}, "epsilon"),
    ([1, 2], np.zeros((2, 2)), {"alpha": 10.0}, "alpha"),
    ([1, 2], np.full((2, 2), np.nan), {}, "no replicate"),
])
def test_local_cbs_bad_arguments_raise(ks, losses, kwargs, message):
  with pytest.raises(ValueError, match=message):
    branches.local_cbs(ks, losses, **kwargs)


def test_curve_rows_from_branches_and_scan():
  losses = np.stack([LOSS + 1e-4 * np.arange(3)[:, None] + 3 * EPS * (KS > 4)[None, :],
                     LOSS + 1e-4 * np.arange(3)[:, None] + 0 * KS[None, :]])
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no warning for a clean table
    cbs = branches.analyze_branches(pd.concat([branch_table(losses, "30m"),
                                               branch_table(losses[:1], "3m")])).cbs
  rows = branches.curve_rows(cbs)
  assert list(rows.columns) == list(branches.CURVE_COLUMNS)
  assert rows["size"].tolist() == ["30m", "30m", "3m"]  # sizes as given, not as strings sort
  assert rows["loss"].tolist() == [LOSS + 1.0, LOSS + 0.5, LOSS + 1.0]  # loss falls
  assert rows["open_above"].tolist() == [False, True, False]
  assert (rows["method"] == "branch").all()
  scan = pd.DataFrame({"size": ["3m", "3m"], "target": [2.2, 2.4], "b_crit": [1e5, 5e4],
                       "b_crit_lo": [8e4, 4e4], "b_crit_hi": [np.inf, 7e4]})
  rows = branches.curve_rows(scan)
  assert rows["loss"].tolist() == [2.4, 2.2] and rows["open_above"].tolist() == [False, True]
  assert (rows["method"] == "scan").all()
  with pytest.raises(ValueError, match="expected"):
    branches.curve_rows(pd.DataFrame({"x": [1]}))
