"""Kaplan et al. 2020 §5.1 batch scans of the 3m and 85m models (Fig. 10 and 18).

Context 1024, Adam(W), learning rate from eq. D.1 (model size), constant after warmup so
steps-to-target do not depend on a run's planned length; each point trains until its smoothed
train loss reaches the lowest target, or a token cap. The paper trained on WebText2 with the
GPT-2 tokenizer, so the default here is c4 with tiktoken's gpt2 encoding (losses then in nats
per GPT-2 token, comparable to the paper); `data=pystdlib` runs the same scan on the embedded
default, with byte tokens and targets in nats per byte.

python -m experiments.train --config=experiments/configs/kaplan.py:size=3m,batch=64 --workdir=...
"""

from bscan import config as config_lib
from bscan import sweep as sweep_lib
from experiments.configs import base

SIZES = ("3m", "85m")
BATCHES = (8, 16, 32, 64, 128, 256, 512, 1024, 2048)  # sequences: 8k .. 2M tokens
# Per dataset, the losses each size reaches within its cap; the scan is for these. c4 is in
# nats per GPT-2 token; pystdlib in nats per byte (first guesses: check them against a run).
TARGETS = {
    "c4": {"3m": (6.0, 5.6, 5.3, 5.0, 4.8), "85m": (5.0, 4.6, 4.2, 3.9, 3.6)},
    "pystdlib": {"3m": (2.0, 1.9, 1.8, 1.7, 1.6), "85m": (1.8, 1.6, 1.5, 1.4, 1.3)},
}
CAPS = {"3m": 10_000_000_000, "85m": 40_000_000_000}  # tokens
ARGS = ("size", "batch", "seed", "microbatch", "target", "max_tokens", "data", "lr_scale")


def get_config(arg: str = ""):
  """One point of the scan: arg keys size, batch, seed, data (c4 | pystdlib), lr_scale.

  The learning rate comes from eq. D.1; scale it with lr_scale (there is no lr key here).
  """
  args = config_lib.parse_arg(arg)
  config_lib.check_arg_keys(args, ARGS, "kaplan.py")
  data = args.pop("data", "c4")
  if data not in TARGETS:
    raise config_lib.ConfigError(f"kaplan.py: data={data!r}; choose one of {sorted(TARGETS)}")
  c = base.get_base_config()
  c.model.size = args.get("size", "3m")
  c.seq_len = c.model.max_len = 1024
  c.batch_size = 512
  c.max_microbatch_size = 8
  if data == "c4":
    c.data.name, c.data.tfds_name, c.data.text_key = "tfds", "c4/en", "text"
    c.tokenizer.name, c.tokenizer.encoding = "tiktoken", "gpt2"
  c.optim.lr_rule = "kaplan"
  c.optim.lr_scale = float(args.pop("lr_scale", 1.0))
  c.optim.schedule = "constant"
  c.optim.b2 = 0.95
  c.optim.warmup_tokens = 25_000_000  # ≈3000 steps (the paper's warmup) at the smallest batch
  c.optim.weight_decay = 0.0
  size = c.model.size if c.model.size in CAPS else "3m"
  c.budget.target_loss = min(TARGETS[data][size])
  c.budget.max_tokens = CAPS[size]
  c.budget.smoothing_tokens = 1_000_000  # ≈120 steps at the smallest batch
  c.eval.per_decade = 10
  c.eval.every_steps = 2000
  c.checkpoint.every_steps = 1000
  c.data.eval_sequences = 256
  return base.apply_args(c, args)


def sweep() -> sweep_lib.Sweep:
  """Both sizes × nine batch sizes × one seed (learning rate from the rule), on c4."""
  points = [{"size": s, "batch": b, "seed": 0} for s in SIZES for b in BATCHES]
  targets = sorted({t for ts in TARGETS["c4"].values() for t in ts}, reverse=True)
  return sweep_lib.Sweep(points=tuple(points), targets=tuple(targets))
