"""The stop rule (target, overshoot, cap, smoothing, resume mid-window) and the divergence rule."""

import dataclasses
import math

import pytest

from bscan import stopping


def _run(rule: stopping.StopRule, losses, state=None, first_step: int = 1):
  """Feeds losses step by step until the rule says stop; returns (last step, state)."""
  s = state or stopping.LoopState()
  step = first_step - 1
  for loss in losses:
    if step >= rule.stop_step(s):
      break
    step += 1
    s = rule.update(s, step, loss)
  return step, s


def test_target_then_overshoot():
  rule = stopping.StopRule(target_loss=2.0, overshoot=0.5, max_steps=1000, decay=0.0)
  losses = [3.0] * 9 + [1.9] * 100  # decay 0: the smoothed loss is the loss itself
  step, s = _run(rule, losses)
  assert s.target_step == 10
  assert step == rule.stop_step(s) == 15  # 10 + ceil(0.5 · 10)
  assert "reached target loss 2.0 at step 10" in rule.reason(s)


def test_cap_before_target():
  rule = stopping.StopRule(target_loss=1.0, overshoot=0.1, max_steps=7, decay=0.5)
  step, s = _run(rule, [3.0] * 100)
  assert step == 7 and s.target_step == 0
  assert rule.reason(s) == "cap of 7 steps reached before target loss 1.0"


def test_overshoot_is_capped():
  rule = stopping.StopRule(target_loss=2.0, overshoot=1.0, max_steps=12, decay=0.0)
  step, s = _run(rule, [1.0] * 100)
  assert s.target_step == 1 and step == 2  # 1 + ceil(1.0 · 1)
  rule = stopping.StopRule(target_loss=2.0, overshoot=1.0, max_steps=12, decay=0.0)
  step, s = _run(rule, [3.0] * 9 + [1.0] * 100)
  assert s.target_step == 10 and step == 12  # 20 would pass the cap


def test_smoothing_matches_bias_corrected_ema():
  d = math.exp(-512 / 2048)
  rule = stopping.StopRule.from_tokens(2.0, 0.0, 100, batch_tokens=512, smoothing_tokens=2048)
  assert rule.decay == pytest.approx(d)
  losses = [4.0, 3.0, 2.5, 2.2, 2.0, 1.9, 1.8, 1.7, 1.6, 1.5, 1.4, 1.3]
  s = stopping.LoopState()
  ema = 0.0
  for i, loss in enumerate(losses, start=1):
    s = rule.update(s, i, loss)
    ema = d * ema + (1 - d) * loss
    assert rule.smoothed(s) == pytest.approx(ema / (1 - d**i))
  # A raw loss of 2.0 at step 5 is not enough: the smoothed curve crosses later.
  first_raw = 5
  assert s.target_step > first_raw
  assert rule.smoothed(dataclasses.replace(s, loss_ema_count=0)) != rule.smoothed(s)


def test_resume_mid_window_decides_alike():
  """A state saved mid-window (as a checkpoint holds it) continues exactly like no stop."""
  rule = stopping.StopRule.from_tokens(2.0, 0.25, 500, batch_tokens=256, smoothing_tokens=4096)
  losses = [5.0 - 0.02 * i for i in range(400)]
  whole_step, whole = _run(rule, losses)
  _, half = _run(rule, losses[:37])
  saved = stopping.LoopState(**dataclasses.asdict(half))  # the checkpoint's JSON round trip
  resumed_step, resumed = _run(rule, losses[37:], saved, first_step=38)
  assert (resumed_step, resumed) == (whole_step, whole)
  assert whole.target_step > 0


def test_no_target_is_a_fixed_budget():
  rule = stopping.StopRule(target_loss=0.0, overshoot=0.1, max_steps=5, decay=0.9)
  step, s = _run(rule, [0.1] * 50)
  assert step == 5 and s.target_step == 0 and rule.reason(s) == "step budget 5 used"


def test_divergence_on_loss_far_above_start():
  rule = stopping.DivergenceRule(margin=3.0, patience=4)
  s = stopping.LoopState()
  reasons = []
  for loss in [5.5, 5.0, 9.0, 9.0, 4.0, 9.0, 9.0, 9.0, 2e8]:
    s = rule.update(s, loss)
    reasons.append(rule.diverged(s, loss))
  assert s.initial_loss == 5.5
  assert reasons[:8] == [""] * 8  # a streak broken by 4.0 starts over
  assert "stayed above the first step's 5.5 + 3.0 nats for 4 steps" in reasons[8]


def test_divergence_on_non_finite_and_patience_zero():
  rule = stopping.DivergenceRule(margin=1.0, patience=0)
  s = rule.update(stopping.LoopState(), 5.0)
  s = rule.update(s, 1e9)
  assert rule.diverged(s, 1e9) == ""  # patience 0: only NaN/inf
  assert "non-finite" in rule.diverged(rule.update(s, math.nan), math.nan)


def test_smoothing_weighs_each_step_by_its_tokens_when_the_batch_grows():
  """A step of k× the tokens decays the EMA k× as much; the bias correction is the sum of the
  weights, so a constant loss reads back exactly at any batch."""
  rule = stopping.StopRule.from_tokens(1.0, 0.0, 100, batch_tokens=256, smoothing_tokens=2048)
  batches = [256] * 4 + [1024] * 3 + [4096] * 2
  losses = [4.0, 3.5, 3.2, 3.0, 2.8, 2.6, 2.5, 2.3, 2.2]
  s, weights = stopping.LoopState(), []
  for i, (tokens, loss) in enumerate(zip(batches, losses), start=1):
    s = rule.update(s, i, loss, tokens)
    d = math.exp(-tokens / 2048)
    weights = [w * d for w in weights] + [1 - d]
    want = sum(w * x for w, x in zip(weights, losses)) / sum(weights)
    assert rule.smoothed(s) == pytest.approx(want)
  flat = stopping.LoopState()
  for i, tokens in enumerate(batches, start=1):
    flat = rule.update(flat, i, 2.5, tokens)
  assert rule.smoothed(flat) == pytest.approx(2.5)


def test_a_checkpoint_without_ema_weights_reads_as_before():
  """Checkpoints written before ramps hold count but no weight: one batch, 1 − decay^n."""
  rule = stopping.StopRule.from_tokens(2.0, 0.0, 100, batch_tokens=512, smoothing_tokens=2048)
  s = stopping.LoopState()
  for i in range(1, 6):
    s = rule.update(s, i, 3.0 - 0.1 * i)
  old = dataclasses.replace(s, loss_ema_weight=0.0)
  assert rule.smoothed(old) == pytest.approx(rule.smoothed(s))
  assert rule.update(old, 6, 2.0) == rule.update(s, 6, 2.0)
