"""experiments/configs/scan.py shrunk for scripts/chaos.py: tiny points that stop on a target.

Each point runs the real stop rule (smoothed train loss reaches TARGET, plus overshoot, capped)
and checkpoints every 4 steps, so random kills often land while a checkpoint is being written.
"""

from bscan import sweep as sweep_lib
from experiments.configs import scan

BATCHES = (2, 4, 8)  # the S/E fit needs three batch sizes
TARGETS = (4.0, 3.8)
CAP_TOKENS = 20_000


def get_config(arg: str = ""):
  """A tiny-model point on a 60-file corpus: stops at loss 3.8 (+25%), checkpoints every 4."""
  c = scan.get_config(arg)
  c.model.size, c.seq_len, c.model.max_len = "tiny", 32, 32
  c.data.max_files, c.data.eval_sequences = 60, 8
  c.data.shuffle_window = 4096
  c.optim.warmup_tokens = 1_000
  c.budget.target_loss, c.budget.max_tokens, c.budget.train_steps = min(TARGETS), CAP_TOKENS, 0
  c.budget.smoothing_tokens = 1_000
  c.eval.per_decade = 4
  c.checkpoint.every_steps = 4
  return c


def sweep() -> sweep_lib.Sweep:
  """Three batch sizes of the tiny model."""
  return sweep_lib.Sweep(points=[{"size": "tiny", "batch": b} for b in BATCHES], targets=TARGETS)
