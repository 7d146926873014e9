"""A batch that grows during a run (bscan.batch_schedule through the trainer).

The ramp's rows carry each step's batch, tokens and rate; its token stream is a fixed-batch
run's; a run preempted across a change resumes to the uninterrupted rows, on the same 8
devices and on 4 (a subprocess: the device count is fixed per process); a misfit rule and
the layouts a ramp cannot keep are refused before anything is built.
"""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from bscan import config as config_lib
from bscan import data as data_lib
from bscan import train
from bscan import workdir as workdir_lib
from bscan.errors import ConfigError
import ramp_config
from tiny_run import Interrupting, rows

CONFIG = "tests/ramp_config.py"
SUBPROCESS_TIMEOUT_S = 300


def _cfg(pystdlib_cfg, arg: str = "schedule"):
  c = ramp_config.get_config(arg)
  c.data.data_dir = pystdlib_cfg.data.data_dir
  return c


@pytest.fixture(scope="module", name="uninterrupted")
def _uninterrupted(pystdlib_cfg, tmp_path_factory):
  """Each ramp's uninterrupted rows and the batches its trainer read."""
  out = {}
  make = data_lib.make_train_iterator
  for arg in ("schedule", "controller", "branched"):
    read = []

    def recording(*a, **k):
      it = make(*a, **k)
      return _Recording(it, read)

    workdir = tmp_path_factory.mktemp(f"ramp_{arg}")
    data_lib.make_train_iterator = recording
    try:
      assert train.run(_cfg(pystdlib_cfg, arg), workdir) == "done"
    finally:
      data_lib.make_train_iterator = make
    out[arg] = (rows(workdir), read, workdir)
  return out


class _Recording(Interrupting):
  """Keeps every batch the trainer reads."""

  def __init__(self, parent, read: list):
    super().__init__(parent, at=-1, how="")
    self._read = read

  def __next__(self):
    batch = next(self._parent)
    self._read.append(batch)
    return batch


def test_rows_carry_the_batch_the_tokens_and_the_scaled_rate(uninterrupted):
  got, _, workdir = uninterrupted["schedule"]
  assert [r["batch_size"] for r in got] == [8] * 4 + [16] * 4 + [32] * 7
  assert [r["tokens"] for r in got] == list(np.cumsum([r["batch_size"] * 32 for r in got]))
  assert got[-1]["tokens"] == ramp_config.TOKENS
  lr = {r["batch_size"]: r["lr"] for r in got}  # √ rule for AdamW, from batch 8
  assert lr[16] == pytest.approx(lr[8] * 2**0.5) and lr[32] == pytest.approx(lr[8] * 2)
  status = workdir_lib.read_status(workdir)
  assert (status.step, status.tokens) == (15, ramp_config.TOKENS)
  assert "10240 tokens trained" in status.reason


