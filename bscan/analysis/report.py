"""Writes an analysis to a directory: the figures (PNG, PDF), a CSV per table, summary.json.

All batch sizes are in tokens (sequences x seq_len), steps in optimizer steps, losses in nats per
token of the sweep's tokenizer; summary.json records the same ("batch_unit", "loss_unit") along
with the targets, the smoothing window, min_step and the power-law fits.

critical_batch.csv columns: one row per (model size, target loss) S/E fit, S(B) = S_min + E_min/B
(bscan.analysis.fit); intervals are two-sided at summary.json's "confidence".
  size: model size name.
  n_params: non-embedding parameters.
  target: target loss L (nats/token).
  n_batch_sizes: distinct batch sizes that reach L (>= 3).
  n_points: points in the fit (one best run per batch size).
  s_min: S_min, steps to reach L at infinite batch size.
  s_min_lo: lower end of its interval; s_min_hi: upper end.
  e_min: E_min, tokens to reach L at vanishing batch size.
  e_min_lo: lower end of its interval (tokens); e_min_hi: upper end.
  b_crit: B_crit = E_min/S_min, critical batch size in tokens; inf when S_min <= 0 < E_min.
  b_crit_lo: lower end of its Fieller interval (tokens); b_crit_hi: upper end, inf when S_min
    is not significantly positive; both empty (NaN) when the interval has no positive part.
  log_b_crit_se: delta-method standard error of ln B_crit (weights the power-law fit).
  sigma_log_steps: residual s.d. of ln S about the fit (relative scatter of steps).
  b_crit_flag: empty; "unbounded" (b_crit_hi is inf); or "no_positive_b_crit" (S_min
    significantly negative: no positive B_crit fits, b_crit_lo/hi are NaN).
  batch_sizes: the batch sizes (tokens) in the fit, space-separated.
  lack_of_fit: True when S(B) departs from the hyperbola beyond the noise of the steps
    (bscan.analysis.lackoffit): the target is flagged instead of fitted through, and left out of
    the power laws (B_crit(L) and the E_min law).
  lack_of_fit_p: p-value of that chi^2 test (flagged below summary.json's lack_of_fit alpha);
    empty when untested.
  lack_of_fit_reason: "ok", "E falls with B", "S rises with B" or "residuals beyond noise".

lack_of_fit.csv columns: the test per (model size, target).
  size, n_params, target, n_batch_sizes: as above.
  chi2: sum of squared residuals of ln S over their s.d.; dof: its degrees of freedom.
  p_value, flagged, reason: the test's p-value, flag and reason (as lack_of_fit_* above).
  monotone_z: largest z-score of E falling or S rising between two batch sizes.

noise_at_targets.csv columns: per (model size, target), each run's smoothed noise scale where
its smoothed train loss first reaches the target (runs that never do are left out).
  size, n_params, target: as above.
  b_simple: geometric mean over runs of B_simple = tr Sigma/|G|^2 (tokens).
  b_simple_lo: the smallest run's value; b_simple_hi: the largest; b_simple_n_runs: runs.
  b_noise: the same for the Hessian-weighted B_noise = tr(H Sigma)/G^T H G (tokens).
  b_noise_lo, b_noise_hi, b_noise_n_runs: as for b_simple.

e_min_law.csv columns: B_crit = c * E_min^beta per model size and pooled (bscan.analysis.eminlaw).
  fit: model size or "pooled"; formula: the law as text.
  c: the coefficient (tokens^(1 - beta)); c_lo, c_hi: its interval.
  beta: the exponent; beta_lo, beta_hi: its interval; beta_se: its standard error.
  n_points: targets fitted; e_min_lo, e_min_hi: the range of E_min fitted (tokens).

With branch runs (bscan.analysis.branches; summary.json "branches" has epsilon and alpha):
branch_runs.csv columns: one row per branch run.
  size: model size. checkpoint_step: the reference's step it starts from.
  checkpoint_tokens: tokens the reference had trained there.
  ref_loss: the reference's smoothed train loss there. k: its batch / the reference's.
  batch_tokens: its batch (tokens). replicate: its replicate (data draw).
  final_loss: its last eval loss, empty when it diverged.
  workdir: its workdir; reference: the reference run's workdir.
branch_cbs.csv columns: the local critical batch size per (model size, checkpoint).
  size, checkpoint_step, checkpoint_tokens, ref_loss: as in branch_runs.csv.
  batch_tokens: the k = 1 batch. epsilon: loss excess allowed (nats). alpha: 1 - coverage.
  cbs: largest k * batch whose mean excess over k = 1 is within epsilon (tokens).
  cbs_lo, cbs_hi: its interval; cbs_hi is inf when every k tested is within (a lower bound).
  n_replicates: replicates compared. k_max: the largest k tested.
  flag: empty, "lower_bound" or "no_interval" (one replicate).
branch_excess.csv columns: the test at each (model size, checkpoint, k).
  size, checkpoint_step, ref_loss, k, batch_tokens: as above.
  n: replicate pairs; n_diverged: branches that diverged.
  mean_excess: mean final-loss excess over k = 1 (nats); excess_lo, excess_hi: its bounds.
  decision: "within", "beyond" or "undecided" (empty at k = 1).

(size, target) pairs that an unfinished run may still reach are not fitted: summary.json lists
them under "pending" with the runs they wait for, and the CLI prints them.
"""

