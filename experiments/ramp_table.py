"""Fixed batches against batch ramps: python -m experiments.ramp_table --workdir=runs/ramp.

Reads every run of the sweep (experiments/configs/ramp.py), prints per target the steps and
tokens to it of each mode (geometric means over seeds with 95% intervals), then tests each
ramp at the lowest target every run reached against the fastest fixed batch that uses at most
--token_slack × its tokens (bscan.analysis.ramp.claim), and draws ramp.{png,pdf}.
"""

import dataclasses
import json
import math
import warnings

from absl import app
from absl import flags
from etils import epath

from bscan.analysis import figures
from bscan.analysis import load
from bscan.analysis import ramp as ramp_lib
from bscan.analysis import rampfigure

_WORKDIR = flags.DEFINE_list("workdir", ["runs/ramp"], "Sweep dirs (or run workdirs).")
_OUT = flags.DEFINE_string("out", "", "Where the table, JSON and figure go ('' = "
                           "FIRST_WORKDIR/analysis).")
_TARGETS = flags.DEFINE_list("targets", [], "Target losses ('' = the sweep's).")
_TOKEN_SLACK = flags.DEFINE_float("token_slack", 1.1, "Fixed batches compared with a ramp use "
                                  "at most this many times its tokens.")
_SAVING = flags.DEFINE_float("saving", 0.3, "The step saving claimed (0.3 = 30% fewer steps).")
_ALPHA = flags.DEFINE_float("alpha", 0.05, "One-sided level of the paired test over seeds.")


def _fmt(value: float, lo: float = math.nan, hi: float = math.nan) -> str:
  if not math.isfinite(value):
    return "–"
  text = f"{value:,.0f}" if value >= 100 else f"{value:.3g}"
  if math.isfinite(lo) and math.isfinite(hi):
    text += f" [{lo:,.0f}, {hi:,.0f}]" if value >= 100 else f" [{lo:.3g}, {hi:.3g}]"
  return text


def markdown(summary, claims) -> str:
  """The per-target table and the claims as markdown."""
  lines = ["| target | mode | seeds reached | steps [95%] | tokens [95%] |",
           "|---|---|---|---|---|"]
  for _, r in summary.iterrows():
    lines.append(f"| {r['target']:g} | {r['mode']} | {r['reached']}/{r['seeds']} | "
                 f"{_fmt(r['steps'], r['steps_lo'], r['steps_hi'])} | "
                 f"{_fmt(r['tokens'], r['tokens_lo'], r['tokens_hi'])} |")
  lines += ["", "| target | ramp | best fixed within tokens | steps ratio [95%] | tokens ratio "
            "| p (fewer) | p (≥ saving) | met | steps / frontier's |",
            "|---|---|---|---|---|---|---|---|---|"]
  for _, c in claims.iterrows():
    lines.append(f"| {c['target']:g} | {c['mode']} | {c['baseline'] or 'none'} | "
                 f"{_fmt(c['steps_ratio'], c['ratio_lo'], c['ratio_hi'])} | "
                 f"{_fmt(c['tokens_ratio'])} | {c['p_fewer']:.3g} | {c['p_saving']:.3g} | "
                 f"{'yes' if c['met'] else 'no'} | {_fmt(c['frontier_ratio'])} |")
  return "\n".join(lines)


def main(argv):
  del argv
  warnings.simplefilter("ignore", load.RunWarning)
  runs = load.load_all_runs(_WORKDIR.value)
  runs = runs[~runs["branch_from_workdir"].notna()] if "branch_from_workdir" in runs else runs
  if runs.empty:
    raise app.UsageError(f"no runs under {_WORKDIR.value}")
  targets = [float(t) for t in _TARGETS.value] or load.read_sweep_targets(_WORKDIR.value[0])
  if not targets:
    raise app.UsageError("no targets: pass --targets (the sweep recorded none)")
  rows = ramp_lib.per_run(runs, targets)
  summary = ramp_lib.summary(rows)
  lowest = ramp_lib.lowest_common_target(rows)
  claims = ramp_lib.claims(rows, lowest, token_slack=_TOKEN_SLACK.value, saving=_SAVING.value,
                           alpha=_ALPHA.value) if math.isfinite(lowest) else None
  out = epath.Path(_OUT.value or f"{_WORKDIR.value[0]}/analysis")
  out.mkdir(parents=True, exist_ok=True)
  rows.to_csv(out / "ramp_runs.csv", index=False)
  summary.to_csv(out / "ramp_summary.csv", index=False)
  text = markdown(summary, claims if claims is not None else summary.iloc[0:0])
  print(text)
  (out / "ramp_table.md").write_text(text + "\n")
  ideal = ramp_lib.ideal_ramp(rows, [t for t in targets if t >= lowest],
                              _TOKEN_SLACK.value) if math.isfinite(lowest) else None
  if ideal is not None:
    print(f"\nthe best possible ramp here (Kaplan's S–E picture per stretch between targets): "
          f"rho = {ideal.rho:.3f}; its steps are {ideal.steps_at_equal_tokens:.3f} of one "
          f"batch's at equal tokens and {ideal.steps_vs_slack:.3f} of the best batch's with "
          f"{_TOKEN_SLACK.value:g}× its tokens")
  record = {"lowest_common_target": lowest,
            "ideal_ramp": None if ideal is None else dataclasses.asdict(ideal),
            "token_slack": _TOKEN_SLACK.value,
            "saving": _SAVING.value, "alpha": _ALPHA.value,
            "claims": [] if claims is None else claims.to_dict(orient="records")}
  (out / "ramp_claims.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
  if math.isfinite(lowest):
    paths = figures.save_figure(rampfigure.plot_ramp(runs, rows, lowest), out / "ramp")
    print(f"\nlowest target every run reached: {lowest:g}; figure {paths[0]}")
  else:
    print("\nno target was reached by every run: no claim tested, no figure")


if __name__ == "__main__":
  app.run(main)
