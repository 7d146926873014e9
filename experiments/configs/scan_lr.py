"""The main job's scan at four learning rates per (size, batch): 48 runs, packed 4 per trainer.

Each (size, batch) trains its four learning rates as one vmapped step (launch.local --pack=4),
so a small model's step keeps the CPU busy; each run still has its own workdir and rows.

python -m launch.local --config=experiments/configs/scan_lr.py --workdir=runs/scan_lr \
    --parallel=2 --pack=4
"""

from bscan import sweep as sweep_lib
from experiments.configs import scan

LRS = (1e-3, 2e-3, 3e-3, 5e-3)  # around scan.py's 3e-3 (best measured 2e-3 to 3e-3)


def get_config(arg: str = ""):
  """scan.py's point at the point's learning rate."""
  return scan.get_config(arg)


def sweep() -> sweep_lib.Sweep:
  """scan.py's sizes × batches × LRS, with its targets."""
  points = [{"size": s, "batch": b, "lr": lr} for s in scan.SIZES for b in scan.BATCHES
            for lr in LRS]
  return sweep_lib.Sweep(points=tuple(points), targets=scan.sweep().targets)
