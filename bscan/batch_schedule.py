"""Batch size that changes during a run: a schedule in tokens, and controllers that choose it.

A declared schedule `0:64,2M:128,8M:256` gives the global batch (sequences) from each token
threshold on. Thresholds are tokens, so a schedule means the same data at any batch. The
learning rate follows the batch through optim.batch_scaling (bscan.lr_scaling: √ for AdamW,
linear for SGD; any other pairing must be declared), and Adam's β2 can be held fixed in
tokens: at k times the first batch a step sees k times the tokens, so β2 → β2^k keeps the
second-moment half-life in tokens (Marek et al. 2025).

Every batch of a schedule must read the same data shards as the first (gcd(batch,
data.shards) equal): then a step at k·B reads k of the first batch's rows from each shard, and
the token stream is a fixed-batch run's, with no token skipped or repeated across a change.

Controllers are pure: given what the run measured, they return the batch to use next, only
ever upward, at most every `every_tokens`, and always one the layout can run.

A run's ramp (`cfg.ramp`, bscan.train) is a declared schedule or a controller. The trainer asks
`Ramp.batch_for` before each step and, for a controller, `Ramp.decide` after each step's
metrics arrive. A decision made on step n's metrics applies from step n + 2: the trainer
dispatches step n + 1 before it fetches step n, and a run resumed at step n must decide alike.
The decisions (`Change`s) are part of the checkpointed loop state.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping

import ml_collections

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


def check_batches(batches: list[int], num_devices: int, microbatch: int, data_shards: int,
                  num_processes: int = 1) -> None:
  """Every batch (the first is the run's) fits the layout and reads the first's data shards.

  `microbatch` 0 is the automatic choice, made per batch.
  """
  first = math.gcd(batches[0], data_shards)
  per = num_devices * (microbatch or 1)
  for batch in batches:
    if batch % per:
      raise ConfigError(f"batch {batch} of the ramp is not divisible by devices × "
                        f"microbatch_size = {num_devices} × {microbatch or 1}; pin "
                        "microbatch_size to one that divides every batch (or use batches that "
                        f"are multiples of {per})")
    if math.gcd(batch, data_shards) != first:
      raise ConfigError(
          f"batch {batch} of the ramp reads gcd({batch}, data.shards={data_shards}) = "
          f"{math.gcd(batch, data_shards)} data shards and the first batch {batches[0]} "
          f"reads {first}: the token stream would change; set data.shards={first}")
  if first % num_processes:
    raise ConfigError(f"{first} data shards cannot be shared by {num_processes} processes")


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



@dataclasses.dataclass(frozen=True)
class BranchedController:
  """Every `every_tokens`, branches the run at k × its batch for each k in `ks` (1 first), each
  for `branch_tokens` on the same tokens, and keeps the branch at the local critical batch size:
  the largest k·B whose held-out loss is within `epsilon` nats of k = 1's (Merrill et al. 2025,
  §3.1; bscan.analysis.branches.local_cbs), never above `max_batch`."""

  ks: tuple[int, ...]
  epsilon: float
  every_tokens: int
  branch_tokens: int
  max_batch: int

  def __post_init__(self):
    ks = self.ks
    if not ks or ks[0] != 1 or any(b <= a for a, b in zip(ks, ks[1:])) or len(ks) < 2:
      raise ConfigError(f"ramp.branch_ks={ks}: multiples of the batch, ascending from 1, at "
                        "least two (e.g. (1, 2))")
    if not (self.epsilon > 0 and self.every_tokens > 0 and self.branch_tokens > 0):
      raise ConfigError("ramp.epsilon, ramp.every_tokens and ramp.branch_tokens must be "
                        "positive for the branched controller")

  def due(self, tokens: int, last_test_tokens: int) -> bool:
    """Whether the run, after `tokens`, tests again."""
    return tokens - last_test_tokens >= self.every_tokens

  def ks_for(self, batch: int) -> tuple[int, ...]:
    """The multiples tested at `batch` (k·batch ≤ max_batch); (1,) means none."""
    return tuple(k for k in self.ks if k * batch <= self.max_batch)

  def branch_steps(self, batch: int, seq_len: int, k: int) -> int:
    """Steps of the k branch: branch_tokens at k·batch, rounded up to whole steps of the
    largest k (every branch reads the same rows)."""
    largest = self.ks_for(batch)[-1] * batch * seq_len
    return math.ceil(self.branch_tokens / largest) * self.ks_for(batch)[-1] // k

  def choose(self, batch: int, losses: Mapping[int, float]) -> int:
    """The batch to go on at, from each k's held-out loss after its branch."""
    from bscan.analysis import branches  # pylint: disable=g-import-not-at-top  (scipy, pandas)
    ks = sorted(losses)
    k = branches.local_cbs(ks, [[losses[k] for k in ks]], self.epsilon).k
    return int(k) * batch


CONTROLLERS = ("", "noise", "branched")
ESTIMATES = {"b_simple": "b_simple"}  # controller estimate -> the step's metric (tokens)


@dataclasses.dataclass(frozen=True)
class Change:
  """A controller's decision: from `step` on, the batch is `batch` (decided at `tokens`)."""

  step: int
  batch: int
  tokens: int


