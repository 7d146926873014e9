"""The loop: resume after a crash or SIGTERM gives identical rows; divergence; every config."""

import copy
import importlib
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

from bscan import config as config_lib
from bscan import data as data_lib
from bscan import workdir as workdir_lib
from bscan import train
from experiments.configs import base
from tiny_run import Interrupting as _Interrupting, rows as _rows, tiny as _tiny

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted(p.stem for p in (REPO / "experiments/configs").glob("*.py")
                      if p.stem not in ("__init__", "base"))


def test_reference_run_rows(reference):
  _, rows, _ = reference
  assert [r["step"] for r in rows] == list(range(1, 13))
  assert [r["step"] for r in rows if "eval_loss" in r] == [3, 6, 9, 12]
  assert all(r["tokens"] == r["step"] * 16 * 32 for r in rows)
  assert rows[-1]["train_loss"] < rows[0]["train_loss"]
  assert all(r["b_simple_tokens"] is not None for r in rows[5:])


@pytest.mark.parametrize("how, at", [("crash", 11), ("crash", 4), ("sigterm", 7)])
def test_interrupted_and_resumed_run_matches(reference, tmp_path, monkeypatch, how, at):
  cfg, expected, _ = reference
  make = data_lib.make_train_iterator
  monkeypatch.setattr(data_lib, "make_train_iterator",
                      lambda *a, **k: _Interrupting(make(*a, **k), at, how))
  if how == "crash":
    with pytest.raises(RuntimeError, match="simulated crash"):
      train.run(cfg, tmp_path)
    assert workdir_lib.read_status(tmp_path).status == "failed"
    last_checkpoint = (at - 1) // 4 * 4
    assert max(r["step"] for r in _rows(tmp_path)) > last_checkpoint  # rows to be dropped
  else:
    assert train.run(cfg, tmp_path) == "preempted"
    status = workdir_lib.read_status(tmp_path)
    assert "SIGTERM" in status.reason and status.step == at and status.status == "preempted"
  monkeypatch.setattr(data_lib, "make_train_iterator", make)
  assert train.run(cfg, tmp_path) == "done"
  assert _rows(tmp_path) == expected  # each step exactly once, identical values


def test_done_run_is_not_rerun(reference, pystdlib_cfg, tmp_path):
  cfg = _tiny(base.get_base_config(), pystdlib_cfg, steps=2)
  assert train.run(cfg, tmp_path) == "done"
  assert train.run(cfg, tmp_path) == "done"
  assert len(_rows(tmp_path)) == 2


def test_workdir_with_other_config_is_refused(pystdlib_cfg, tmp_path):
  cfg = _tiny(base.get_base_config(), pystdlib_cfg, steps=2)
  assert train.run(cfg, tmp_path) == "done"
  other = copy.deepcopy(cfg)
  other.optim.lr = 0.5
  with pytest.raises(config_lib.ConfigError, match=r"different config \(fields \['optim.lr'\]\)"):
    train.run(other, tmp_path)


def test_diverged_run_is_recorded(pystdlib_cfg, tmp_path):
  cfg = _tiny(base.get_base_config(), pystdlib_cfg, steps=30)
  cfg.optim.lr, cfg.optim.clip_norm, cfg.optim.b1, cfg.optim.eps = 1e30, 0.0, 0.0, 1e-30
  assert train.run(cfg, tmp_path) == "diverged"
  status = workdir_lib.read_status(tmp_path)
  assert status.status == "diverged" and "non-finite" in status.reason
  assert _rows(tmp_path)[-1]["train_loss"] is None


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_every_config_file_trains_two_steps(name, pystdlib_cfg, tmp_path):
  module = importlib.import_module(f"experiments.configs.{name}")
  cfg, workdir, seq_len = module.get_config(""), tmp_path / "run", 32
  if cfg.task == "nqm":  # no text: only the budget and the layout shrink
    cfg.budget.target_loss, cfg.budget.train_steps, cfg.batch_size = 0.0, 2, 16
    cfg.microbatch_size, seq_len = 1, 1
  else:
    cfg = _tiny(cfg, pystdlib_cfg, steps=2)
  if cfg.branch.from_workdir:  # a branch: its reference run first, where it looks for it
    ref = importlib.import_module("experiments.configs.compare").get_config("batch=8")
    ref_dir = workdir.parent / cfg.branch.from_workdir
    assert train.run(_tiny(ref, pystdlib_cfg, steps=2), ref_dir) == "done"
    cfg.branch.from_step = 2
  assert train.run(cfg, workdir) == "done"
  derived = json.loads((workdir / "config.json").read_text())["derived"]
  assert derived["batch_sequences"] == 16 and derived["batch_tokens"] == 16 * seq_len


def test_binary_trains_and_records_config(tmp_path):
  env = {**os.environ, "BSCAN_DATA_DIR": str(tmp_path / "data"), "JAX_PLATFORMS": "cpu"}
  arg = "steps=2,batch=8,seq_len=32"
  cmd = [sys.executable, "-m", "experiments.train",
         f"--config=experiments/configs/demo.py:{arg}", f"--workdir={tmp_path / 'run'}",
         "--multihost=off", "--config.data.max_files=60", "--config.model.size=tiny"]
  subprocess.run(cmd, check=True, cwd=REPO, env=env, timeout=300)
  saved = json.loads((tmp_path / "run/config.json").read_text())
  assert saved["arg"] == arg
  assert saved["derived"]["batch_sequences"] == 8
  assert saved["derived"]["batch_tokens"] == 8 * 32
  assert workdir_lib.read_status(tmp_path / "run").status == "done"


@pytest.mark.parametrize("curvature", ["hessian", "gauss_newton"])
def test_hessian_noise_and_layer_groups_are_logged_on_their_cadence(pystdlib_cfg, tmp_path,
                                                                    curvature):
  cfg = _tiny(base.get_base_config(), pystdlib_cfg, steps=4)
  cfg.noise.hessian_every, cfg.noise.group_every, cfg.noise.curvature = 2, 4, curvature
  assert train.run(cfg, tmp_path) == "done"
  rows = _rows(tmp_path)
  assert [("b_noise_tokens" in r) for r in rows] == [False, True, False, True]
  for r in rows[1::2]:
    assert all(math.isfinite(r[k]) for k in ("ns_q_small", "ns_q_big", "ns_ghg", "ns_trhs"))
    # Defined exactly when the GᵀHG estimate is positive; never clipped.
    assert (r["b_noise_tokens"] is None) == (r["ns_ghg"] <= 0) == (r["ns_b_noise_undefined"] == 1)
    if curvature == "gauss_newton":
      assert r["ns_q_small"] >= 0 and r["ns_q_big"] >= 0  # Gauss–Newton is PSD
  groups = sorted(k for k in rows[3] if k.startswith("ns_group/"))
  assert groups == sorted(f"ns_group/{g}/b_simple_tokens" for g in (
      "embed", "block_0/attn", "block_0/mlp", "block_1/attn", "block_1/mlp", "final_norm"))
  assert not any(k.startswith("ns_group/") for k in rows[2])
