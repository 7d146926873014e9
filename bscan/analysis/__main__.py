"""CLI: python -m bscan.analysis --workdir=SWEEP_DIR --out=OUT_DIR [--targets=2.0,1.8,...]."""

import sys
import warnings
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # headless; the backend is resolved at the first figure, so this suffices

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from bscan.analysis import pipeline  # noqa: E402
from bscan.analysis import report  # noqa: E402

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


def main(argv: Sequence[str]) -> None:
  del argv
  # Damaged runs and skipped targets are reported one line each, without source lines.
  warnings.formatwarning = lambda msg, cat, *_, **__: f"{cat.__name__}: {msg}\n"
  targets = [float(t) for t in _TARGETS.value] if _TARGETS.value else None
  try:
    analysis = pipeline.analyze(_WORKDIR.value, targets=targets, loss=_LOSS.value,
                                confidence=_CONFIDENCE.value)
  except ValueError as e:  # no runs, or no loss that three batch sizes reach
    sys.exit(f"error: {e}")
  for path in report.write_report(analysis, _OUT.value, kaplan=_KAPLAN.value):
    print(path)
  pooled = analysis.power_laws.get("pooled")
  if pooled is not None:
    print(f"pooled: B_crit = {pooled.kaplan_form()}, alpha_B = {pooled.alpha_b:.3f} "
          f"[{pooled.alpha_b_ci[0]:.3f}, {pooled.alpha_b_ci[1]:.3f}]")


if __name__ == "__main__":
  app.run(main)
