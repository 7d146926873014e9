"""A third of experiments/configs/scan_lr.py for timing --pack on a 2-core CPU: 98k, 3 batches.

time python -m launch.local --config=benchmarks/scan_lr_subset.py --workdir=/tmp/packed \
    --parallel=2 --pack=4 --noanalysis
time python -m launch.local --config=benchmarks/scan_lr_subset.py --workdir=/tmp/solo \
    --parallel=2 --noanalysis
"""

from bscan import sweep as sweep_lib
from experiments.configs import scan
from experiments.configs import scan_lr

BATCHES = (2, 8, 32)  # the small, middle and large end of the main scan


def get_config(arg: str = ""):
  return scan_lr.get_config(arg)


def sweep() -> sweep_lib.Sweep:
  """98k × BATCHES × scan_lr.LRS: 12 runs."""
  points = [{"size": "98k", "batch": b, "lr": lr} for b in BATCHES for lr in scan_lr.LRS]
  return sweep_lib.Sweep(points=tuple(points), targets=scan.TARGETS["98k"])
