"""Batch schedules in tokens, their learning rates and β2, and the noise-scale controller."""

import math

import numpy as np
import pytest

from bscan import batch_schedule as bs
from bscan import data as data_lib
from bscan.errors import ConfigError
from experiments.configs import base


def test_parse_and_batch_at_thresholds_in_tokens():
  s = bs.BatchSchedule.parse("0:64, 2M:128,8.5M:256")
  assert s.stages == (bs.Stage(0, 64), bs.Stage(2_000_000, 128), bs.Stage(8_500_000, 256))
  assert [s.batch_at(t) for t in (0, 1_999_999, 2_000_000, 8_499_999, 10**9)] == [
      64, 64, 128, 128, 256]
  assert bs.parse_tokens("512k") == 512_000 and bs.parse_tokens("65536") == 65536


@pytest.mark.parametrize("text, message", [
    ("64", "must look like TOKENS:BATCH"),
    ("0:64,2M", "must look like TOKENS:BATCH"),
    ("0:0", "positive whole number"),
    ("0:6.5", "positive whole number"),
    ("1k:64", "starts at token 0"),
    ("0:64,2M:128,1M:256", "thresholds must increase"),
    ("0:128,2M:64", "goes down from 128 to 64"),
    ("0:64,2X:128", "'2X' is not a token count"),
    ("0:64,1.5:128", "not a whole number of tokens"),
])
def test_bad_schedules_name_the_item_and_the_fix(text, message):
  with pytest.raises(ConfigError, match=message):
    bs.BatchSchedule.parse(text)


def test_every_batch_must_fit_the_layout_and_keep_the_data_shards():
  bs.check_batches([16, 32, 64], num_devices=8, microbatch=2, data_shards=16)
  with pytest.raises(ConfigError, match="batch 16 of the ramp is not divisible by devices"):
    bs.check_batches([16, 32, 64], num_devices=8, microbatch=4, data_shards=16)
  with pytest.raises(ConfigError, match=r"set data.shards=8"):
    bs.check_batches([8, 16], 1, 1, data_shards=16)
  bs.check_batches([8, 16], 1, 1, data_shards=8)
  bs.check_batches([8, 24], 8, 0, data_shards=8)  # microbatch 0: chosen per batch
  with pytest.raises(ConfigError, match="cannot be shared by 3 processes"):
    bs.check_batches([8, 16], 1, 1, data_shards=8, num_processes=3)


def test_beta2_held_in_tokens_keeps_the_half_life():
  b2 = bs.beta2_fixed_in_tokens(0.95, 256, 64)
  assert b2 == pytest.approx(0.95**4)
  # Half-life in tokens: steps to halve × tokens per step, equal at both batches.
  half = lambda beta, batch: math.log(0.5) / math.log(beta) * batch
  assert half(b2, 256) == pytest.approx(half(0.95, 64))


def test_noise_scale_controller_grows_only_on_its_cadence_to_valid_batches():
  c = bs.NoiseScaleController(factor=1.0, min_batch=8, max_batch=64, multiple=8,
                              every_tokens=1000)
  assert c.next_batch(8, tokens=500, last_change_tokens=0, noise_scale=40.0) == 8  # too soon
  assert c.next_batch(8, tokens=1000, last_change_tokens=0, noise_scale=41.9) == 40
  assert c.next_batch(40, tokens=5000, last_change_tokens=1000, noise_scale=10.0) == 40  # up only
  assert c.next_batch(40, tokens=5000, last_change_tokens=1000, noise_scale=1e6) == 64  # clipped
  assert c.next_batch(8, tokens=5000, last_change_tokens=0, noise_scale=float("nan")) == 8
  with pytest.raises(ConfigError, match="must be multiples of 8"):
    bs.NoiseScaleController(1.0, 4, 64, 8, 0)


