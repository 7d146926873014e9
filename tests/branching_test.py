"""Branch runs start from a reference checkpoint: params, optimizer state and data position."""

import copy
import math

import jax
import numpy as np
import pytest

from bscan import branching
from bscan import checkpoint as checkpoint_lib
from bscan import data as data_lib
from bscan import noise_scale
from bscan import optim
from bscan import tasks
from bscan import train
from bscan import train_step as step_lib
from bscan.errors import ConfigError
from experiments.configs import base
from tiny_run import rows as _rows, tiny as _tiny

B, T = 16, 32


@pytest.fixture(scope="module")
def ref(pystdlib_cfg, tmp_path_factory):
  """A 12-step reference run that keeps its checkpoints at steps 4, 8 and 12."""
  cfg = _tiny(base.get_base_config(), pystdlib_cfg, steps=12)
  cfg.checkpoint.keep = 5
  cfg.optim.lr = 3e-3
  workdir = tmp_path_factory.mktemp("sweep") / "ref"
  assert train.run(cfg, workdir) == "done"
  return cfg, workdir, _rows(workdir)


def _branch(ref_cfg, k: int, steps: int, replicate: int = 0, at: int = 4):
  c = copy.deepcopy(ref_cfg)
  c.batch_size = k * B
  c.branch.from_workdir, c.branch.from_step, c.branch.replicate = "ref", at, replicate
  c.budget.train_steps, c.budget.train_tokens = 0, steps * B * T  # Δ: the same for every k
  c.optim.batch_scaling, c.optim.reference_batch = "auto", B
  return c


def test_a_k1_branch_continues_the_reference_exactly(ref):
  cfg, workdir, ref_rows = ref
  branch = workdir.parent / "k1"
  assert train.run(_branch(cfg, k=1, steps=4), branch) == "done"
  got = _rows(branch)
  want = [r for r in ref_rows if 5 <= r["step"] <= 8]
  assert [r["step"] for r in got] == [1, 2, 3, 4]
  for g, w in zip(got, want):  # restored params, Adam moments and data position
    assert g["train_loss"] == pytest.approx(w["train_loss"], rel=1e-5)
    assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-4)


def test_a_k2_branch_scales_the_rate_by_sqrt2_for_adamw_and_reads_the_same_tokens(ref):
  cfg, workdir, _ = ref
  branch = workdir.parent / "k2"
  assert train.run(_branch(cfg, k=2, steps=4), branch) == "done"
  got = _rows(branch)
  assert [r["step"] for r in got] == [1, 2]  # Δ tokens at twice the batch
  assert got[0]["lr"] == pytest.approx(3e-3 * math.sqrt(2), rel=1e-6)
  # Per shard, a 2B batch is two consecutive B batches of the reference's stream.
  small = data_lib.make_train_iterator(cfg)
  big = data_lib.make_train_iterator(_branch(cfg, k=2, steps=4))
  first, second, both = next(small), next(small), next(big)
  shards = data_lib.num_shards(cfg)
  per = B // shards
  for s in range(shards):
    np.testing.assert_array_equal(both[2 * per * s:2 * per * (s + 1)], np.concatenate(
        [first[per * s:per * (s + 1)], second[per * s:per * (s + 1)]]))


def _abstract(cfg):
  task = tasks.get(cfg)
  model = task.model(task.shape())
  mesh = step_lib.make_mesh()
  tx = optim.optimizer(cfg, optim.schedule(cfg, cfg.optim.lr))
  groups = noise_scale.param_groups(jax.eval_shape(model.init_params, jax.random.key(0)))
  fresh = step_lib.init_state(model.init_params, tx, jax.random.key(0), mesh, groups)
  return checkpoint_lib.abstract(fresh)


def test_replicate_j_reads_the_stream_after_j_deltas(ref):
  cfg, workdir, _ = ref
  branch_cfg = _branch(cfg, k=1, steps=3, replicate=2, at=4)
  it = data_lib.make_train_iterator(branch_cfg)
  branching.restore(branch_cfg, workdir.parent / "rep2", data_lib.num_shards(cfg),
                    _abstract(cfg), it, B * T)
  stream = data_lib.make_train_iterator(cfg)
  for _ in range(4 + 2 * 3):  # the checkpoint's position, then replicates 0 and 1's Δ
    next(stream)
  np.testing.assert_array_equal(next(it), next(stream))


@pytest.mark.parametrize("change, message", [
    (lambda c: setattr(c.branch, "from_step", 6), r"has no checkpoint at step 6; it has \[4, 8, 12\]"),
    (lambda c: setattr(c.branch, "from_workdir", "nowhere"), "holds no run"),
    (lambda c: setattr(c.data, "shards", 4), "set data.shards=16 here"),
    (lambda c: setattr(c, "seed", 1), "use branch.replicate"),
])
def test_a_branch_that_cannot_continue_its_reference_says_why(ref, change, message):
  cfg, workdir, _ = ref
  branch_cfg = _branch(cfg, k=1, steps=2)
  change(branch_cfg)
  with pytest.raises(ConfigError, match=message):
    train.run(branch_cfg, workdir.parent / f"bad{abs(hash(message))}")


def test_branch_fields_are_checked_before_anything_is_built(ref):
  cfg, _, _ = ref
  bad = _branch(cfg, k=1, steps=2)
  bad.budget.target_loss, bad.budget.max_tokens = 2.0, 10_000
  with pytest.raises(ConfigError, match="a branch trains a fixed Δ"):
    train.config_lib.validate(bad, num_devices=jax.device_count())
  bad = _branch(cfg, k=1, steps=2)
  bad.optim.batch_scaling = "linear"
  with pytest.raises(ConfigError, match="does not fit optim.name='adamw'"):
    train.config_lib.validate(bad, num_devices=jax.device_count())
