"""experiments/configs/scan.py shrunk for an end-to-end launcher test with the real trainer."""

from bscan import sweep as sweep_lib
from experiments.configs import scan


def get_config(arg: str = ""):
  """A scan point on a 60-file corpus with the tiny model, 30 steps, checkpoints every 5."""
  c = scan.get_config(arg)
  c.model.size, c.seq_len, c.model.max_len = "tiny", 32, 32
  c.data.max_files, c.data.eval_sequences = 60, 8
  c.budget.target_loss, c.budget.max_tokens, c.budget.train_steps = 0.0, 0, 30
  c.checkpoint.every_steps = 5
  return c


def sweep() -> sweep_lib.Sweep:
  """Three batch sizes of the tiny model."""
  return sweep_lib.Sweep(points=[{"size": "tiny", "batch": b} for b in (2, 4, 8)],
                         targets=(4.0, 3.5))