def test_a_grown_batch_reads_the_same_token_stream(pystdlib_cfg):
  """Per shard, steps at 2B read the rows the B run reads next: no token skipped or repeated."""
  cfg = base.get_base_config()
  cfg.data, cfg.tokenizer = pystdlib_cfg.data, pystdlib_cfg.tokenizer
  cfg.seq_len, cfg.batch_size = 32, 8
  small = data_lib.make_train_iterator(cfg)
  stream = np.concatenate([next(small) for _ in range(6)])  # 6 steps at B = 8
  it = data_lib.make_train_iterator(cfg)
  first = [next(it) for _ in range(2)]
  big_cfg = cfg.copy_and_resolve_references()
  big_cfg.batch_size, big_cfg.data.shards = 16, math.gcd(8, cfg.data.shards)
  big = data_lib.make_train_iterator(big_cfg)
  big.set_state(it.get_state())
  grown = first + [next(big), next(big)]  # then 2 steps at B = 16
  shards = data_lib.num_shards(cfg)
  per = 8 // shards
  for s in range(shards):  # each shard's rows, in order, are the fixed-batch run's
    want = np.concatenate([stream[8 * i + per * s:8 * i + per * (s + 1)] for i in range(6)])
    got = np.concatenate([g[len(g) // shards * s:len(g) // shards * (s + 1)] for g in grown])
    np.testing.assert_array_equal(got, want)


def _ramp_cfg(**ramp):
  c = base.get_base_config()
  c.batch_size, c.seq_len, c.optim.warmup_tokens = 8, 128, 1000
  c.ramp.update(ramp)
  return c


def test_no_ramp_and_conflicting_ramps():
  assert bs.Ramp.from_config(base.get_base_config()) is None
  with pytest.raises(ConfigError, match="both set"):
    bs.Ramp.from_config(_ramp_cfg(schedule="0:8,1M:16", controller="noise"))
  with pytest.raises(ConfigError, match="ramp.controller='magic' is unknown"):
    bs.Ramp.from_config(_ramp_cfg(controller="magic"))
  with pytest.raises(ConfigError, match="ramp.estimate='b_crit' is unknown"):
    bs.Ramp.from_config(_ramp_cfg(controller="noise", estimate="b_crit"))


def test_a_controller_decision_applies_two_steps_later_and_only_after_warmup():
  """Step n's metrics arrive after step n + 1 is dispatched: the change starts at n + 2."""
  ramp = bs.Ramp.from_config(_ramp_cfg(controller="noise", factor=2.0, max_batch=64,
                                       multiple=8, every_tokens=2048))
  assert ramp.batches() == (8, 16, 24, 32, 40, 48, 56, 64)
  seqs = lambda n: {"b_simple": n * 128.0}  # the step reports tokens
  assert ramp.decide((), 0, 512, seqs(20)) == ()  # inside the 1,000-token warmup
  changes = ramp.decide((), 3, 3072, seqs(10.3))  # 2 × 10.3 → 20 → 16
  assert changes == (bs.Change(5, 16, 3072),)
  assert [ramp.batch_for(s, 0, changes) for s in (4, 5, 6)] == [8, 16, 16]
  assert ramp.decide(changes, 4, 4096, seqs(40)) == changes  # 1,024 tokens since: too soon
  assert ramp.decide(changes, 9, 5120, seqs(40))[-1] == bs.Change(11, 64, 5120)
  assert ramp.decide(changes, 9, 5120, {}) == changes  # no estimate this step


def test_stage_config_scales_the_rate_and_holds_beta2_in_tokens():
  from bscan import config as config_lib  # pylint: disable=g-import-not-at-top
  c = _ramp_cfg(schedule="0:8,1M:32", beta2_in_tokens=True)
  c.optim.batch_scaling = "auto"
  stage = bs.stage_config(c, 32)
  assert (stage.batch_size, stage.optim.reference_batch) == (32, 8)
  assert stage.optim.b2 == pytest.approx(c.optim.b2**4)
  assert config_lib.peak_learning_rate(stage, 100) == pytest.approx(2 * c.optim.lr)
  assert c.batch_size == 8 and c.optim.b2 == 0.95  # the run's own config is untouched


def test_branched_controller_keeps_the_largest_batch_within_epsilon():
  c = bs.BranchedController(ks=(1, 2, 4), epsilon=0.01, every_tokens=1000, branch_tokens=4096,
                            max_batch=32)
  assert c.ks_for(8) == (1, 2, 4) and c.ks_for(16) == (1, 2) and c.ks_for(32) == (1,)
  # Δ = 4,096 tokens at T = 128: 8 steps at 4·B = 32 (1 batch of 8 each), 16 at 2B, 32 at B.
  assert [c.branch_steps(1, 128, k) for k in (1, 2, 4)] == [32, 16, 8]
  assert c.choose(8, {1: 2.500, 2: 2.505, 4: 2.509}) == 32
  assert c.choose(8, {1: 2.500, 2: 2.505, 4: 2.520}) == 16
  assert c.choose(8, {1: 2.500, 2: 2.520, 4: 2.505}) == 8  # the first k beyond ε stops it
  assert c.choose(8, {1: 2.500, 2: float("nan"), 4: 2.505}) == 32  # an untested k is skipped
  assert c.due(3000, 2000) and not c.due(2999, 2000)
  ramp = bs.Ramp.from_config(_ramp_cfg(controller="branched", branch_ks=(1, 2), max_batch=64,
                                       every_tokens=1000, branch_tokens=2048))
  assert ramp.batches() == (8, 16, 32, 64)
  for bad in ((2, 4), (1,), (1, 4, 2)):
    with pytest.raises(ConfigError, match="ramp.branch_ks"):
      bs.BranchedController(bad, 0.01, 1000, 4096, 32)
