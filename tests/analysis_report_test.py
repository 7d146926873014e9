"""Tests for bscan.analysis.report and the CLI: figures, critical_batch.csv and summary.json."""

import json
import subprocess
import sys

import pandas as pd

from bscan.analysis import synthetic


def test_cli_on_a_fixture_sweep(tmp_path):
  sweep = synthetic.write_demo_sweep(tmp_path / "sweep")
  out = tmp_path / "out"
  proc = subprocess.run([sys.executable, "-m", "bscan.analysis", f"--workdir={sweep}",
                         f"--out={out}", "--kaplan"], capture_output=True, text=True, check=True)
  assert "pooled: B_crit = " in proc.stdout
  assert "RunWarning" in proc.stderr  # the messy runs are reported, not fatal
  for name in ("batch_size_scan", "critical_batch_vs_loss"):
    assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / f"{name}.pdf").read_bytes()[:4] == b"%PDF"
  table = pd.read_csv(out / "critical_batch.csv")
  for column in ("size", "target", "s_min", "s_min_lo", "s_min_hi", "e_min", "e_min_lo",
                 "e_min_hi", "b_crit", "b_crit_lo", "b_crit_hi", "n_batch_sizes"):
    assert column in table.columns
  assert len(table) == 12 and (table["n_batch_sizes"] >= 3).all()
  summary = json.loads((out / "summary.json").read_text())
  assert set(summary["power_law"]) == {"pooled", "3m", "10m"}
  pooled = summary["power_law"]["pooled"]
  for key in ("b_star", "b_star_ci", "alpha_b", "alpha_b_ci", "exponent", "formula"):
    assert key in pooled
  assert abs(pooled["alpha_b"] - synthetic.Truth().alpha_b) < 0.05
  assert summary["targets_source"] == "sweep.json"


def test_write_report_with_given_targets(tmp_path):
  import matplotlib
  matplotlib.use("Agg")
  from bscan.analysis import pipeline, report
  runs = synthetic.simulate_runs(synthetic.DEMO_SCAN)
  result = pipeline.analyze(runs, targets=[1.8, 2.0, 2.2])
  paths = report.write_report(result, tmp_path)
  assert sorted(p.name for p in paths) == sorted([
      "batch_size_scan.png", "batch_size_scan.pdf", "critical_batch_vs_loss.png",
      "critical_batch_vs_loss.pdf", "critical_batch.csv", "summary.json"])
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["targets"] == [1.8, 2.0, 2.2] and summary["targets_source"] == "given"


def test_cli_fails_cleanly_without_runs(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "bscan.analysis", f"--workdir={tmp_path}",
                         f"--out={tmp_path / 'out'}"], capture_output=True, text=True)
  assert proc.returncode != 0 and "error: no runs found" in proc.stderr


def test_csv_columns_are_documented(tmp_path):
  import matplotlib
  matplotlib.use("Agg")
  from bscan.analysis import fit, pipeline, report
  result = pipeline.analyze(synthetic.simulate_runs(synthetic.DEMO_SCAN), targets=[1.8, 2.0])
  report.write_report(result, tmp_path)
  columns = pd.read_csv(tmp_path / "critical_batch.csv").columns.tolist()
  assert columns == list(fit.FIT_COLUMNS)
  documented = report.__doc__.split("critical_batch.csv columns")[1]
  for column in columns:
    assert f"{column}:" in documented, column
  assert "tokens" in documented
