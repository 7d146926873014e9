"""Fixed batches against ramps (bscan.analysis.ramp): steps and tokens to a target from real
curves, the frontier, and the paired claim test, on data with known answers."""

import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest

from bscan.analysis import ramp as ramp_lib
from bscan.workdir import Col

S_MIN, B_CRIT, T = 300.0, 16.0, 128  # S(B) = S_min (1 + B_crit / B), B in sequences


def _rows(ramp_steps: list[float], ramp_tokens: float, scatter: float = 0.03) -> pd.DataFrame:
  """Fixed batches on the hyperbola (seed scatter in log S) and one ramp, three seeds."""
  rng = np.random.default_rng(0)
  rows = []
  for seed in range(3):
    for b in (4, 8, 16, 32, 64):
      s = S_MIN * (1 + B_CRIT / b) * math.exp(scatter * rng.standard_normal())
      rows.append({"mode": f"fixed {b}", "seed": seed, "size": "x", "seq_len": T,
                   "target": 2.2, "steps": s, "tokens": s * b * T, "overhead_tokens": 0.0,
                   "total_tokens": s * b * T, "batch_at_target": b})
    rows.append({"mode": "ramp", "seed": seed, "size": "x", "seq_len": T, "target": 2.2,
                 "steps": ramp_steps[seed], "tokens": ramp_tokens, "overhead_tokens": 0.0,
                 "total_tokens": ramp_tokens, "batch_at_target": 16})
  return pd.DataFrame(rows)


def test_frontier_recovers_the_hyperbola_and_its_steps_at_given_tokens():
  rows = _rows([500.0] * 3, 1e6, scatter=0.0)
  fit = ramp_lib.frontier(rows, 2.2)
  assert fit.b_crit == pytest.approx(B_CRIT * T, rel=1e-6)
  e_min = S_MIN * B_CRIT * T
  for b in (4.0, 10.0, 50.0):  # a fixed batch b uses E = S_min·b·T + E_min tokens
    assert ramp_lib.frontier_steps(fit, S_MIN * b * T + e_min) == pytest.approx(
        S_MIN * (1 + B_CRIT / b), rel=1e-6)
  assert math.isnan(ramp_lib.frontier_steps(fit, 0.9 * e_min))


def test_a_ramp_with_40_percent_fewer_steps_meets_the_claim():
  # Tokens 1.0M: fixed 8 (1.15M) is within 1.1×, fixed 16 (1.23M) is not; fixed 8 takes 900.
  rows = _rows([540.0, 520.0, 560.0], 1.05e6)
  c = ramp_lib.claim(rows, 2.2, "ramp")
  assert c.baseline == "fixed 8"
  assert c.steps_ratio == pytest.approx(0.6, rel=0.05) and c.ratio_hi < 0.7
  assert c.p_saving < 0.05 and c.met
  assert c.frontier_ratio < 0.8  # below what any one batch does at its tokens


def test_a_ramp_on_the_frontier_is_significantly_faster_but_not_by_30_percent():
  # 10% fewer steps than fixed 8, consistently: significant, but far from the claimed 30%.
  rows = _rows([810.0, 815.0, 805.0], 1.05e6, scatter=0.0)
  c = ramp_lib.claim(rows, 2.2, "ramp")
  assert c.baseline == "fixed 8" and c.steps_ratio == pytest.approx(0.9, rel=0.01)
  assert c.p_fewer < 0.01 and c.p_saving > 0.99 and not c.met
  table = ramp_lib.claims(rows, 2.2)
  assert list(table["mode"]) == ["ramp"] and not table["met"].any()


def test_no_fixed_batch_within_the_tokens_means_no_claim():
  rows = _rows([300.0] * 3, 3e5)  # fewer tokens than even batch 4 needs
  c = ramp_lib.claim(rows, 2.2, "ramp")
  assert c.baseline == "" and not c.met and math.isnan(c.steps_ratio)


def _run(mode: str, batch: list[int], loss: np.ndarray, overhead=None) -> dict:
  step = np.arange(1, len(loss) + 1, dtype=float)
  return {"ramp": "" if mode == "fixed" else mode, "batch_sequences": batch[0], "seed": 0,
          "size": "x", "seq_len": T, Col.STEP: step, Col.TRAIN_LOSS: loss,
          Col.TOKENS: np.cumsum(np.asarray(batch, float) * T), Col.BATCH: np.asarray(batch, float),
          Col.OVERHEAD_TOKENS: np.zeros(len(loss)) if overhead is None else overhead}