from __future__ import annotations

import json
import math

import numpy as np
from etils import epath

import pandas as pd

from bscan.analysis import eminlaw
from bscan.analysis import pipeline

BATCH_SCAN = "batch_size_scan"
CRITICAL_BATCH = "critical_batch_vs_loss"
COMPARISON = "critical_batch_comparison"


def _json_safe(value):
  """NaN/inf are not JSON: write them as null."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, dict):
    return {k: _json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_safe(v) for v in value]
  return value


def write_report(analysis: pipeline.Analysis, out_dir: epath.PathLike,
                 kaplan: bool = False) -> list[epath.Path]:
  """Writes the figures, a CSV per table and summary.json into `out_dir`; returns the paths."""
  # Imported here: matplotlib takes seconds to load, and the text tables above need none of it.
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  from bscan.analysis import figures  # pylint: disable=g-import-not-at-top
  from bscan.analysis import comparison  # pylint: disable=g-import-not-at-top
  out = epath.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  written = []
  draws = [(BATCH_SCAN, lambda: figures.plot_batch_scan(analysis)),
           (CRITICAL_BATCH, lambda: figures.plot_critical_batch(analysis, kaplan))]
  sizes = comparison.comparison_sizes(analysis)
  if sizes:  # sizes with branch or B_noise data, else one with scan fits
    draws.append((COMPARISON, lambda: comparison.plot_comparison(analysis, sizes)))
  for name, draw in draws:
    fig = draw()
    written += figures.save_figure(fig, out / name)
    plt.close(fig)
  for name, table in tables(analysis).items():
    path = out / f"{name}.csv"
    path.write_text(table.to_csv(index=False, float_format="%.6g"))
    written.append(path)
  summary = out / "summary.json"
  summary.write_text(json.dumps(_json_safe(analysis.summary()), indent=2) + "\n")
  return written + [summary]


def tables(analysis: pipeline.Analysis) -> dict[str, pd.DataFrame]:
  """The CSV tables by file stem (the branch ones only with branch runs)."""
  out = {"critical_batch": analysis.critical, "lack_of_fit": analysis.lack_of_fit,
         "noise_at_targets": analysis.noise_at_targets,
         "e_min_law": eminlaw.e_min_law_table(analysis.e_min_law)}
  if analysis.branches is not None:
    out.update({"branch_runs": analysis.branch_table, "branch_cbs": analysis.branches.cbs,
                "branch_excess": analysis.branches.excess})
  return out


def _g(x: float) -> str:
  return f"{x:.3g}" if np.isfinite(x) else ("inf" if x > 0 else "nan")


def name_list(runs: list[str], most: int = 4) -> str:
  """Run names, the first `most` of them and how many more."""
  return ", ".join(runs[:most]) + (f" and {len(runs) - most} more" if len(runs) > most else "")


def pending_lines(analysis: pipeline.Analysis) -> list[str]:
  """One line per model size with pending targets: which targets, and the runs they wait for."""
  status = dict(zip(analysis.runs["name"], analysis.runs["status"]))
  lines = []
  for (size, _), group in analysis.pending.groupby(["size", "n_params"], sort=False):
    runs = sorted({r for rs in group["runs"] for r in rs})
    targets = ", ".join(str(t) for t in group["target"])
    lines.append(f"pending: size {size}, targets {targets}: waiting for {len(runs)} unfinished "
                 f"run(s): {name_list([f'{r} ({status.get(r)})' for r in runs])}")
  return lines


def _with_range(mean: float, lo: float, hi: float) -> str:
  """'2.1e+04 [1.6e+04, 2.9e+04]', or '-' when not measured."""
  if not np.isfinite(mean):
    return "-"
  return f"{mean:.2g} [{lo:.2g}, {hi:.2g}]"


def _aligned(rows: list[tuple[str, ...]]) -> list[str]:
  """Rows of cells in left-aligned columns."""
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def lack_of_fit_lines(analysis: pipeline.Analysis) -> list[str]:
  """One line per flagged target: its p-value and reason, and what was done about it."""
  return [f"lack of fit: size {r.size}, target {r.target}: p = {r.lack_of_fit_p:.2g} "
          f"({r.lack_of_fit_reason}); flagged instead of fitted through, left out of the power "
          "laws" for r in analysis.critical.itertuples() if r.lack_of_fit]


def e_min_law_lines(analysis: pipeline.Analysis) -> list[str]:
  """One line per E_min law (pooled first): B_crit = c * E_min^beta with beta's interval."""
  level = f"{analysis.confidence:.0%}"
  return [f"E_min law, {name}: {law.formula()} (tokens), beta = {law.beta:.3f} "
          f"[{law.beta_ci[0]:.3f}, {law.beta_ci[1]:.3f}] ({level} CI, {law.n_points} targets)"
          for name, law in analysis.e_min_law.items()]