def batch_at_step(first: int, changes: tuple[Change, ...], step: int) -> int:
  """The batch of `step` under the decided changes (in order)."""
  batch = first
  for change in changes:
    if step >= change.step:
      batch = change.batch
  return batch


@dataclasses.dataclass(frozen=True)
class Ramp:
  """A run's batch over time: a declared schedule or a noise-scale controller."""

  first: int  # sequences: cfg.batch_size
  seq_len: int
  schedule: BatchSchedule | None = None
  controller: NoiseScaleController | None = None
  branched: BranchedController | None = None
  estimate: str = "b_simple"
  start_tokens: int = 0  # controllers act only after the warmup

  @classmethod
  def from_config(cls, cfg: ml_collections.ConfigDict) -> Ramp | None:
    """The ramp `cfg.ramp` asks for; None for a fixed batch."""
    r = cfg.get("ramp")
    if not r or not (r.schedule or r.controller):
      return None
    if r.schedule and r.controller:
      raise ConfigError("ramp.schedule and ramp.controller are both set; a run's batch follows "
                        "one of them: clear the other")
    if r.controller not in CONTROLLERS:
      raise ConfigError(f"ramp.controller={r.controller!r} is unknown; choose one of "
                        f"{CONTROLLERS[1:]} ('' = none)")
    if r.schedule:
      schedule = BatchSchedule.parse(r.schedule)
      if schedule.stages[0].batch != cfg.batch_size:
        raise ConfigError(f"ramp.schedule={r.schedule!r} starts at batch "
                          f"{schedule.stages[0].batch} but batch_size={cfg.batch_size}; set "
                          f"batch_size={schedule.stages[0].batch}")
      return cls(cfg.batch_size, cfg.seq_len, schedule=schedule)
    if r.controller == "branched":
      branched = BranchedController(tuple(r.branch_ks), r.epsilon, r.every_tokens,
                                    r.branch_tokens, r.max_batch or cfg.batch_size)
      return cls(cfg.batch_size, cfg.seq_len, branched=branched,
                 start_tokens=cfg.optim.warmup_tokens)
    if r.estimate not in ESTIMATES:
      raise ConfigError(f"ramp.estimate={r.estimate!r} is unknown; choose one of "
                        f"{tuple(ESTIMATES)}")
    multiple = r.multiple or cfg.batch_size
    controller = NoiseScaleController(r.factor, cfg.batch_size, r.max_batch or cfg.batch_size,
                                      multiple, r.every_tokens)
    return cls(cfg.batch_size, cfg.seq_len, controller=controller, estimate=r.estimate,
               start_tokens=cfg.optim.warmup_tokens)

  def batches(self) -> tuple[int, ...]:
    """Every batch the run may train at (each must fit the layout and the data shards)."""
    if self.schedule:
      return tuple(s.batch for s in self.schedule.stages)
    if self.branched:  # every product of the tested multiples up to max_batch
      found, todo = {self.first}, [self.first]
      while todo:
        b = todo.pop()
        for k in self.branched.ks_for(b)[1:]:
          if k * b not in found:
            found.add(k * b)
            todo.append(k * b)
      return tuple(sorted(found))
    c = self.controller
    return tuple(range(c.min_batch, c.max_batch + 1, c.multiple))

  def first_change_tokens(self) -> int:
    """Tokens before the first possible change (a change inside the warmup is refused)."""
    if self.schedule:
      return self.schedule.stages[1].start_tokens if len(self.schedule.stages) > 1 else 0
    return self.start_tokens

  def batch_for(self, step: int, tokens: int, changes: tuple[Change, ...]) -> int:
    """The batch of `step`, which starts after `tokens` tokens."""
    if self.schedule:
      return self.schedule.batch_at(tokens)
    return batch_at_step(self.first, changes, step)

  def decide(self, changes: tuple[Change, ...], step: int, tokens: int,
             metrics: Mapping[str, Any]) -> tuple[Change, ...]:
    """The changes after step `step` (ending at `tokens`) reported `metrics`."""
    if not self.controller or tokens < self.start_tokens or self.estimate not in metrics:
      return changes
    current = changes[-1].batch if changes else self.first
    last = changes[-1].tokens if changes else 0
    noise = float(metrics[ESTIMATES[self.estimate]]) / self.seq_len  # tokens -> sequences
    batch = self.controller.next_batch(current, tokens, last, noise)
    if batch == current:
      return changes
    return changes + (Change(step + 2, batch, tokens),)


def stage_config(cfg: ml_collections.ConfigDict, batch: int) -> ml_collections.ConfigDict:
  """The run's config at `batch`: the rate by optim.batch_scaling from the first batch (unless
  optim.reference_batch names another), and β2 held in tokens if ramp.beta2_in_tokens."""
  c = ml_collections.ConfigDict(cfg.to_dict())
  c.batch_size = batch
  if not c.optim.reference_batch:
    c.optim.reference_batch = cfg.batch_size
  if cfg.ramp.beta2_in_tokens:
    c.optim.b2 = beta2_fixed_in_tokens(cfg.optim.b2, batch, cfg.batch_size)
  return c
