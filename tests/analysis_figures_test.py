"""Tests for bscan.analysis.figures: the two figures' axes, labels and files."""

import dataclasses
import warnings

import matplotlib

matplotlib.use("Agg")

from matplotlib import pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from bscan.analysis import figures  # noqa: E402
from bscan.analysis import pipeline  # noqa: E402
from bscan.analysis import synthetic  # noqa: E402


@pytest.fixture(scope="module")
def result():
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    runs = synthetic.simulate_runs(synthetic.DEMO_SCAN)
  return pipeline.analyze(runs, targets=synthetic.DEMO_SCAN.targets)


def test_batch_scan_figure(result):
  fig = figures.plot_batch_scan(result)
  panels = [ax for ax in fig.axes if ax.get_xlabel() == "step"]
  assert [ax.get_title() for ax in panels] == ["3m (N = 3.2M)", "10m (N = 10M)"]
  for ax in panels:
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert ax.get_ylabel() == "tokens processed"
    labels = {t.get_text() for t in ax.texts}
    assert {"1k", "64k", "L=1.6", "L=2.2"} <= labels
  assert any(ax.get_ylabel() == "eval loss (nats/token)" for ax in fig.axes)  # colour bar
  plt.close(fig)


def test_critical_batch_figure(result):
  fig = figures.plot_critical_batch(result, kaplan=True)
  ax = fig.axes[0]
  assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
  lo, hi = ax.get_xlim()
  assert lo > hi  # loss decreases to the right
  assert ax.get_ylabel() == "critical batch size (tokens)"
  legend = " ".join(t.get_text() for t in ax.get_legend().get_texts())
  assert "fit: B_crit" in legend and "α_B" in legend
  assert "Kaplan et al. 2020" in legend and "GPT-2" in legend
  assert "noise scale B_simple" in legend and "B_crit, 3m (N = 3.2M)" in legend
  y_lo, y_hi = ax.get_ylim()
  assert y_hi < 1e6  # Kaplan's line (1e7 tokens here) must not stretch the axis
  plt.close(fig)


def test_save_figure_writes_png_and_pdf(result, tmp_path):
  fig = figures.plot_critical_batch(result)
  paths = figures.save_figure(fig, tmp_path / "sub" / "fig")
  plt.close(fig)
  assert [p.name for p in paths] == ["fig.png", "fig.pdf"]
  assert paths[0].read_bytes()[:4] == b"\x89PNG" and paths[1].read_bytes()[:4] == b"%PDF"


def test_formatting_helpers():
  assert figures.fmt_tokens(65536) == "64k" and figures.fmt_tokens(2**21) == "2M"
  assert figures.fmt_tokens(3000) == "3k" and figures.fmt_count(3_200_000) == "3.2M"


def test_flagged_targets_are_hollow(result):
  critical = result.critical.copy()
  critical["lack_of_fit"] = critical["target"] == 2.0  # as if S(B) were no hyperbola there
  flagged = dataclasses.replace(result, critical=critical)
  fig = figures.plot_critical_batch(flagged)
  ax = fig.axes[0]
  hollow = [line for line in ax.lines if line.get_markerfacecolor() == "white"]
  assert len(hollow) == 2  # one flagged target per size
  assert all(abs(line.get_xdata()[0] / 2.0 - 1) < 0.01 for line in hollow)  # dodged by size
  assert figures.HOLLOW_LABEL in [t.get_text() for t in ax.get_legend().get_texts()]
  plt.close(fig)
  fig = figures.plot_batch_scan(flagged)
  labels = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
  assert figures.HOLLOW_LABEL in labels
  dotted = [line for ax in fig.axes for line in ax.lines if line.get_linestyle() == ":"]
  assert len(dotted) >= 2  # the flagged target's hyperbola in each panel, drawn dotted
  plt.close(fig)