def test_per_run_reads_steps_and_tokens_from_each_runs_own_columns():
  """A noise-free curve L = 3 − step/100: 2.5 at step 50 (the log-step smoothing bends a line
  in step by 0.2% there). The ramp's 50 steps are 30 at 8 sequences and 20 at 16, so
  30·8·T + 20·16·T tokens, plus its overhead there."""
  loss = 3.0 - np.arange(1, 201) / 100.0
  batch = [8] * 30 + [16] * 170
  overhead = np.where(np.arange(1, 201) > 30, 4096.0, 0.0)
  runs = pd.DataFrame([_run("fixed", [8] * 200, loss), _run("branched", batch, loss, overhead)])
  rows = ramp_lib.per_run(runs, [2.5, 0.5])
  fixed, ramp = rows[rows["mode"] == "fixed 8"], rows[rows["mode"] == "branched"]
  assert fixed["steps"].iloc[0] == pytest.approx(50, rel=3e-3)
  assert fixed["tokens"].iloc[0] == pytest.approx(50 * 8 * T, rel=3e-3)
  assert ramp["tokens"].iloc[0] == pytest.approx((30 * 8 + 20 * 16) * T, rel=3e-3)
  assert ramp["total_tokens"].iloc[0] == pytest.approx((30 * 8 + 20 * 16) * T + 4096, rel=3e-3)
  assert ramp["batch_at_target"].iloc[0] == 16
  assert np.isnan(rows[rows["target"] == 0.5]["steps"]).all()  # never reached
  assert ramp_lib.lowest_common_target(rows) == 2.5
  summary = ramp_lib.summary(rows)
  assert list(summary["mode"][summary["target"] == 2.5]) == ["fixed 8", "branched"]


def _hyperbola_rows(s_min: dict[float, float], b_crit: dict[float, float]) -> pd.DataFrame:
  """Noise-free fixed batches at each target: S = S_min(L)(1 + B_crit(L)/B), B in tokens."""
  rows = []
  for target in s_min:
    for b in (4, 8, 16, 32, 64):
      s = s_min[target] * (1 + b_crit[target] / (b * T))
      rows.append({"mode": f"fixed {b}", "seed": 0, "seq_len": T, "target": target,
                   "steps": s, "total_tokens": s * b * T})
  return pd.DataFrame(rows)


def test_ideal_ramp_gains_nothing_when_the_critical_batch_is_constant():
  rows = _hyperbola_rows({2.5: 100.0, 2.2: 300.0}, {2.5: 2000.0, 2.2: 2000.0})
  ideal = ramp_lib.ideal_ramp(rows, [2.5, 2.2])
  assert ideal.rho == pytest.approx(1.0, rel=1e-6)
  assert ideal.steps_at_equal_tokens == pytest.approx(1.0, rel=1e-6)
  assert ideal.steps_vs_slack > 1.0  # a fixed batch given 10% more tokens is faster


def test_ideal_ramp_from_a_critical_batch_that_grows_100_fold():
  """S_min 100 steps at B_crit 100 tokens, then 100 more at 10,000 (geometric mean 1,000 on
  the second stretch): rho = (10·100 + √1000·100)² / (200 · (100·100 + 1000·100))."""
  rows = _hyperbola_rows({2.5: 100.0, 2.2: 200.0}, {2.5: 100.0, 2.2: 10_000.0})
  want = (10 * 100 + math.sqrt(1000) * 100) ** 2 / (200 * (100 * 100 + 1000 * 100))
  ideal = ramp_lib.ideal_ramp(rows, [2.5, 2.2])
  assert ideal.rho == pytest.approx(want, rel=1e-6)
  assert ideal.steps_at_equal_tokens == pytest.approx((1 + want) / 2)
  # Against the fixed batch with 1.1× the tokens even this leaves 3%: it takes rho ≤ 0.4 for
  # the 30% the issue asks about.
  assert ideal.steps_vs_slack == pytest.approx(0.970, abs=0.002)


def test_the_scan_analysis_leaves_ramp_runs_out_and_says_so(tmp_path):
  from bscan import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from bscan.analysis import load  # pylint: disable=g-import-not-at-top
  for name, ramp in (("fixed", {}), ("ramp", {"schedule": "0:4,1k:8"})):
    (tmp_path / name).mkdir()
    workdir_lib.write_text_atomic(tmp_path / name / "config.json", json.dumps(
        {"config": {"seed": 0, "ramp": ramp}, "arg": "", "derived": {"batch_sequences": 4}}))
  with warnings.catch_warnings(record=True) as said:  # bare config.json files: no rows either
    warnings.simplefilter("always")
    scan, _ = load.load_sweeps(tmp_path)
    every = load.load_all_runs(tmp_path)
  assert list(scan["name"]) == ["fixed"]
  assert any("1 run(s) whose batch grows (ramp) are no scan points" in str(w.message)
             for w in said)
  assert sorted(every["ramp"]) == ["", "schedule 0:4,1k:8"]
