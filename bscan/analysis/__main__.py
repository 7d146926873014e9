"""CLI: python -m bscan.analysis --workdir=SWEEP_DIR[,BRANCH_DIR] --out=OUT_DIR [--targets=...].

Scan runs and branch runs (config.branch set) may come in one --workdir list; they are told apart
by their config. Prints the files written, the pooled power law, the E_min laws, the targets
flagged for lack of fit, the branched local CBS per checkpoint, the targets still pending on
unfinished runs and, last, the B_crit table per model size and target (with lack of fit and the
noise scales there). Exit status: 0 when at least one target was fitted; 2 with one `error: …`
line for input that cannot work (a flag, a workdir without runs, targets no run reaches, a branch
without its reference); 1 when every target is still pending on unfinished runs.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

from absl import app
from absl import flags
from etils import epath

from bscan import errors
from bscan.errors import ConfigError

if TYPE_CHECKING:  # imported in main, after the flags and paths are checked (seconds to load)
  from bscan.analysis import pipeline

EXIT_PENDING = 1  # nothing fittable yet: rerun when the unfinished runs end


def _loss(text: str) -> float | None:
  """A target loss, None when it is not a positive finite number."""
  try:
    value = float(text)
  except ValueError:
    return None
  return value if math.isfinite(value) and value > 0 else None


_WORKDIR = flags.DEFINE_list("workdir", None, "Sweep directory (or run workdirs), local or gs://.",
                             required=True)
_OUT = flags.DEFINE_string("out", None, "Output directory for figures, CSV and JSON.",
                           required=True)
_TARGETS = flags.DEFINE_list("targets", None, "Target losses; default: SWEEP_DIR/sweep.json, "
                             "else chosen from the loss range the runs reach.")
_LOSS = flags.DEFINE_enum("loss", "train", ["train", "eval"], "Curve to read steps-to-target from.")
_CONFIDENCE = flags.DEFINE_float("confidence", 0.95, "Two-sided level of all intervals.")
_KAPLAN = flags.DEFINE_bool("kaplan", False, "Draw Kaplan et al.'s published B_crit(L) line "
                            "(nats per GPT-2 token) for reference.")
_EPSILON = flags.DEFINE_float("epsilon", 0.01, "Branched local CBS: the final-loss excess over "
                              "the k = 1 branch (nats/token) still counted as no worse.")
_BRANCH_ALPHA = flags.DEFINE_float("branch_alpha", 0.1, "Branched local CBS: 1 - the coverage "
                                   "of its intervals.")
flags.register_validator(
    "targets", lambda v: v is None or all(_loss(t) is not None for t in v if t),
    "must be a comma-separated list of positive losses in nats/token, e.g. --targets=2.4,2.2")
flags.register_validator("confidence", lambda v: 0 < v < 1,
                         "must be a level between 0 and 1 (exclusive), e.g. 0.95")
flags.register_validator("epsilon", lambda v: math.isfinite(v) and v > 0,
                         "must be a positive loss difference in nats/token, e.g. 0.01")
flags.register_validator("branch_alpha", lambda v: 0 < v < 1,
                         "must be a level between 0 and 1 (exclusive), e.g. 0.1")
flags.register_validator("out", lambda v: v is None or bool(v.strip()),
                         "must name an output directory")


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing whose errors are one `error:` line and exit status 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    errors.fail(f"{e}")
  return []  # unreachable: fail exits


def _check_paths(workdirs: Sequence[str], out: str) -> None:
  """Every --workdir is an existing directory and --out is not a file, before any loading."""
  if not workdirs:
    raise ConfigError("--workdir is empty; pass a sweep directory or run workdirs")
  for w in workdirs:
    if not w.strip():
      raise ConfigError(f"--workdir={','.join(workdirs)} has an empty entry")
    try:
      path = epath.Path(w)
      exists, is_dir = path.exists(), path.is_dir()
    except ImportError as e:
      raise ConfigError(f"--workdir={w}: {e}; gs:// needs gcsfs: pip install 'bscan[gcs]'") from e
    except Exception as e:  # a missing bucket or credentials fail with many types
      raise ConfigError(f"--workdir={w} cannot be read ({type(e).__name__}: {e})") from e
    if not exists:
      raise ConfigError(f"--workdir={w} does not exist; pass a sweep directory or run workdirs")
    if not is_dir:
      raise ConfigError(f"--workdir={w} is a file, not a sweep directory or run workdir")
  if "://" not in out and epath.Path(out).exists() and not epath.Path(out).is_dir():
    raise ConfigError(f"--out={out} is a file; pass a directory for the figures, CSV and JSON")


def _nothing_fitted(analysis: pipeline.Analysis) -> None:
  """Exits with one `error:` line saying why no target was fitted and what to do."""
  from bscan.analysis import report, targets as targets_lib  # pylint: disable=g-import-not-at-top
  if len(analysis.pending):
    runs = sorted({r for rs in analysis.pending["runs"] for r in rs})
    print(f"error: no target can be fitted yet: {len(analysis.pending)} (size, target) pair(s) "
          f"wait for unfinished runs ({report.name_list(runs)}); rerun when they are done, or "
          "remove their workdirs to fit without them", file=sys.stderr)
    sys.exit(EXIT_PENDING)
  floor = targets_lib.lowest_fittable_loss(analysis.runs, analysis.loss, analysis.window,
                                           analysis.min_step)
  reach = ", ".join(f"{s} {v:.3f}" for s, v in floor.items()) or "none: fewer than 3 batch sizes"
  raise ConfigError(
      f"no target can be fitted: fewer than 3 batch sizes of any model size reach "
      f"{', '.join(map(str, analysis.targets))} ({analysis.targets_source} targets, "
      f"{analysis.loss} loss); the lowest loss 3 batch sizes reach per size: {reach}; choose "
      "targets above it with --targets")


@errors.exit_on_user_error
def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise ConfigError(f"unexpected argument {argv[1]!r}; the sweep directory goes in "
                      "--workdir=SWEEP_DIR")
  # Damaged runs and skipped targets are reported one line each, without source lines.
  warnings.formatwarning = lambda msg, cat, *_, **__: f"{cat.__name__}: {msg}\n"
  _check_paths(_WORKDIR.value, _OUT.value)
  from bscan.analysis import pipeline, report  # pylint: disable=g-import-not-at-top
  targets = [float(t) for t in _TARGETS.value if t] if _TARGETS.value else None
  analysis = pipeline.analyze(_WORKDIR.value, targets=targets or None, loss=_LOSS.value,
                              confidence=_CONFIDENCE.value, epsilon=_EPSILON.value,
                              branch_alpha=_BRANCH_ALPHA.value)
  lines = [*report.lack_of_fit_lines(analysis), report.branch_cbs_table(analysis),
           *report.pending_lines(analysis)]
  lines = [line for line in lines if line]
  if analysis.critical.empty:
    print("\n".join([*lines, report.b_crit_table(analysis)]), flush=True)
    _nothing_fitted(analysis)
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")  # headless; before write_report imports pyplot
  try:
    paths = report.write_report(analysis, _OUT.value, kaplan=_KAPLAN.value)
  except OSError as e:
    raise ConfigError(f"--out={_OUT.value} cannot be written ({type(e).__name__}: {e})") from e
  print("\n".join(map(str, paths)))
  pooled = analysis.power_laws.get("pooled")
  if pooled is not None:
    print(f"pooled: B_crit = {pooled.kaplan_form()}, alpha_B = {pooled.alpha_b:.3f} "
          f"[{pooled.alpha_b_ci[0]:.3f}, {pooled.alpha_b_ci[1]:.3f}]")
  print("\n".join([*report.e_min_law_lines(analysis), *lines, report.b_crit_table(analysis)]),
        flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
