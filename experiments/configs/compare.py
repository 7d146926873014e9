"""Every estimate of the critical batch size for one model on the embedded default.

The 25k model of the main job (same data, rate, warmup and targets) at five batch sizes,
with the Hessian-weighted B_noise on beside B_simple: the scan gives B_crit(L) with
intervals, the runs give B_simple(L) and B_noise(L). The batch-8 run is also the reference
of the branched local critical batch size (experiments/configs/compare_branches.py): it keeps
its checkpoints at CHECKPOINTS. `make compare` runs both sweeps and the analysis.

python -m launch.local --config=experiments/configs/compare.py --workdir=runs/compare/scan \
  --parallel=2 --analysis=false
"""

from bscan import config as config_lib
from bscan import sweep as sweep_lib
from experiments.configs import base
from experiments.configs import scan

SIZE = "25k"
BATCHES = (4, 8, 16, 32, 64)  # sequences of 128 bytes
REFERENCE_BATCH = 8
CHECKPOINTS = (200, 400, 600, 800, 1000)  # reference steps the branches start from


def get_config(arg: str = ""):
  """One point: arg keys batch, lr, seed (and the other COMMON_ARGS)."""
  args = config_lib.parse_arg(arg)
  config_lib.check_arg_keys(args, base.COMMON_ARGS, "compare.py")
  c = scan.get_config(f"size={SIZE}")
  c = base.apply_args(c, args)
  # K = 4 microbatches: one is held out for H·v (independent of the gradients it weighs).
  c.microbatch_size = max(1, c.batch_size // 4)
  c.noise.hessian_every = 20
  if c.batch_size == REFERENCE_BATCH:
    c.checkpoint.every_steps = CHECKPOINTS[0]
    c.checkpoint.keep = 1000  # every one of them: branches start from any
  return c


def sweep() -> sweep_lib.Sweep:
  """Five batch sizes, one rate, one seed; the main job's targets for this size."""
  return sweep_lib.Sweep(points=tuple({"batch": b} for b in BATCHES),
                         targets=tuple(sorted(scan.TARGETS[SIZE], reverse=True)))
