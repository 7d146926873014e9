"""Packed runs (one vmapped step for runs of one shape) equal their solo runs, row for row."""

import copy
import math

import numpy as np
import orbax.checkpoint as ocp
import pytest

from bscan import data as data_lib
from bscan import train
from bscan import workdir as workdir_lib
from bscan.errors import ConfigError
from experiments.configs import base
from tiny_run import Interrupting, rows as _rows, tiny as _tiny

# vmap batches the matmuls: the same math, summed in another order, so float32 rounding
# differs and training amplifies it (measured over 12 steps at lr 1e-2: ≤ 1e-6 in the loss,
# 7e-5 relative in the gradient norm). B_simple is a ratio of differences: it moves more.
# Squared gradient norms double the gradients' rounding, and at lr 1e-2 the vmapped and solo
# trajectories drift apart in float32 (7e-4 by step 12 on an AMD EPYC); the estimates built
# from their differences more.
RTOL = {"b_simple_tokens": 1e-2, "b_simple_seqs": 1e-2, "ns_gsq": 1e-2, "ns_trace": 1e-2,
        "ns_g_small_sq": 5e-3, "ns_g_big_sq": 5e-3}


def _specs(pystdlib_cfg, tmp_path, name: str) -> list[train.RunSpec]:
  """Three runs of one shape and seed (one data stream): three learning rates, one of them
  with a shorter budget."""
  cfg = _tiny(base.get_base_config(), pystdlib_cfg, steps=12)
  variants = [dict(lr=3e-3, seed=0, steps=12), dict(lr=1e-2, seed=0, steps=12),
              dict(lr=1e-3, seed=0, steps=7)]
  specs = []
  for i, v in enumerate(variants):
    c = copy.deepcopy(cfg)
    c.optim.lr, c.seed, c.budget.train_steps = v["lr"], v["seed"], v["steps"]
    specs.append(train.RunSpec(c, tmp_path / name / str(i), f"run{i}"))
  return specs


def _assert_rows_close(got: list[dict], want: list[dict]) -> None:
  assert [r["step"] for r in got] == [r["step"] for r in want]
  for g, w in zip(got, want):
    assert g.keys() == w.keys(), (g.keys() ^ w.keys())
    for key, value in w.items():
      if isinstance(value, float) and math.isfinite(value):
        assert g[key] == pytest.approx(value, rel=RTOL.get(key, 5e-4), abs=1e-6), (g["step"], key)
      else:
        assert g[key] == value, (g["step"], key)


def _params(workdir, step: int) -> dict:
  path = workdir_lib.checkpoint_dir(workdir) / str(step) / "state"
  return ocp.PyTreeCheckpointer().restore(path)["params"]


@pytest.fixture(scope="module")
def solo(pystdlib_cfg, tmp_path_factory):
  """Each of the three runs trained alone: (specs, rows per run)."""
  specs = _specs(pystdlib_cfg, tmp_path_factory.mktemp("solo"), "solo")
  for s in specs:
    assert train.run(s.cfg, s.workdir) == "done"
  return specs, [_rows(s.workdir) for s in specs]


def test_packed_runs_equal_their_solo_runs(solo, pystdlib_cfg, tmp_path, capsys):
  solo_specs, solo_rows = solo
  specs = _specs(pystdlib_cfg, tmp_path, "packed")
  assert train.run_packed(specs) == ["done"] * 3
  assert "3 packed runs read one data stream" in capsys.readouterr().out
  for s, want, alone in zip(specs, solo_rows, solo_specs):
    _assert_rows_close(_rows(s.workdir), want)
    got_status, want_status = (workdir_lib.read_status(w) for w in (s.workdir, alone.workdir))
    assert (got_status.status, got_status.step, got_status.reason) == (
        want_status.status, want_status.step, want_status.reason)
    steps = sorted(int(p.name) for p in workdir_lib.checkpoint_dir(s.workdir).iterdir()
                   if p.name.isdigit())
    assert steps == sorted(int(p.name) for p in workdir_lib.checkpoint_dir(alone.workdir)
                           .iterdir() if p.name.isdigit())
    got, want = _params(s.workdir, steps[-1]), _params(alone.workdir, steps[-1])
    for g, w in zip(_leaves(got), _leaves(want)):
      # Per leaf, not per element: Adam turns a weight's near-zero gradient (rounding noise
      # here) into a step of size lr, so single weights may differ by ~lr.
      assert np.linalg.norm(g - w) <= 1e-2 * np.linalg.norm(w) + 1e-6
  # The short run stopped at its own step 7; the pack trained on without it.
  assert [r["step"] for r in _rows(specs[2].workdir)][-1] == 7
  assert _rows(specs[0].workdir)[-1]["step"] == 12


