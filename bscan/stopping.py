"""When a run ends (JAX-free, pure): the scan point's stop rule and the divergence rule.

A scan point trains until its smoothed train loss reaches the target loss, then `overshoot`
× that many steps more (so the analysis' own smoothed curve crosses the target too), capped
at `max_steps`. The smoothing is an EMA whose time constant is a number of tokens, not steps.
A run diverges on a non-finite loss, or when its loss stays above the first step's loss plus
`margin` nats for `patience` consecutive steps (a far-too-high learning rate can send the
loss to 1e8 without ever producing a NaN).
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class LoopState:
  """What the rules remember between steps; checkpointed so a resumed run decides alike."""

  loss_ema: float = 0.0
  loss_ema_count: int = 0
  target_step: int = 0  # first step whose smoothed loss reached the target (0 = not yet)
  initial_loss: float | None = None  # the first step's train loss
  steps_above: int = 0  # consecutive steps with the loss above initial_loss + margin
  rows: int = 0  # metric rows written up to this step (a resume checks none went missing)
  tokens: int = 0  # tokens trained up to this step (0 in checkpoints before batch ramps)
  # A ramp controller's decisions (bscan.batch_schedule.Change as [step, batch, tokens]).
  changes: tuple[tuple[int, int, int], ...] = ()
  loss_ema_weight: float = 0.0  # Σ of the EMA's weights: its bias correction at any batch
  last_test_tokens: int = 0  # a branched ramp controller's last test
  overhead_tokens: int = 0  # tokens it trained in branches it did not keep

  def __post_init__(self):  # JSON (a checkpoint) gives lists
    object.__setattr__(self, "changes", tuple(tuple(c) for c in self.changes))


@dataclasses.dataclass(frozen=True)
class StopRule:
  """Target (0 = none: a fixed budget), overshoot fraction, step cap, EMA decay per step."""

  target_loss: float
  overshoot: float
  max_steps: int
  decay: float  # exp(−batch_tokens / smoothing_tokens) at the run's first batch
  smoothing_tokens: float = 0.0  # the EMA's time constant; 0: `decay` at every step

  @classmethod
  def from_tokens(cls, target_loss: float, overshoot: float, max_steps: int,
                  batch_tokens: int, smoothing_tokens: float) -> StopRule:
    """The rule with its smoothing given in tokens (the same window for every batch size)."""
    return cls(target_loss, overshoot, max_steps, math.exp(-batch_tokens / smoothing_tokens),
               smoothing_tokens)

  def smoothed(self, s: LoopState) -> float:
    """The bias-corrected EMA of the train loss (NaN before the first step)."""
    if not s.loss_ema_count:
      return math.nan
    # Checkpoints from before batch ramps hold no weight: every step had `decay`.
    weight = s.loss_ema_weight or 1.0 - self.decay**s.loss_ema_count
    return s.loss_ema / weight

  def update(self, s: LoopState, step: int, loss: float, batch_tokens: int = 0) -> LoopState:
    """The state after `step` trained on `batch_tokens` tokens with train loss `loss`."""
    if not self.target_loss:
      return s
    decay = self.decay
    if batch_tokens and self.smoothing_tokens:  # a step of k× the tokens weighs k× as much
      decay = math.exp(-batch_tokens / self.smoothing_tokens)
    weight = s.loss_ema_weight or 1.0 - self.decay**s.loss_ema_count
    s = dataclasses.replace(s, loss_ema=decay * s.loss_ema + (1 - decay) * loss,
                            loss_ema_weight=decay * weight + (1 - decay),
                            loss_ema_count=s.loss_ema_count + 1)
    if not s.target_step and self.smoothed(s) <= self.target_loss:
      s = dataclasses.replace(s, target_step=step)
    return s

  def stop_step(self, s: LoopState) -> int:
    """The last step to train: the cap, or the target step plus the overshoot."""
    if s.target_step:
      return min(self.max_steps, s.target_step + math.ceil(self.overshoot * s.target_step))
    return self.max_steps

  def reason(self, s: LoopState) -> str:
    """Why a run that reached its stop step ended."""
    if s.target_step:
      return f"reached target loss {self.target_loss} at step {s.target_step}"
    if self.target_loss:
      return f"cap of {self.max_steps} steps reached before target loss {self.target_loss}"
    return f"step budget {self.max_steps} used"


@dataclasses.dataclass(frozen=True)
class DivergenceRule:
  """Diverged: a non-finite loss, or `patience` steps in a row above the first loss + margin."""

  margin: float  # nats above the first step's loss
  patience: int  # consecutive steps

  def update(self, s: LoopState, loss: float) -> LoopState:
    """Records the first loss and counts consecutive steps above first + margin."""
    if s.initial_loss is None:
      return dataclasses.replace(s, initial_loss=loss if math.isfinite(loss) else None)
    above = math.isfinite(loss) and loss > s.initial_loss + self.margin
    return dataclasses.replace(s, steps_above=s.steps_above + 1 if above else 0)

  def diverged(self, s: LoopState, loss: float) -> str:
    """'' while healthy, else the reason (checked after `update` with the same loss)."""
    if not math.isfinite(loss):
      return f"non-finite train loss ({loss})"
    if self.patience and s.steps_above >= self.patience:
      return (f"train loss {loss:.4g} stayed above the first step's {s.initial_loss:.4g} + "
              f"{self.margin} nats for {s.steps_above} steps")
    return ""
