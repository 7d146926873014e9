"""A tiny scan for launcher tests: 5 points for tests/fake_trainer.py, one of them failing."""

import ml_collections

from bscan import sweep as sweep_lib

TARGETS = (3.0, 2.5)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """The point's values as a config (the fake trainer parses ARG itself)."""
  return ml_collections.ConfigDict(sweep_lib.parse_point_arg(arg))


def sweep() -> sweep_lib.Sweep:
  """2 batch sizes x 2 seeds, plus one point that fails."""
  points = [{"size": "tiny", "batch": b, "lr": 1e-3, "seed": s} for b in (2, 4) for s in (0, 1)]
  points.append({"size": "tiny", "batch": 8, "lr": 3e-4, "seed": 0, "fail": 1})
  return sweep_lib.Sweep(points=points, targets=TARGETS)
