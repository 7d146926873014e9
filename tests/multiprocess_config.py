"""A tiny run for multi-process tests: 8 devices' worth of batch, 40 steps, frequent saves."""

import ml_collections

from experiments.configs import base


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """The tiny model on a 150-file corpus (data.data_dir is set by the test); arg unused."""
  del arg
  c = base.get_base_config()
  c.model.size, c.model.max_len = "tiny", 32
  c.seq_len, c.batch_size, c.microbatch_size = 32, 16, 1  # 8 devices × 2 microbatches
  c.data.max_files, c.data.eval_sequences, c.data.shuffle_window = 150, 8, 4096
  c.budget.train_steps = 40
  c.eval.every_steps, c.eval.per_decade = 5, 0
  c.checkpoint.every_steps = 4
  return c
