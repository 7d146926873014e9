"""Fixed batches against a batch that grows: a declared ramp and a noise-scale controller.

The main job's 25k model, data, rate (3e-3, constant after a 50k-token warmup) and targets
(2.6 … 2.2 nats/byte), each run until its smoothed train loss reaches 2.2, in three seeds:
- mode=fixed: batches 4, 8, 16, 32 and 64 sequences of 128 bytes;
- mode=schedule: the declared ramp SCHEDULE (thresholds in tokens);
- mode=noise: the batch set to `factor` × the EMA B_simple (sequences), only upward, in
  multiples of 4 from 4 to 64, at most every CONTROL_TOKENS tokens;
- mode=branched: every TEST_TOKENS, branches of BRANCH_TOKENS at B and 2B from the run itself;
  the run keeps 2B when its held-out loss is within EPSILON (or, arg epsilon, STRICT_EPSILON)
  nats of B's (the branches it does not keep count as overhead tokens).
Every run reads the batch as 4 data shards, so a seed's runs all read one token stream.
The rate stays 3e-3 at every batch, as in the scan (where the best rate moved little with the
batch and √ scaling took 1.7× the steps at batch 64): a rule other than AdamW's √ is declared
(optim.declare_scaling). `make ramp` runs the sweep and `python -m experiments.ramp_table`.

python -m launch.local --config=experiments/configs/ramp.py --workdir=runs/ramp --parallel=2 \
  --pack=3 --analysis=false
"""

from bscan import config as config_lib
from bscan import sweep as sweep_lib
from experiments.configs import base
from experiments.configs import scan

SIZE = "25k"
BATCHES = (4, 8, 16, 32, 64)
SEEDS = (0, 1, 2)
SCHEDULE = "0:4,150k:8,400k:16"
FACTORS = (0.5, 1.0)
CONTROL_TOKENS = 25_000
# Branched: every TEST_TOKENS, Δ = BRANCH_TOKENS at B and 2B from the run; keep 2B when its
# held-out loss is within EPSILON nats of B's.
TEST_TOKENS, BRANCH_TOKENS, EPSILON = 150_000, 32_768, 0.01
STRICT_EPSILON = 0.003  # a second branched variant: a stricter threshold
MODES = ("fixed", "schedule", "noise", "branched")


def get_config(arg: str = ""):
  """One run: arg keys mode, batch (fixed), factor (noise), epsilon (branched), seed."""
  args = config_lib.parse_arg(arg)
  config_lib.check_arg_keys(args, ("mode", "factor", "epsilon") + base.COMMON_ARGS, "ramp.py")
  mode = args.pop("mode", "fixed")
  if mode not in MODES:
    raise config_lib.ConfigError(f"ramp.py: mode={mode!r} is not one of {MODES}")
  c = scan.get_config(f"size={SIZE}")
  c.batch_size = BATCHES[0]
  c = base.apply_args(c, args)
  c.microbatch_size = 2  # fits every batch; the fastest layout on CPU (BENCHMARKS.md)
  c.data.shards = 4  # gcd(4, 4) = gcd(64, 4): one token stream for every batch
  if mode != "fixed":
    c.batch_size = BATCHES[0]
    c.optim.batch_scaling, c.optim.declare_scaling = "none", True
  if mode == "schedule":
    c.ramp.schedule = SCHEDULE
  elif mode == "noise":
    c.ramp.controller, c.ramp.factor = "noise", float(args.get("factor", FACTORS[0]))
    c.ramp.max_batch, c.ramp.multiple = BATCHES[-1], BATCHES[0]
    c.ramp.every_tokens = CONTROL_TOKENS
  elif mode == "branched":
    c.ramp.controller, c.ramp.branch_ks, c.ramp.max_batch = "branched", (1, 2), BATCHES[-1]
    c.ramp.every_tokens, c.ramp.branch_tokens = TEST_TOKENS, BRANCH_TOKENS
    c.ramp.epsilon = float(args.get("epsilon", EPSILON))
  return c


def sweep() -> sweep_lib.Sweep:
  """Every mode in every seed; the fixed batches' seeds pack into one trainer."""
  points = [{"mode": "fixed", "batch": b, "seed": s} for b in BATCHES for s in SEEDS]
  points += [{"mode": "noise", "factor": f, "seed": s} for f in FACTORS for s in SEEDS]
  points += [{"mode": "schedule", "seed": s} for s in SEEDS]
  points += [{"mode": "branched", "seed": s} for s in SEEDS]
  points += [{"mode": "branched", "epsilon": STRICT_EPSILON, "seed": s} for s in SEEDS]
  return sweep_lib.Sweep(points=tuple(points),
                         targets=tuple(sorted(scan.TARGETS[SIZE], reverse=True)))
