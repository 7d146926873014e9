"""Tests for bscan.analysis.report and the CLI: figures, critical_batch.csv and summary.json."""

import json
import subprocess
import sys

import pandas as pd

from bscan import workdir as wd
from bscan.analysis import synthetic

SCAN = synthetic.Scan(sizes=synthetic.DEFAULT_SIZES[1:2], batch_sequences=(16, 32, 64, 128, 256),
                      targets=(1.8, 2.0, 2.2), run_noise=0.0, loss_noise=0.003)
RUNNING = "3m/b16/lr1e-3/s0"


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "bscan.analysis", *map(str, args)],
                        capture_output=True, text=True, timeout=300)


def _still_running(root, at_loss):
  """Rewinds the smallest batch's run to when its true loss was `at_loss`, status 'running'."""
  run = root / RUNNING
  rows, _ = wd.read_metrics(run)
  last = float(SCAN.truth.steps(at_loss, 16 * SCAN.seq_len, SCAN.sizes[0]))
  kept = [r for r in rows if r[wd.Col.STEP] <= last]
  (run / wd.METRICS).unlink()
  writer = wd.MetricsWriter(run, tensorboard=False)
  for row in kept:
    writer.write(row)
  writer.close()
  wd.write_status(run, wd.RUNNING, "", kept[-1][wd.Col.STEP], 0)


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
  assert summary["targets_source"] == "sweep.json" and summary["pending"] == []
  table = proc.stdout[proc.stdout.index("B_crit per model size and target"):].splitlines()
  assert len(table) == 2 + 12 and table[1].split()[:3] == ["size", "target", "B_crit"]
  assert table[-1].split()[:2] == ["10m", "2.2"] and "[" in table[-1]  # B_crit with interval


def test_cli_fits_reached_targets_and_names_the_runs_the_rest_wait_for(tmp_path):
  root = synthetic.write_sweep(tmp_path / "sweep", SCAN, messy=False)
  _still_running(root, at_loss=1.9)  # has reached 2.2 and 2.0, not 1.8
  proc = _cli(f"--workdir={root}", f"--out={tmp_path / 'out'}")
  assert proc.returncode == 0, proc.stderr
  assert (f"pending: size 3m, targets 1.8: waiting for 1 unfinished run(s): {RUNNING} (running)"
          in proc.stdout)
  summary = json.loads((tmp_path / "out" / "summary.json").read_text())
  assert summary["pending"] == [{"size": "3m", "target": 1.8, "runs": [RUNNING]}]
  assert summary["runs_by_status"] == {"done": 4, "running": 1}
  assert pd.read_csv(tmp_path / "out" / "critical_batch.csv")["target"].tolist() == [2.0, 2.2]
  table = proc.stdout.splitlines()[-3:]  # the table comes last, one row per size and target
  assert table[0].split()[:3] == ["3m", "1.8", "pending"] and RUNNING in table[0]
  assert table[1].split()[:2] == ["3m", "2.0"] and table[1].split()[-1] == "5"


def test_cli_exits_1_when_every_target_is_still_pending(tmp_path):
  root = synthetic.write_sweep(tmp_path / "sweep", SCAN, messy=False)
  _still_running(root, at_loss=2.3)  # has reached no target yet
  proc = _cli(f"--workdir={root}", f"--out={tmp_path / 'out'}")
  assert proc.returncode == 1
  assert proc.stderr.splitlines()[-1].startswith("error: no target can be fitted yet")
  assert RUNNING in proc.stderr.splitlines()[-1] and not (tmp_path / "out").exists()
  assert "pending: size 3m, targets 1.8, 2.0, 2.2" in proc.stdout


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
  proc = _cli(f"--workdir={tmp_path}", f"--out={tmp_path / 'out'}")
  assert proc.returncode == 2 and "error: no runs found" in proc.stderr


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