def _leaves(tree) -> list[np.ndarray]:
  if isinstance(tree, dict):
    return [x for k in sorted(tree) for x in _leaves(tree[k])]
  return [np.asarray(tree)]


def test_preempted_pack_resumes_to_the_solo_rows(solo, pystdlib_cfg, tmp_path, monkeypatch):
  _, solo_rows = solo
  specs = _specs(pystdlib_cfg, tmp_path, "packed")
  make = data_lib.make_train_iterator
  made = []

  def interrupting(*a, **k):  # the first run's iterator sends SIGTERM at its 9th batch
    made.append(1)
    it = make(*a, **k)
    return Interrupting(it, 9, "sigterm") if len(made) == 1 else it

  monkeypatch.setattr(data_lib, "make_train_iterator", interrupting)
  # Run 2 stopped at step 7 (done) before the SIGTERM at step 9; the others checkpoint.
  assert train.run_packed(specs) == ["preempted", "preempted", "done"]
  assert workdir_lib.read_status(specs[0].workdir).step == 9
  monkeypatch.setattr(data_lib, "make_train_iterator", make)
  assert train.run_packed(specs) == ["done"] * 3
  for s, want in zip(specs, solo_rows):
    _assert_rows_close(_rows(s.workdir), want)


def test_packed_runs_with_other_seeds_keep_their_own_data(solo, pystdlib_cfg, tmp_path,
                                                           capsys):
  _, solo_rows = solo
  specs = _specs(pystdlib_cfg, tmp_path, "packed")[:2]
  specs[1].cfg.seed = 1
  assert train.run_packed(specs) == ["done", "done"]
  assert "one data stream" not in capsys.readouterr().out
  _assert_rows_close(_rows(specs[0].workdir), solo_rows[0])
  assert _rows(specs[1].workdir)[0]["train_loss"] != solo_rows[1][0]["train_loss"]


def test_diverged_run_leaves_the_pack(pystdlib_cfg, tmp_path):
  specs = _specs(pystdlib_cfg, tmp_path, "packed")[:2]
  specs[1].cfg.optim.lr = 1e30
  assert train.run_packed(specs) == ["done", "diverged"]
  assert _rows(specs[0].workdir)[-1]["step"] == 12
  assert "non-finite" in workdir_lib.read_status(specs[1].workdir).reason


def test_runs_of_different_shapes_do_not_pack(pystdlib_cfg, tmp_path):
  specs = _specs(pystdlib_cfg, tmp_path, "packed")[:2]
  specs[1].cfg.batch_size = 8
  with pytest.raises(ConfigError, match=r"cannot train packed: they differ in \['batch_size'\]"):
    train.run_packed(specs)
  assert not (specs[0].workdir / workdir_lib.STATUS).exists()  # refused before anything ran


def test_finished_runs_are_not_repacked(pystdlib_cfg, tmp_path):
  specs = _specs(pystdlib_cfg, tmp_path, "packed")
  first = copy.deepcopy(specs[0])
  assert train.run(first.cfg, first.workdir) == "done"
  assert train.run_packed(specs) == ["done"] * 3
  assert [r["step"] for r in _rows(specs[0].workdir)] == list(range(1, 13))  # not retrained
