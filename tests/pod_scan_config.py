"""A tiny scan for the simulated TPU pod (tests/launch_tpu_pod_test.py) with the real trainer.

Batches of 8, 16 and 32 sequences split over a v4-16's 8 devices on 2 hosts; the tiny model
on a 60-file corpus, 12 steps, a checkpoint every 4 steps.
"""

from bscan import sweep as sweep_lib
from experiments.configs import scan

STEPS = 12


def get_config(arg: str = ""):
  """One point of experiments/configs/scan.py shrunk to seconds."""
  c = scan.get_config(arg)
  c.model.size, c.seq_len, c.model.max_len = "tiny", 32, 32
  c.data.max_files, c.data.eval_sequences, c.data.shuffle_window = 60, 8, 4096
  c.optim.warmup_tokens = 0
  c.budget.target_loss, c.budget.max_tokens, c.budget.train_steps = 0.0, 0, STEPS
  c.eval.per_decade, c.eval.every_steps = 0, 0  # one eval, at the last step
  c.noise.group_every = 0
  c.checkpoint.every_steps = 4
  return c


def sweep() -> sweep_lib.Sweep:
  """Three batch sizes of the tiny model (the analysis fits a target from 3)."""
  return sweep_lib.Sweep(points=[{"size": "tiny", "batch": b} for b in (8, 16, 32)],
                         targets=(4.5, 4.4))
