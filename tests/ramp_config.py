"""A tiny run whose batch grows (tests/train_ramp_test.py): arg 'schedule' or 'controller'."""

import ml_collections

from experiments.configs import base

# Steps 1–4 at 8 sequences of 32 tokens, 5–8 at 16, then 32 to the budget: 15 steps.
SCHEDULE = "0:8,1k:16,3k:32"
TOKENS = 10_240


def get_config(arg: str = "schedule") -> ml_collections.ConfigDict:
  """The tiny model on a 150-file corpus (data.data_dir is set by the test); arg schedule,
  controller (noise) or branched."""
  c = base.get_base_config()
  c.model.size, c.model.max_len = "tiny", 32
  # One sequence per microbatch at every batch: B_small is the same on 8 devices and on 4.
  c.seq_len, c.batch_size, c.microbatch_size = 32, 8, 1
  c.data.max_files, c.data.eval_sequences, c.data.shuffle_window = 150, 8, 4096
  c.data.shards = 8  # gcd(8, 8) = gcd(16, 8) = gcd(32, 8): one token stream for every batch
  c.tokenizer.vocab_size, c.tokenizer.train_bytes = 512, 300_000
  c.optim.warmup_tokens = 0
  c.optim.batch_scaling = "auto"  # √ for AdamW
  c.ramp.beta2_in_tokens = True
  if arg == "controller":
    c.ramp.controller, c.ramp.factor, c.ramp.max_batch = "noise", 24.0, 32
    c.ramp.multiple, c.ramp.every_tokens = 8, 1024
  elif arg == "branched":
    c.ramp.controller, c.ramp.branch_ks, c.ramp.max_batch = "branched", (1, 2), 32
    # Δ = 2 steps at batch 8 (1 at 16), a test every 2,048 tokens; ε = 0.3 nats lets the
    # batch grow wherever the larger branch is not far worse.
    c.ramp.branch_tokens, c.ramp.every_tokens, c.ramp.epsilon = 512, 2048, 0.3
  else:
    c.ramp.schedule = SCHEDULE
  c.budget.train_tokens = TOKENS
  c.eval.every_steps, c.eval.per_decade = 3, 0
  c.checkpoint.every_steps = 4
  return c