@pytest.mark.parametrize("arg", ["schedule", "branched"])
def test_the_token_stream_is_the_fixed_batch_runs(uninterrupted, pystdlib_cfg, arg):
  """Per data shard, the ramp's rows are the batch-8 stream's rows in order: nothing skipped
  or repeated across a change (the branched tests read their Δ once, whichever they keep)."""
  got_rows, read, _ = uninterrupted[arg]
  fixed = data_lib.make_train_iterator(_cfg(pystdlib_cfg))  # batch 8 for the whole run
  tokens = got_rows[-1]["tokens"]
  stream = np.concatenate([next(fixed) for _ in range(tokens // (8 * 32))])
  shards = 8
  assert sum(len(b) for b in read) * 32 == tokens
  for s in range(shards):
    got = np.concatenate([b[len(b) // shards * s:len(b) // shards * (s + 1)] for b in read])
    np.testing.assert_array_equal(got, stream[s::shards])


def test_the_controller_grows_the_batch_from_the_measured_noise_scale(uninterrupted):
  got, _, _ = uninterrupted["controller"]
  batches = [r["batch_size"] for r in got]
  # B_simple ≈ 1.2 sequences at step 4 (1,024 tokens: its first chance) → 24 × 1.2 → 24,
  # from step 6 (step 5 was dispatched before step 4's metrics arrived).
  assert batches[:5] == [8] * 5 and set(batches[5:]) == {24}
  assert 24 * got[3]["b_simple_seqs"] >= 24 > 24 * got[3]["b_simple_seqs"] - 8


def test_the_branched_controller_keeps_the_branch_and_counts_the_rest(uninterrupted):
  got, _, _ = uninterrupted["branched"]
  # Tests at 2,048 tokens (batch 8: 2 steps vs 1 at 16) and 2,048 tokens later (batch 16);
  # ε = 0.3 nats keeps the larger branch both times.
  assert [r["batch_size"] for r in got] == [8] * 8 + [16] * 5 + [32] * 6
  assert [r["ramp_overhead_tokens"] for r in got] == [0] * 8 + [512] * 5 + [1536] * 6
  assert got[-1]["tokens"] >= ramp_config.TOKENS
  # The kept branch's last step carries the held-out loss the test compared.
  assert "eval_loss" in got[8] and "eval_loss" in got[13]


def _assert_rows_close(got, want):
  assert [r["step"] for r in got] == [r["step"] for r in want]
  for g, w in zip(got, want):
    assert g.keys() == w.keys()
    for key in w:
      np.testing.assert_allclose(g[key], w[key], rtol=2e-5, atol=1e-6, err_msg=f"{key} step "
                                 f"{w['step']}")


@pytest.mark.parametrize("arg, at", [("schedule", 6), ("controller", 5), ("branched", 11)])
def test_preempted_across_a_change_resumes_to_the_uninterrupted_rows(
    uninterrupted, pystdlib_cfg, tmp_path, monkeypatch, arg, at):
  make = data_lib.make_train_iterator
  monkeypatch.setattr(data_lib, "make_train_iterator",
                      lambda *a, **k: Interrupting(make(*a, **k), at, "sigterm"))
  assert train.run(_cfg(pystdlib_cfg, arg), tmp_path) == "preempted"
  monkeypatch.setattr(data_lib, "make_train_iterator", make)
  assert train.run(_cfg(pystdlib_cfg, arg), tmp_path) == "done"
  want, _, _ = uninterrupted[arg]
  assert rows(tmp_path) == want  # the same process and devices: bit for bit


def test_resumed_on_4_devices_after_a_change_on_8(uninterrupted, pystdlib_cfg, tmp_path,
                                                  monkeypatch):
  """8 devices × 1 microbatch of one sequence, then 4 × 2: B_small is one sequence on both,
  so the rows agree to float32 rounding; config.json then records the 4-device layout."""
  make = data_lib.make_train_iterator
  monkeypatch.setattr(data_lib, "make_train_iterator",
                      lambda *a, **k: Interrupting(make(*a, **k), 6, "sigterm"))
  assert train.run(_cfg(pystdlib_cfg), tmp_path) == "preempted"
  assert workdir_lib.read_config(tmp_path).derived["num_devices"] == 8
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "JAX_PLATFORMS": "cpu"}
  done = subprocess.run(
      [sys.executable, "-m", "experiments.train", f"--config={CONFIG}", f"--workdir={tmp_path}",
       f"--config.data.data_dir={pystdlib_cfg.data.data_dir}"],
      env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S, check=False)
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
  assert "resumed from the checkpoint at step 6" in done.stdout
  derived = workdir_lib.read_config(tmp_path).derived
  assert (derived["num_devices"], derived["num_microbatches"]) == (4, 2)
  want, _, _ = uninterrupted["schedule"]
  _assert_rows_close(rows(tmp_path), want)


@pytest.mark.xdist_group("multiprocess")  # never beside another multi-process test
def test_two_processes_ramp_as_one_process_does(uninterrupted, pystdlib_cfg, tmp_path):
  """2 processes × 4 devices, each reading its 4 of the 8 data shards, through the branched
  controller's tests (each process merges its own shards' rows): one process's rows."""
  p = subprocess.Popen(
      [sys.executable, "-m", "launch.multiprocess", "--processes=2", "--devices_per_process=4",
       "--", f"--config={CONFIG}:branched", f"--workdir={tmp_path}",
       f"--config.data.data_dir={pystdlib_cfg.data.data_dir}"],
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
  try:
    out, _ = p.communicate(timeout=SUBPROCESS_TIMEOUT_S)
  finally:  # leave no process behind, even on a timeout
    try:
      os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
    p.wait()
  assert p.returncode == 0, out[-3000:]
  assert workdir_lib.read_config(tmp_path).derived["num_processes"] == 2
  want, _, _ = uninterrupted["branched"]
  _assert_rows_close(rows(tmp_path), want)


def test_a_misfit_rule_and_unkeepable_layouts_are_refused_before_building(pystdlib_cfg):
  def refused(change, message):
    c = _cfg(pystdlib_cfg)
    change(c)
    with pytest.raises(ConfigError, match=message):
      config_lib.validate(c, num_devices=8)

  def sgd_sqrt(c):
    c.optim.name, c.optim.batch_scaling = "sgd", "sqrt"

  refused(sgd_sqrt, r"'sqrt' does not fit optim.name='sgd'")
  refused(lambda c: c.optim.update(batch_scaling="none"), "keeps the learning rate fixed")
  refused(lambda c: c.data.update(shards=16), r"set data.shards=8")
  refused(lambda c: c.ramp.update(schedule="0:8,1k:12"), r"batch 12 of the ramp is not divisible")
  refused(lambda c: c.ramp.update(schedule="0:16,1k:32"), "set batch_size=16")
  refused(lambda c: c.optim.update(warmup_tokens=2048), "falls inside the warmup")
  refused(lambda c: c.optim.update(schedule="cosine"), "a ramp needs 'constant'")
  refused(lambda c: c.data.update(worker_count=2), "set data.worker_count=0")
  refused(lambda c: c.ramp.update(controller="noise"), "both set")

  def blind_controller(c):
    c.ramp.update(schedule="", controller="noise")
    c.noise.enabled = False

  refused(blind_controller, "set noise.enabled=True")
  sgd = _cfg(pystdlib_cfg)
  sgd.optim.name = "sgd"  # 'auto' is linear for SGD
  config_lib.validate(sgd, num_devices=8)
  assert config_lib.peak_learning_rate(
      train.batch_schedule.stage_config(sgd, 32), 100) == pytest.approx(4 * sgd.optim.lr)


def test_a_ramp_is_not_packed(pystdlib_cfg, tmp_path):
  specs = [train.RunSpec(_cfg(pystdlib_cfg), tmp_path / str(i), f"seed={i}") for i in range(2)]
  specs[1].cfg.seed = 1
  with pytest.raises(ConfigError, match="without --pack"):
    train.run_packed(specs)


def test_merge_batches_keeps_each_shards_rows_in_order():
  """Two batches of 2 shards × 2 rows → one of 2 shards × 4 rows: shard 0's rows first."""
  from bscan import ramp_branches  # pylint: disable=g-import-not-at-top
  a = np.arange(4)[:, None] * np.ones((1, 3), int)  # rows 0, 1 (shard 0), 2, 3 (shard 1)
  merged = ramp_branches.merge_batches([a, a + 10], shards=2)
  np.testing.assert_array_equal(merged[:, 0], [0, 1, 10, 11, 2, 3, 12, 13])
