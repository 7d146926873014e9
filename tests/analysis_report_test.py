"""Tests for bscan.analysis.report and the CLI: figures, critical_batch.csv and summary.json."""

import json
import re
import subprocess
import sys

import pandas as pd
import pytest

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
  # no branches, no B_noise: the comparison figure shows the first size's B_crit and B_simple
  assert sorted(p.name for p in paths) == sorted([
      "batch_size_scan.png", "batch_size_scan.pdf", "critical_batch_vs_loss.png",
      "critical_batch_vs_loss.pdf", "critical_batch_comparison.png",
      "critical_batch_comparison.pdf", "critical_batch.csv", "lack_of_fit.csv",
      "noise_at_targets.csv", "e_min_law.csv", "summary.json"])
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["targets"] == [1.8, 2.0, 2.2] and summary["targets_source"] == "given"


def test_cli_fails_cleanly_without_runs(tmp_path):
  proc = _cli(f"--workdir={tmp_path}", f"--out={tmp_path / 'out'}")
  assert proc.returncode == 2 and "error: no runs found" in proc.stderr


def test_csv_columns_are_documented(tmp_path):
  import matplotlib
  matplotlib.use("Agg")
  from bscan.analysis import fit, lackoffit, pipeline, report
  result = pipeline.analyze(synthetic.simulate_runs(synthetic.DEMO_SCAN), targets=[1.8, 2.0])
  report.write_report(result, tmp_path)
  columns = pd.read_csv(tmp_path / "critical_batch.csv").columns.tolist()
  assert columns == [*fit.FIT_COLUMNS, *lackoffit.FLAG_COLUMNS]
  _check_documented(tmp_path)


def _check_documented(out):
  """Every column of every CSV in `out` is named in its section of report's docstring."""
  from bscan.analysis import report
  csvs = sorted(out.glob("*.csv"))
  sections = report.__doc__.split(" columns:")
  for path in csvs:
    owner = [i for i, part in enumerate(sections[:-1]) if part.endswith(path.name)]
    assert owner, f"{path.name} has no 'columns:' section in bscan/analysis/report.py"
    documented = sections[owner[0] + 1].rsplit("\n\n", 1)[0]
    for column in pd.read_csv(path).columns:
      assert re.search(rf"\b{column}[:,]", documented), (path.name, column)
  assert "tokens" in sections[1]
  return [p.name for p in csvs]


COMPARE = synthetic.Scan(sizes=synthetic.DEFAULT_SIZES[1:2], batch_sequences=(8, 16, 32, 64, 128),
                         targets=(1.8, 1.9, 2.0, 2.1, 2.2), loss_noise=0.005, b_noise_every=3)


@pytest.fixture(scope="module")
def compare_cli(tmp_path_factory):
  """The CLI on a scan sweep and a branch sweep together, with the default epsilon and alpha."""
  root = tmp_path_factory.mktemp("compare_cli")
  scan = synthetic.write_sweep(root / "scan", COMPARE, messy=False)
  branch_dir = synthetic.write_branches(root / "cmp", COMPARE)
  proc = _cli(f"--workdir={scan},{branch_dir}", f"--out={root / 'out'}")
  assert proc.returncode == 0, proc.stderr
  return proc, root / "out"


def test_cli_on_scan_and_branches_writes_every_table_and_the_comparison(compare_cli):
  from bscan.analysis import branches
  proc, out = compare_cli
  for ext, magic in (("png", b"\x89PNG"), ("pdf", b"%PDF")):
    assert (out / f"critical_batch_comparison.{ext}").read_bytes()[:4] == magic
  assert _check_documented(out) == [
      "branch_cbs.csv", "branch_excess.csv", "branch_runs.csv", "critical_batch.csv",
      "e_min_law.csv", "lack_of_fit.csv", "noise_at_targets.csv"]
  summary = json.loads((out / "summary.json").read_text())
  assert summary["branches"]["epsilon"] == branches.DEFAULT_EPSILON  # the CLI's defaults
  assert summary["branches"]["alpha"] == branches.DEFAULT_ALPHA
  checkpoints = summary["branches"]["checkpoints"]
  assert len(checkpoints) == 3 and all(c["n_replicates"] == 4 for c in checkpoints)
  assert pd.read_csv(out / "branch_runs.csv").shape[0] == summary["branches"]["n_branch_runs"]
  assert [p["target"] for p in summary["per_target"]] == list(COMPARE.targets)
  assert all(p["b_noise_n_runs"] == 5 and p["b_simple"] > 0 for p in summary["per_target"])
  assert "3m" in summary["e_min_law"] and "pooled" in summary["e_min_law"]


def test_cli_prints_the_numbers_of_summary_json(compare_cli):
  proc, out = compare_cli
  summary = json.loads((out / "summary.json").read_text())
  lines = proc.stdout.splitlines()
  law = summary["e_min_law"]["3m"]
  assert f"E_min law, 3m: {law['formula']} (tokens), beta = {law['beta']:.3f}" in proc.stdout
  head = lines.index("Branched local CBS per checkpoint (epsilon = 0.01 nats, 90% intervals; "
                     "tokens):")
  for point, line in zip(summary["branches"]["checkpoints"], lines[head + 2:head + 5]):
    cells = line.split()
    assert cells[:2] == ["3m", str(point["checkpoint_step"])]
    assert cells[3] == f"{point['ref_loss']:.4g}" and cells[7] == "4"  # replicates
    lo, hi = point["cbs_ci"]
    assert cells[4:7] == [f"{point['cbs']:.3g}", f"[{lo:.3g},", f"{hi:.3g}]"]
  table = lines[lines.index(next(x for x in lines if x.startswith("B_crit per model"))):]
  assert len(table) == 2 + len(COMPARE.targets)  # the B_crit table comes last
  for target, row in zip(summary["per_target"], table[2:]):
    assert row.split()[:2] == ["3m", str(target["target"])]
    assert f"  {target['lack_of_fit_p']:.2g}  " in row
    for name in ("b_simple", "b_noise"):
      lo, hi = target[f"{name}_range"]
      assert f"{target[name]:.2g} [{lo:.2g}, {hi:.2g}]" in row, (name, row)
