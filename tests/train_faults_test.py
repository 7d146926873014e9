"""The trainer's fault paths: stop rule on, divergence beyond NaN, damaged run files, analysis."""

import json
import math
import shutil

import pytest

from bscan import analysis
from bscan import data as data_lib
from bscan import stopping
from bscan import train
from bscan import workdir as workdir_lib
from bscan.errors import ConfigError
from experiments.configs import base
from tiny_run import Interrupting, rows, tiny


def _crash_at_11(cfg, workdir, monkeypatch) -> None:
  """A run that crashes at step 11 (checkpoints at 4 and 8), then the data pipeline is healed."""
  make = data_lib.make_train_iterator
  monkeypatch.setattr(data_lib, "make_train_iterator",
                      lambda *a, **k: Interrupting(make(*a, **k), 11, "crash"))
  with pytest.raises(RuntimeError, match="simulated crash"):
    train.run(cfg, workdir)
  monkeypatch.setattr(data_lib, "make_train_iterator", make)


def test_scan_point_stops_at_target_plus_overshoot(pystdlib_cfg, tmp_path):
  cfg = tiny(base.get_base_config(), pystdlib_cfg, steps=60)
  cfg.budget.train_steps, cfg.budget.max_tokens = 0, 60 * 16 * 32
  cfg.budget.target_loss, cfg.budget.overshoot, cfg.budget.smoothing_tokens = 5.0, 0.5, 2048
  cfg.optim.lr = 1e-2
  assert train.run(cfg, tmp_path) == "done"
  got = rows(tmp_path)
  rule = stopping.StopRule.from_tokens(5.0, 0.5, 60, 16 * 32, 2048)  # an independent replay
  s = stopping.LoopState()
  for r in got:
    s = rule.update(s, r["step"], r["train_loss"])
  assert 0 < s.target_step < 40
  assert got[-1]["step"] == s.target_step + math.ceil(0.5 * s.target_step)
  assert "eval_loss" in got[-1]
  status = workdir_lib.read_status(tmp_path)
  assert status.reason == f"reached target loss 5.0 at step {s.target_step}"


def test_loss_far_above_its_start_is_diverged(pystdlib_cfg, tmp_path):
  cfg = tiny(base.get_base_config(), pystdlib_cfg, steps=40)
  cfg.optim.lr, cfg.optim.clip_norm = 1e3, 0.0  # finite but absurd: the loss explodes
  cfg.budget.diverge_margin, cfg.budget.diverge_patience = 3.0, 3
  assert train.run(cfg, tmp_path) == "diverged"
  status = workdir_lib.read_status(tmp_path)
  assert "stayed above the first step's" in status.reason and status.step < 40
  last = rows(tmp_path)[-1]
  assert last["step"] == status.step
  assert last["train_loss"] is None or last["train_loss"] > rows(tmp_path)[0]["train_loss"] + 3
  assert train.run(cfg, tmp_path) == "diverged"  # final: not retrained


def test_truncated_metrics_are_refused_on_resume(reference, tmp_path, monkeypatch):
  cfg, _, _ = reference
  _crash_at_11(cfg, tmp_path, monkeypatch)
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(path.read_text().splitlines(keepends=True)[:3]))
  with pytest.raises(ConfigError, match=r"5 of the 8 rows logged up to the checkpoint at step 8 "
                                        r"are missing"):
    train.run(cfg, tmp_path)


def test_non_object_line_is_refused_with_its_line_number(reference, tmp_path, monkeypatch):
  cfg, _, _ = reference
  _crash_at_11(cfg, tmp_path, monkeypatch)
  path = tmp_path / "metrics.jsonl"
  lines = path.read_text().splitlines(keepends=True)
  path.write_text("".join(lines[:2] + ["[1, 2]\n"] + lines[2:]))
  with pytest.raises(ConfigError, match=r"metrics.jsonl:3: a JSON list, not an object"):
    train.run(cfg, tmp_path)


def test_damaged_latest_checkpoint_falls_back(reference, tmp_path, monkeypatch, capsys):
  cfg, expected, _ = reference
  _crash_at_11(cfg, tmp_path, monkeypatch)
  (tmp_path / "checkpoints" / "8" / "loop" / "metadata").write_text("{torn")
  assert train.run(cfg, tmp_path) == "done"
  assert "checkpoint at step 8" in capsys.readouterr().out
  assert rows(tmp_path) == expected  # resumed from step 4: still every step once, identical


def test_damaged_status_json_is_rebuilt(reference, tmp_path, monkeypatch, capsys):
  cfg, expected, _ = reference
  _crash_at_11(cfg, tmp_path, monkeypatch)
  (tmp_path / "status.json").write_text('{"status": "runn')
  assert train.run(cfg, tmp_path) == "done"
  assert "status.json is not valid JSON" in capsys.readouterr().out
  assert workdir_lib.read_status(tmp_path).status == "done"
  assert rows(tmp_path) == expected


def test_damaged_config_json_names_file_and_fix(reference, tmp_path):
  cfg, _, _ = reference
  (tmp_path / "config.json").write_text("{")
  with pytest.raises(ConfigError, match=r"config.json is not valid JSON .* delete it and rerun"):
    train.run(cfg, tmp_path)


def test_workdir_that_is_a_file_is_refused_before_set_up(reference, tmp_path, monkeypatch):
  cfg, _, _ = reference
  monkeypatch.setattr(data_lib, "get_tokenizer", lambda _: pytest.fail("tokenizer built"))
  (tmp_path / "run").write_text("")
  with pytest.raises(ConfigError, match="is a file, not a directory"):
    train.run(cfg, tmp_path / "run")


def test_a_real_run_loads_in_the_analysis(reference, tmp_path):
  """Column names shared through bscan.workdir: a renamed one would empty these."""
  _, expected, workdir = reference
  shutil.copytree(workdir, tmp_path / "b16")
  runs = analysis.load_runs(tmp_path)
  assert len(runs) == 1
  run = runs.iloc[0]
  assert run["status"] == "done" and run["batch_tokens"] == 16 * 32 and run["size"] == "tiny"
  assert list(run["step"]) == [r["step"] for r in expected]
  assert list(run["train_loss"]) == pytest.approx([r["train_loss"] for r in expected])
  assert list(run["eval_step"]) == [3, 6, 9, 12]
  assert run["has_noise_scale"]
  saved = json.loads((workdir / "config.json").read_text())["derived"]
  assert workdir_lib.RunPlan.from_dict(saved).n_params == run["n_params"]
