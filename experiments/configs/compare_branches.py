"""Branched local critical batch size (Merrill et al. 2025 §3.1) from compare.py's reference.

From each checkpoint of the batch-8 reference run (its parameters, Adam state and data
position), branches at k·8 sequences for k = 1, 2, 4, 8, with the learning rate scaled by
√k (AdamW's rule, bscan.lr_scaling), each for Δ tokens, in REPLICATES independent replicates
(replicate j reads the reference's stream after j·Δ tokens; every k of a replicate reads the
same tokens). Run after compare.py's sweep, into a sibling sweep dir:

python -m launch.local --config=experiments/configs/compare_branches.py \
  --workdir=runs/compare/branches --parallel=2 --pack=3 --analysis=false
"""

import math

from bscan import config as config_lib
from bscan import sweep as sweep_lib
from experiments.configs import compare

KS = (1, 2, 4, 8)
REPLICATES = 3
DELTA_TOKENS = 65_536  # 64 steps at k = 1 (1,024 tokens a step), 8 at k = 8
# The reference, relative to this sweep dir: compare.py's sweep in the sibling dir 'scan'.
REFERENCE = f"../scan/b{compare.REFERENCE_BATCH}"


def get_config(arg: str = ""):
  """One branch: arg keys at (a reference checkpoint step), k and replicate."""
  args = config_lib.parse_arg(arg)
  config_lib.check_arg_keys(args, ("at", "k", "replicate"), "compare_branches.py")
  k = args.get("k", 1)
  c = compare.get_config(f"batch={compare.REFERENCE_BATCH * k}")
  c.branch.from_workdir = REFERENCE
  c.branch.from_step = args.get("at", compare.CHECKPOINTS[0])
  c.branch.replicate = args.get("replicate", 0)
  # The reference reads batch 8 as gcd(8, data.shards) = 8 shards: every k reads the same
  # 8 shard streams (k rows of each per reference row), so the data position carries over.
  c.data.shards = math.gcd(compare.REFERENCE_BATCH, c.data.shards)
  c.optim.batch_scaling, c.optim.reference_batch = "auto", compare.REFERENCE_BATCH
  c.optim.warmup_tokens = 0  # the reference is past its warmup at every checkpoint
  c.budget.target_loss, c.budget.max_tokens = 0.0, 0
  c.budget.train_tokens = DELTA_TOKENS
  c.eval.per_decade = 0  # only the last step's eval counts (the trainer always evaluates it)
  c.noise.hessian_every = 0
  c.checkpoint.every_steps, c.checkpoint.keep = 10_000, 1
  return c


def sweep() -> sweep_lib.Sweep:
  """Every checkpoint × k × replicate; replicates of one (checkpoint, k) pack into a trainer."""
  points = [{"at": s, "k": k, "replicate": r}
            for s in compare.CHECKPOINTS for k in KS for r in range(REPLICATES)]
  return sweep_lib.Sweep(points=tuple(points))
