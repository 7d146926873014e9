"""Tests for launch.tpu: dry-run goldens, a fake gcloud runner, quoting and input checks."""

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence

import pytest

import goldens

from bscan import sweep as sweep_lib
from launch import tpu

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
FIXTURE = "tests/sweep_fixture_config.py"  # relative to REPO, as users pass it
FLAGS = [f"--config={FIXTURE}", "--workdir=gs://my-bucket/sweeps/fixture", "--zone=us-central2-b",
         "--accelerator_type=v4-8", "--project=my-proj", "--spot", "--points_per_slice=2",
         "--package=bscan @ git+https://github.com/example/bscan@main"]


def _cli(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "launch.tpu", *args], cwd=REPO, text=True,
                        capture_output=True, timeout=60, check=False)


def _check_golden(name: str, text: str) -> None:
  """Compares text with tests/golden/NAME; UPDATE_GOLDENS=1 rewrites it."""
  goldens.check_golden(name, text, "tests/launch_tpu_test.py")


@pytest.mark.parametrize("action", ["up", "delete", "status"])
def test_dry_run_matches_golden_and_runs_nothing(action: str):
  """Dry runs print every gcloud command, each line shlex-splittable back to its argv."""
  result = _cli(action, *FLAGS, "--dry_run")
  assert result.returncode == 0, result.stderr
  _check_golden(f"tpu_{action}_dry_run.txt", result.stdout)
  for line in result.stdout.splitlines():
    argv = shlex.split(line)
    assert argv[:3] == ["gcloud", "compute", "tpus"] and shlex.join(argv) == line


class _FakeGcloud:
  """Records commands; queued resources become ACTIVE after `waits` describes."""

  def __init__(self, waits: int = 1, state: str = "ACTIVE"):
    self.calls: list[list[str]] = []
    self.waits, self.state = waits, state
    self.seen: dict[str, int] = {}

  def __call__(self, argv: Sequence[str], capture: bool) -> str:
    self.calls.append(list(argv))
    if "describe" in argv:
      name = argv[argv.index("describe") + 1]
      self.seen[name] = self.seen.get(name, 0) + 1
      return "WAITING_FOR_RESOURCES\n" if self.seen[name] <= self.waits else self.state + "\n"
    return ""

  def verbs(self) -> list[str]:
    return [" ".join(c[3:5]) for c in self.calls]


def _launcher(runner: _FakeGcloud, monkeypatch, **kwargs) -> tpu.TpuLauncher:
  monkeypatch.setattr(tpu.workdirs, "check_access", lambda d: None)
  monkeypatch.setattr(tpu.sweep_lib, "write_sweep_json", lambda *a: "")
  options = dict(config=os.path.join(REPO, FIXTURE), sweep_dir="gs://b/s", zone="us-central2-b",
                 accelerator_type="v5litepod-16", provisioning="best_effort",
                 points_per_slice=3, package="git+https://x/y", gcloud=sys.executable,
                 runner=runner, sleep=lambda s: None)
  return tpu.TpuLauncher(**{**options, **kwargs})


def test_up_waits_for_active_then_installs_and_starts(monkeypatch):
  """up: create every slice, poll until ACTIVE, then mkdir, scp, pip, start on each."""
  fake = _FakeGcloud(waits=2)
  launcher = _launcher(fake, monkeypatch)
  launcher.create()
  assert launcher.run() == 0
  creates = [c for c in fake.calls if "create" in c]
  assert len(creates) == 2 and all("--best-effort" in c for c in creates)
  assert "--runtime-version=v2-alpha-tpuv5-lite" in creates[0]
  per_slice = ["tpu-vm ssh", "tpu-vm scp", "tpu-vm ssh", "tpu-vm ssh"]
  describe = ["queued-resources describe"]
  assert fake.verbs() == ["queued-resources create"] * 2 + describe * 4 + (describe + per_slice) * 2
  remote = [a for c in fake.calls for a in c if a.startswith("--command=")]
  starts = [r for r in remote if "nohup" in r]
  assert len(starts) == 2 and starts[0].count("--multihost=on") == 3
  assert starts[1].count("--multihost=on") == 2


