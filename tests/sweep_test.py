"""Tests for bscan.sweep: point args, workdirs, validation, loading and sweep.json."""

import os
import textwrap

import pytest

from bscan import sweep as sweep_lib

FIXTURE = os.path.join(os.path.dirname(__file__), "sweep_fixture_config.py")
POINT: dict[str, sweep_lib.Value] = {"seed": 0, "lr": 0.001, "batch": 64, "size": "3m"}


def test_point_arg_has_stable_order_and_round_trips():
  """Scan axes come first in a fixed order; parse_point_arg inverts point_arg."""
  assert sweep_lib.point_arg(POINT) == "size=3m,batch=64,lr=0.001,seed=0"
  points: list[dict[str, sweep_lib.Value]] = [
      POINT, {"size": "1b", "lr": 3e-4, "wd": 0.1, "ema": True, "batch": 1},
      {"lr": 1e-5, "note": "a b'c\";d"}]
  for point in points:
    arg = sweep_lib.point_arg(point)
    back = sweep_lib.parse_point_arg(arg)
    assert back == point and sweep_lib.point_arg(back) == arg
    assert all(type(back[k]) is type(point[k]) for k in point)


def test_point_workdir_is_deterministic_and_safe():
  """Workdirs follow SIZE/bBATCH/lrLR/sSEED, extras sorted after, unsafe characters replaced."""
  assert sweep_lib.point_workdir("runs/x/", POINT) == "runs/x/3m/b64/lr1e-3/s0"
  gcs = sweep_lib.point_workdir("gs://b/s", {**POINT, "lr": 2.5e-4})
  assert gcs == "gs://b/s/3m/b64/lr2.5e-4/s0"
  rel = sweep_lib.point_relpath({**POINT, "wd": 0.1, "note": "../a b;c"})
  assert rel == "3m/b64/lr1e-3/s0/note.._a_b_c/wd1e-1"
  assert sweep_lib.point_relpath({"size": ".."}) == "_"


@pytest.mark.parametrize("points, targets, message", [
    ([], [3.0], "no points"),
    ([POINT], [3.0, -1.0], "positive"),
    ([POINT, dict(POINT)], [3.0], "duplicate"),
    ([{"size": "3m,x"}], [3.0], "without ','"),
    ([{"size": "64"}], [3.0], "round-trip"),
    ([{"size": [1]}], [3.0], "must be a str"),
])
def test_sweep_validation(points: list, targets: list, message: str):
  """Bad sweeps fail with a message that says what is wrong."""
  with pytest.raises(ValueError, match=message):
    sweep_lib.Sweep(points=points, targets=targets)


def test_a_sweep_without_targets_is_a_fixed_budget_sweep():
  """Branch sweeps train a fixed Δ each: they reach no target, and need none."""
  assert sweep_lib.Sweep(points=[POINT]).targets == ()


def test_load_sweep_fixture_and_errors(tmp_path):
  """load_sweep imports by path; unknown files, no sweep() and empty sweeps name the file."""
  s = sweep_lib.load_sweep(FIXTURE)
  assert len(s.points) == 5 and s.targets == (3.0, 2.5)
  with pytest.raises(FileNotFoundError, match="nope.py"):
    sweep_lib.load_sweep(str(tmp_path / "nope.py"))
  plain = tmp_path / "plain.py"
  plain.write_text("def get_config(arg): return None\n")
  with pytest.raises(ValueError, match=r"plain.py.*defines no sweep\(\)"):
    sweep_lib.load_sweep(str(plain))
  empty = tmp_path / "empty.py"
  empty.write_text(textwrap.dedent("""
      from bscan import sweep as s
      def sweep(): return s.Sweep(points=[], targets=[3.0])
  """))
  with pytest.raises(ValueError, match=r"empty.py.*no points"):
    sweep_lib.load_sweep(str(empty) + ":size=3m")


def test_sweep_json_round_trip(tmp_path):
  """sweep.json holds the config, the targets and each point's arg and workdir."""
  s = sweep_lib.load_sweep(FIXTURE)
  sweep_lib.write_sweep_json(FIXTURE, s, str(tmp_path))
  data = sweep_lib.read_sweep_json(str(tmp_path))
  assert data["config"] == FIXTURE and data["targets"] == [3.0, 2.5]
  assert [p["arg"] for p in data["points"]] == [sweep_lib.point_arg(p) for p in s.points]
  assert data["points"][0]["workdir"] == f"{tmp_path}/tiny/b2/lr1e-3/s0"
