"""A run sized for the embedded default (Python's stdlib source) on a 2-core CPU, in minutes.

python -m experiments.train --config=experiments/configs/demo.py --workdir=runs/demo-run
python -m experiments.train --config=experiments/configs/demo.py:batch=16,lr=2e-3 --workdir=...
"""

from bscan import config as config_lib
from experiments.configs import base


def get_config(arg: str = ""):
  """2 layers × 64, context 128, batch 16 sequences, 2M tokens, constant LR after warmup."""
  args = config_lib.parse_arg(arg)
  config_lib.check_arg_keys(args, base.COMMON_ARGS, "demo.py")
  c = base.get_base_config()
  c.model.size = "98k"
  c.model.max_len = 128
  c.seq_len = 128
  c.batch_size = 16
  c.optim.lr = 3e-3
  c.optim.warmup_tokens = 100_000
  c.budget.train_tokens = 2_000_000
  c.eval.per_decade = 8
  c.eval.every_steps = 100
  c.data.eval_sequences = 64
  c.data.shuffle_window = 131_072  # the whole corpus: stdlib files are long
  return base.apply_args(c, args)
