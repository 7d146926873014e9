"""Tests for bscan.analysis.comparison: every estimate of the critical batch size on one figure."""

import dataclasses
import warnings

import matplotlib

matplotlib.use("Agg")

from matplotlib import pyplot as plt  # noqa: E402
from matplotlib.text import Annotation  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from bscan.analysis import branches  # noqa: E402
from bscan.analysis import comparison  # noqa: E402
from bscan.analysis import figures  # noqa: E402
from bscan.analysis import noise  # noqa: E402
from bscan.analysis import pipeline  # noqa: E402
from bscan.analysis import synthetic  # noqa: E402

SCAN = synthetic.Scan(sizes=synthetic.DEFAULT_SIZES[1:2], batch_sequences=(8, 16, 32, 64, 128),
                      targets=(1.8, 1.9, 2.0, 2.1, 2.2), loss_noise=0.005, b_noise_every=3)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
  root = tmp_path_factory.mktemp("comparison")
  scan = synthetic.write_sweep(root / "scan", SCAN, messy=False)
  branch_dir = synthetic.write_branches(root / "cmp", SCAN)
  return pipeline.analyze([str(scan), str(branch_dir)])


def _legend(ax) -> str:
  return " ".join(t.get_text() for t in ax.get_legend().get_texts())


def test_two_panels_with_every_estimate_named(result):
  fig = comparison.plot_comparison(result, "3m")
  left, right = fig.axes
  assert left.get_xscale() == right.get_xscale() == "log"
  assert left.get_yscale() == right.get_yscale() == "log"
  lo, hi = left.get_xlim()
  assert lo > hi  # loss decreases to the right, as in Kaplan Fig. 10
  assert left.get_ylabel() == "batch size (tokens)" and left.get_title().startswith("3m (N = 3.2M)")
  legend = _legend(left)
  for name in ("scan B_crit = E_min/S_min, 95% interval",
               "branched local CBS (ε = 0.01 nats), 90% interval",
               "B_simple = tr Σ / |G|²: mean over 5 runs, min–max shaded",
               "B_noise = tr(HΣ) / GᵀHG: mean over 5 runs, min–max shaded"):
    assert name in legend, legend
  assert legend.index("scan B_crit") < legend.index("branched") < legend.index("B_simple")
  assert len(left.collections) >= 2  # the two shaded spreads
  assert right.get_xlabel().startswith("E_min") and right.get_ylabel() == "scan B_crit (tokens)"
  law = result.e_min_law["3m"]
  assert f"β = {law.beta:.2f} [{law.beta_ci[0]:.2f}, {law.beta_ci[1]:.2f}]" in _legend(right)
  plt.close(fig)


def test_lower_bounds_get_an_open_arrow_and_flagged_targets_are_hollow(result):
  cbs = result.branches.cbs.copy()
  cbs.loc[0, ["cbs_hi", "flag"]] = [np.inf, branches.LOWER_BOUND]
  critical = result.critical.copy()
  critical.loc[critical["target"] == 2.0, "lack_of_fit"] = True
  changed = dataclasses.replace(result, critical=critical,
                                branches=dataclasses.replace(result.branches, cbs=cbs))
  fig = comparison.plot_comparison(changed, "3m")
  left, right = fig.axes
  arrows = [t for t in left.texts if isinstance(t, Annotation) and t.arrow_patch is not None]
  assert len(arrows) == 1 and arrows[0].arrowprops["arrowstyle"] == "->"
  assert arrows[0].xy[1] > arrows[0].xyann[1]  # pointing up, from cbs_lo
  assert "lower bound only" in _legend(left) and figures.HOLLOW_LABEL in _legend(left)
  hollow = [line for line in left.lines + right.lines if line.get_markerfacecolor() == "white"]
  assert len(hollow) == 2  # the flagged target in each panel
  plt.close(fig)


def test_sizes_drawn(result):
  assert comparison.comparison_sizes(result) == ["3m"]  # branches and B_noise
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    plain = pipeline.analyze(synthetic.simulate_runs(synthetic.DEMO_SCAN),
                             targets=synthetic.DEMO_SCAN.targets)
  # No branches, no B_noise: one figure all the same, for the size with the most scan fits
  # (the larger one on a tie).
  assert comparison.comparison_sizes(plain) == ["10m"]
  fig = comparison.plot_comparison(plain)
  assert len(fig.axes) == 2 and "branched" not in _legend(fig.axes[0])
  # B_simple is drawn only at losses that at least half of the size's runs reach.
  line = next(l for l in fig.axes[0].lines if l.get_label().startswith("B_simple"))
  runs = plain.runs[plain.runs["size"] == "10m"]
  reached = noise.noise_at_losses(runs, line.get_xdata(), plain.window, plain.min_step)
  counts = reached.groupby("loss")["b_simple"].count()
  assert len(counts) == len(line.get_xdata()) and counts.min() >= len(runs) / 2, counts
  plt.close(fig)
  both = comparison.plot_comparison(plain, ["3m", "10m"])
  assert [ax.get_title().split(" ")[0] for ax in both.axes[::2]] == ["3m", "10m"]
  plt.close(both)


def test_one_target_has_no_law_to_draw(result):
  one = dataclasses.replace(result, critical=result.critical.iloc[:1], e_min_law={})
  fig = comparison.plot_comparison(one, "3m")
  assert "no power law" in " ".join(t.get_text() for t in fig.axes[1].texts)
  plt.close(fig)