def test_failed_queued_resource_and_existing_vm(monkeypatch, capsys):
  """A FAILED slice is reported (exit 1); --tpu_name creates and deletes nothing."""
  fake = _FakeGcloud(waits=0, state="FAILED")
  assert _launcher(fake, monkeypatch).run() == 1
  assert "queued resource is FAILED" in capsys.readouterr().out
  fake = _FakeGcloud()
  launcher = _launcher(fake, monkeypatch, tpu_name="my-vm")
  launcher.create()
  assert launcher.run() == 0
  launcher.delete()
  assert all("queued-resources" not in c for c in fake.calls)
  assert all(any(a.split(":")[0] == "my-vm" for a in c) for c in fake.calls)
  assert "not created by this launcher" in capsys.readouterr().out


def test_remote_command_passes_hostile_values_intact(tmp_path):
  """Spaces, quotes and '; touch FILE' reach the trainer's argv verbatim and run nothing."""
  dump, out = tmp_path / "dump.py", tmp_path / "argv.jsonl"
  dump.write_text(f"import json, sys\nwith open({str(out)!r}, 'a') as f:\n"
                  "  f.write(json.dumps(sys.argv[1:]) + '\\n')\n")
  marker = tmp_path / "PWNED"
  sweep_dir = str(tmp_path / f"it's a \"dir\"; touch {marker}")
  points = sweep_lib.expand(sweep_lib.Sweep(
      points=[{"size": "3m", "note": f"a b'c\"d; touch {marker} $(touch {marker}) `x`"},
              {"size": "9m"}], targets=[3.0]), sweep_dir)
  python = shlex.join([sys.executable, str(dump)])
  commands = [tpu.point_command(python, "experiments.train", "configs/c.py", p) for p in points]
  remote_dir = tmp_path / "remote dir"
  remote_dir.mkdir()
  for detach in (False, True):
    out.unlink(missing_ok=True)
    line = tpu.remote_start_command(commands, str(remote_dir), "slice-0", detach=detach)
    subprocess.run(["bash", "-c", line], check=True, timeout=30)
    deadline = time.time() + 20
    while not (out.exists() and len(out.read_text().splitlines()) == 2):
      assert time.time() < deadline
      time.sleep(0.05)
    assert [json.loads(l) for l in out.read_text().splitlines()] == [c[2:] for c in commands]
  assert not marker.exists()


@pytest.mark.parametrize("zone, ok", [("us-central2-b", True), ("europe-west4-a", True),
                                      ("us-central2", False), ("us central2-b", False),
                                      ("us-central2-b; rm", False)])
def test_zone_validation(zone: str, ok: bool):
  """Zones look like us-central2-b."""
  if ok:
    assert tpu.validate_zone(zone) == zone
  else:
    with pytest.raises(ValueError, match="not a zone"):
      tpu.validate_zone(zone)


@pytest.mark.parametrize("accelerator, ok", [
    ("v4-8", True), ("v5litepod-16", True), ("v5p-128", True), ("v6e-8", True),
    ("v5litepod-1", True), ("v4-6", False), ("v4-4", False), ("v5e-8", False), ("tpu-v4", False),
    ("v4-8 --spot", False)])
def test_accelerator_validation(accelerator: str, ok: bool):
  """Accelerator types are generation-size with a power-of-two size."""
  if ok:
    tpu.validate_accelerator(accelerator)
  else:
    with pytest.raises(ValueError, match="not a TPU type"):
      tpu.validate_accelerator(accelerator)


def test_bad_inputs_fail_clearly():
  """Local workdirs, missing gcloud and missing actions are clear errors."""
  result = _cli("up", *FLAGS[:1], "--workdir=/tmp/x", "--zone=us-central2-b")
  assert result.returncode == 1 and "use gs://BUCKET/PATH" in result.stderr
  result = _cli("create", *FLAGS, "--gcloud=no-such-gcloud")
  assert result.returncode == 1 and "'no-such-gcloud' not found" in result.stderr
  result = _cli(*FLAGS)
  assert result.returncode != 0 and "give one action" in result.stderr
