"""Batch size that changes during a run: a schedule in tokens, and controllers that choose it.

A declared schedule `0:64,2M:128,8M:256` gives the global batch (sequences) from each token
threshold on. Thresholds are tokens, so a schedule means the same data at any batch. The
learning rate follows the batch through bscan.lr_scaling (√ for AdamW, linear for SGD; any
other pairing must be declared), and Adam's β2 can be held fixed in tokens: at k times the
first batch a step sees k times the tokens, so β2 → β2^k keeps the second-moment half-life in
tokens (Marek et al. 2025).

Every batch of a schedule must read the same data shards as the first (gcd(batch,
data.shards) equal): then a step at k·B reads k of the first batch's rows from each shard, and
the token stream is a fixed-batch run's, with no token skipped or repeated across a change.

Controllers are pure: given what the run measured, they return the batch to use next, only
ever upward, at most every `every_tokens`, and always one the layout can run.
"""

from __future__ import annotations

import dataclasses
import math
import re
from bscan import lr_scaling
from bscan.errors import ConfigError

_SUFFIX = {"": 1, "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9}
_TOKENS = re.compile(r"^\s*(\d+(?:\.\d+)?)([kKMG]?)\s*$")


@dataclasses.dataclass(frozen=True)
class Stage:
  """From `start_tokens` on, the global batch is `batch` sequences."""

  start_tokens: int
  batch: int


def parse_tokens(text: str) -> int:
  """'2M' -> 2_000_000, '512k' -> 512_000, '65536' -> 65536 (whole tokens only)."""
  m = _TOKENS.match(text)
  if not m:
    raise ConfigError(f"batch schedule threshold {text!r} is not a token count (e.g. 0, 512k, "
                      "2M, 1.5G)")
  value = float(m.group(1)) * _SUFFIX[m.group(2)]
  if value != int(value):
    raise ConfigError(f"batch schedule threshold {text!r} is not a whole number of tokens")
  return int(value)


@dataclasses.dataclass(frozen=True)
class BatchSchedule:
  """Stages in increasing token order; the first starts at token 0."""

  stages: tuple[Stage, ...]

  @classmethod
  def parse(cls, text: str) -> BatchSchedule:
    """'0:64,2M:128' -> two stages; ConfigError naming the item and the fix."""
    stages = []
    for item in filter(None, (s.strip() for s in text.split(","))):
      if item.count(":") != 1:
        raise ConfigError(f"batch schedule item {item!r} must look like TOKENS:BATCH (e.g. "
                          "0:64,2M:128)")
      tokens, batch = item.split(":")
      if not batch.strip().isdigit() or int(batch) <= 0:
        raise ConfigError(f"batch schedule item {item!r}: the batch must be a positive whole "
                          "number of sequences")
      stages.append(Stage(parse_tokens(tokens), int(batch)))
    schedule = cls(tuple(stages))
    schedule.check()
    return schedule

  def check(self) -> None:
    """Starts at 0, thresholds strictly increasing, batches never shrinking."""
    if not self.stages or self.stages[0].start_tokens != 0:
      raise ConfigError("a batch schedule starts at token 0 (e.g. 0:64,2M:128)")
    for a, b in zip(self.stages, self.stages[1:]):
      if b.start_tokens <= a.start_tokens:
        raise ConfigError(f"batch schedule thresholds must increase: {a.start_tokens} then "
                          f"{b.start_tokens}")
      if b.batch < a.batch:
        raise ConfigError(f"batch schedule goes down from {a.batch} to {b.batch} at "
                          f"{b.start_tokens} tokens; it may only grow")

  def batch_at(self, tokens: int) -> int:
    """The global batch (sequences) for the step that starts after `tokens` tokens."""
    batch = self.stages[0].batch
    for stage in self.stages:
      if tokens >= stage.start_tokens:
        batch = stage.batch
    return batch

  def check_layout(self, num_devices: int, microbatch: int, data_shards: int,
                   num_processes: int = 1) -> None:
    """Every batch runs on this layout and reads the first batch's data shards."""
    first = math.gcd(self.stages[0].batch, data_shards)
    for stage in self.stages:
      per = num_devices * microbatch
      if stage.batch % per:
        raise ConfigError(f"batch {stage.batch} of the schedule is not divisible by devices × "
                          f"microbatch_size = {num_devices} × {microbatch}; pin microbatch_size "
                          "to one that divides every batch")
      if math.gcd(stage.batch, data_shards) != first:
        raise ConfigError(
            f"batch {stage.batch} reads gcd({stage.batch}, data.shards={data_shards}) = "
            f"{math.gcd(stage.batch, data_shards)} data shards and the first batch "
            f"{self.stages[0].batch} reads {first}: the token stream would change; set "
            f"data.shards={first}")
      if first % num_processes:
        raise ConfigError(f"{first} data shards cannot be shared by {num_processes} processes")


def learning_rate(lr: float, batch: int, first_batch: int, optimizer: str, rule: str,
                  declared: bool = False) -> float:
  """The peak rate at `batch`, from `lr` at the schedule's first batch, by the resolved rule."""
  return lr_scaling.scaled(lr, batch / first_batch,
                           lr_scaling.resolve(optimizer, rule, declared))


def beta2_fixed_in_tokens(beta2: float, batch: int, first_batch: int) -> float:
  """β2 at `batch` with the same half-life in tokens as β2 at `first_batch`."""
  return beta2 ** (batch / first_batch)


@dataclasses.dataclass(frozen=True)
class NoiseScaleController:
  """Sets the batch to `factor` × a measured noise scale (sequences): clipped to
  [min_batch, max_batch], rounded down to a multiple of `multiple`, only upward, and changed
  at most every `every_tokens`."""

  factor: float
  min_batch: int
  max_batch: int
  multiple: int
  every_tokens: int

  def __post_init__(self):
    if not (self.factor > 0 and 0 < self.min_batch <= self.max_batch and self.multiple > 0
            and self.every_tokens >= 0):
      raise ConfigError(f"noise-scale controller settings are inconsistent: {self}")
    if self.min_batch % self.multiple or self.max_batch % self.multiple:
      raise ConfigError(f"min_batch={self.min_batch} and max_batch={self.max_batch} must be "
                        f"multiples of {self.multiple}")

  def next_batch(self, batch: int, tokens: int, last_change_tokens: int,
                 noise_scale: float) -> int:
    """The batch for the next step, given the current one and the EMA noise scale (sequences).

    A NaN noise scale (not yet defined) keeps the batch.
    """
    if tokens - last_change_tokens < self.every_tokens or not math.isfinite(noise_scale):
      return batch
    want = min(self.max_batch, max(self.min_batch, self.factor * noise_scale))
    want = int(want // self.multiple) * self.multiple
    return max(batch, want)

