"""A tiny trainer run for tests: any config shrunk to the test corpus, its rows, interruptions."""

import copy
import os
import signal

import grain

from bscan import workdir as workdir_lib


def tiny(cfg, pystdlib_cfg, steps: int = 12):
  """Shrinks any config to the test corpus and tiny shapes, keeping its other choices."""
  cfg = copy.deepcopy(cfg)
  cfg.data = copy.deepcopy(pystdlib_cfg.data)
  cfg.tokenizer = copy.deepcopy(pystdlib_cfg.tokenizer)
  cfg.model.size, cfg.model.max_len, cfg.model.dtype = "tiny", 32, "float32"
  cfg.seq_len, cfg.batch_size, cfg.microbatch_size = 32, 16, 1
  cfg.budget.train_steps, cfg.budget.target_loss = steps, 0.0
  cfg.eval.every_steps, cfg.eval.per_decade = 3, 0
  cfg.checkpoint.every_steps = 4
  cfg.optim.warmup_tokens = 0
  return cfg


def rows(workdir) -> list[dict]:
  rows, bad = workdir_lib.read_metrics(workdir)
  assert not bad, bad
  return [{k: v for k, v in r.items() if k not in workdir_lib.WALL_CLOCK_COLUMNS} for r in rows]


class Interrupting(grain.DatasetIterator):
  """Wraps the data iterator: at the n-th batch, raise (a crash) or send SIGTERM."""

  def __init__(self, parent, at: int, how: str):
    super().__init__(parent)
    self._at, self._how, self._n = at, how, 0

  def __next__(self):
    self._n += 1
    if self._n == self._at:
      if self._how == "crash":
        raise RuntimeError("simulated crash")
      os.kill(os.getpid(), signal.SIGTERM)
    return next(self._parent)

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)

  def set_rows(self, rows: int) -> None:  # a batch ramp changes the batch between steps
    self._parent.set_rows(rows)
