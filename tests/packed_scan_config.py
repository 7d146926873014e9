"""A tiny scan of two learning rates at one batch size: launch.local --pack trains them as one."""

import pathlib

from bscan import sweep as sweep_lib

_TINY = sweep_lib.import_config(str(pathlib.Path(__file__).with_name("tiny_scan_config.py")))


def get_config(arg: str = ""):
  """tiny_scan_config's point (tiny model, 30 steps) at the point's learning rate."""
  return _TINY.get_config(arg)


def sweep() -> sweep_lib.Sweep:
  """Batch 4 at two learning rates, plus batch 8 alone (it cannot pack with them)."""
  points = [{"size": "tiny", "batch": 4, "lr": lr} for lr in (1e-3, 3e-3)]
  return sweep_lib.Sweep(points=points + [{"size": "tiny", "batch": 8, "lr": 1e-3}],
                         targets=(4.0, 3.5))