def branch_cbs_table(analysis: pipeline.Analysis) -> str:
  """Per checkpoint of the branches: ref loss, local CBS (tokens) and its interval; '' if none."""
  if analysis.branches is None:
    return ""
  level = f"{1 - analysis.branch_alpha:.0%}"
  rows = [("size", "checkpoint", "tokens", "ref loss", "CBS", f"{level} interval", "replicates",
           "k max", "flag")]
  for r in analysis.branches.cbs.itertuples():
    rows.append((str(r.size), str(r.checkpoint_step), _g(r.checkpoint_tokens),
                 f"{r.ref_loss:.4g}", _g(r.cbs), f"[{_g(r.cbs_lo)}, {_g(r.cbs_hi)}]",
                 str(r.n_replicates), f"{r.k_max:g}", r.flag))
  return "\n".join([f"Branched local CBS per checkpoint (epsilon = {analysis.epsilon:g} nats, "
                    f"{level} intervals; tokens):", *_aligned(rows)])


def b_crit_table(analysis: pipeline.Analysis) -> str:
  """Every (model size, target): B_crit (tokens) with its interval, S_min, E_min, lack of fit
  and the noise scales there, or why it was not fitted."""
  level = f"{analysis.confidence:.0%}"
  head = ("size", "target", "B_crit", f"{level} interval", "S_min", "E_min", "lack of fit p",
          "B_simple [min, max]", "B_noise [min, max]", "batch sizes")
  rows = [head]
  fits = {(r.size, r.target): r for r in analysis.critical.itertuples()}
  noise = {(r.size, r.target): r for r in analysis.noise_at_targets.itertuples()}
  waits = {(r.size, r.target): r.runs for r in analysis.pending.itertuples()}
  reach = analysis.best_steps.groupby(["size", "target"])["batch_tokens"].nunique().to_dict()
  sizes = analysis.runs.drop_duplicates("size").sort_values("n_params")["size"]
  for size in sizes:
    for target in analysis.targets:
      fit = fits.get((size, target))
      if fit is not None:
        at = noise.get((size, target))
        lof = "-" if not np.isfinite(fit.lack_of_fit_p) else (
            f"{fit.lack_of_fit_p:.2g}" + (" FLAGGED" if fit.lack_of_fit else ""))
        scales = [_with_range(getattr(at, n), getattr(at, f"{n}_lo"), getattr(at, f"{n}_hi"))
                  if at is not None else "-" for n in ("b_simple", "b_noise")]
        rows.append((str(size), str(target), _g(fit.b_crit),
                     f"[{_g(fit.b_crit_lo)}, {_g(fit.b_crit_hi)}]", _g(fit.s_min), _g(fit.e_min),
                     lof, *scales, str(int(fit.n_batch_sizes))))
      elif (size, target) in waits:
        rows.append((str(size), str(target), f"pending on {name_list(waits[size, target], 2)}"))
      else:
        n = reach.get((size, target), 0)
        rows.append((str(size), str(target), f"not fitted: {n} batch size(s) reach it, need 3"))
  full = [r for r in rows if len(r) == len(head)]
  widths = [max(len(r[i]) for r in full) for i in range(len(head))]
  text = [f"B_crit per model size and target ({level} intervals; B_crit, E_min and noise "
          "scales in tokens, S_min in steps; noise scales: geometric mean over runs [min, max]):"]
  for r in rows:  # a shorter row is a note after the size and target
    cells = [c.ljust(w) for c, w in zip(r, widths)] if len(r) == len(head) else [
        r[0].ljust(widths[0]), r[1].ljust(widths[1]), r[2]]
    text.append("  ".join(cells).rstrip())
  return "\n".join(text)
