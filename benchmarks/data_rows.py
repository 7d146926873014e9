"""The train iterator's cost per batch: rows stacked per shard (so a ramp can change the batch,
this release) against grain's `.batch()` per shard (the previous release), interleaved.

python -m benchmarks.data_rows [--batch=64] [--seq_len=128] [--shards=4] [--batches=300]
(pin it: taskset -c 0). It also checks that both yield the same batches.
"""

import statistics
import time

from absl import app
from absl import flags
import numpy as np

from bscan import data
from experiments.configs import base

_BATCH = flags.DEFINE_integer("batch", 64, "Global batch (sequences).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "Tokens per sequence.")
_SHARDS = flags.DEFINE_integer("shards", 4, "data.shards.")
_BATCHES = flags.DEFINE_integer("batches", 300, "Batches timed per round.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Rounds, alternating which goes first.")


def main(argv):
  del argv
  cfg = base.get_base_config()
  cfg.batch_size, cfg.seq_len, cfg.data.shards = _BATCH.value, _SEQ_LEN.value, _SHARDS.value
  cfg.data.shuffle_window = 4096
  shards = data.num_shards(cfg)
  tokenizer, source = data.get_tokenizer(cfg), data.get_source(cfg, cfg.data.train_split)
  window = max(1, cfg.data.shuffle_window // shards)

  def batched():  # the previous pipeline: grain batches each shard, then concatenate
    parents = [iter(data._shard_dataset(cfg, tokenizer, source, s, shards, window).batch(  # pylint: disable=protected-access
        cfg.batch_size // shards, drop_remainder=True)) for s in range(shards)]
    while True:
      yield np.concatenate([next(p) for p in parents])

  makers = {"grain .batch()": batched, "row stacking": lambda: data.make_train_iterator(cfg)}
  times = {name: [] for name in makers}
  for r in range(_ROUNDS.value):
    for name in (list(makers) if r % 2 == 0 else list(makers)[::-1]):
      it = makers[name]()
      next(it)  # fills the shuffle windows
      start = time.perf_counter()
      for _ in range(_BATCHES.value):
        next(it)
      times[name].append((time.perf_counter() - start) / _BATCHES.value * 1e3)
  old, new = (statistics.median(times[n]) for n in makers)
  a, b = (m() for m in makers.values())
  same = all(np.array_equal(next(a), next(b)) for _ in range(50))
  print(f"ms per batch of {cfg.batch_size}×{cfg.seq_len + 1}: grain .batch() {old:.3f}, row "
        f"stacking {new:.3f}, ratio {new / old:.3f}; same batches: {same}")


if __name__ == "__main__":
  app.run(main)
