"""Tests for launch.tpu (dry-run goldens, a fake gcloud runner, quoting, input checks, point
validation, delete, flags from fields) and launch.locks' pid-reuse check."""

import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence

import pytest
from absl import flags

import goldens

from bscan import sweep as sweep_lib
from bscan.errors import ConfigError
from launch import locks
from launch import package as package_lib
from launch import remote
from launch import tpu

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
FIXTURE = "tests/sweep_fixture_config.py"  # relative to REPO, as users pass it
P = tpu.default_prefix("gs://b/s")  # slice name prefix of _launcher's sweep
FLAGS = [f"--config={FIXTURE}", "--workdir=gs://my-bucket/sweeps/fixture", "--zone=us-central2-b",
         "--accelerator_type=v4-8", "--project=my-proj", "--spot", "--points_per_slice=2",
         "--package=bscan @ git+https://github.com/example/bscan@main",
         "--trainer=tests/fake_trainer.py",  # FIXTURE's points are the fake trainer's
         "--config_override=data.data_dir=gs://my-bucket/tensorflow_datasets",
         "--env=TFDS_DATA_DIR=gs://my-bucket/tensorflow_datasets"]
STAMP_RE = re.compile(r"\b\d{8}T\d{6}\.\d{3}Z\b")  # a start's time (in its log names)


def _cli(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "launch.tpu", *args], cwd=REPO, text=True,
                        capture_output=True, timeout=60, check=False)


def _check_golden(name: str, text: str) -> None:
  """Compares text (start times as STAMP) with tests/golden/NAME; UPDATE_GOLDENS=1 rewrites it."""
  goldens.check_golden(name, STAMP_RE.sub("STAMP", text), "tests/launch_tpu_test.py")


@pytest.mark.parametrize("action", ["up", "delete", "status"])
def test_dry_run_matches_golden_and_runs_nothing(action: str):
  """Dry runs print every gcloud command, each line shlex-splittable back to its argv."""
  result = _cli(action, *FLAGS, "--dry_run")
  assert result.returncode == 0, result.stderr
  _check_golden(f"tpu_{action}_dry_run.txt", result.stdout)
  for line in result.stdout.splitlines():
    argv = shlex.split(line)
    assert argv[:3] == ["gcloud", "compute", "tpus"] and shlex.join(argv) == line


def test_best_effort_uses_gcloud_alpha():
  """--best-effort exists only in `gcloud alpha ... queued-resources create`."""
  result = _cli("create", *FLAGS, "--nospot", "--best_effort", "--dry_run")
  assert result.returncode == 0, result.stderr
  creates = [shlex.split(l) for l in result.stdout.splitlines() if " create " in l]
  assert len(creates) == 3
  assert all(c[:5] == ["gcloud", "alpha", "compute", "tpus", "queued-resources"]
             and "--best-effort" in c and "--spot" not in c for c in creates)
  assert all(" alpha " not in l for l in result.stdout.splitlines() if " create " not in l)


class _FakeGcloud:
  """Records commands and keeps queued resources and running slices like gcloud would.

  A created queued resource becomes `state` after `waits` describes; describing a missing
  one fails with NOT_FOUND, creating an existing one with ALREADY_EXISTS. A detached start
  prints 'started' per worker, or 'already-running' when the slice was started before.
  fail maps (verb, slice) to an error, e.g. ("tpu-vm scp", "s-1").
  """

  def __init__(self, waits: int = 1, state: str = "ACTIVE", workers: int = 2,
               existing: Sequence[str] = (), fail: dict[tuple[str, str], str] | None = None):
    self.calls: list[list[str]] = []
    self.waits, self.state, self.workers = waits, state, workers
    self.seen: dict[str, int] = {}
    self.existing, self.running = set(existing), set()
    self.fail = fail or {}

  def __call__(self, argv: Sequence[str], capture: bool) -> str:
    self.calls.append(list(argv))
    verb, name = self.verb(argv), self.name(argv)
    if (verb, name) in self.fail:
      raise tpu.CommandError(f"command failed: {self.fail[verb, name]}")
    if verb == "queued-resources describe":
      if name not in self.existing:
        raise tpu.CommandError(f"NOT_FOUND: Resource '{name}' was not found")
      self.seen[name] = self.seen.get(name, 0) + 1
      return "WAITING_FOR_RESOURCES\n" if self.seen[name] <= self.waits else self.state + "\n"
    if verb == "queued-resources delete":
      if name not in self.existing:
        raise tpu.CommandError(f"NOT_FOUND: Resource '{name}' was not found")
      self.existing.discard(name)
    if verb == "queued-resources create":
      if name in self.existing:
        raise tpu.CommandError(f"ALREADY_EXISTS: Resource '{name}' already exists")
      self.existing.add(name)
    command = next((a for a in argv if a.startswith("--command=")), "")
    if "nohup" in command:
      word = "already-running" if name in self.running else "started"
      self.running.add(name)
      return f"{word} {name}, log in x\n" * self.workers
    return ""

  @staticmethod
  def name(argv: Sequence[str]) -> str:
    """The queued resource or TPU VM (the NODE of scp's NODE:DIR; files are absolute)."""
    i = list(argv).index("tpus")
    return next(a.split(":")[0] for a in argv[i + 3:] if not a.startswith(("-", "/")))

  @staticmethod
  def verb(argv: Sequence[str]) -> str:
    i = list(argv).index("tpus")
    return " ".join(argv[i + 1:i + 3])

  def verbs(self) -> list[str]:
    return [self.verb(c) for c in self.calls]


def _launcher(runner: _FakeGcloud, monkeypatch, **kwargs) -> tpu.TpuLauncher:
  monkeypatch.setattr(tpu.workdir_lib, "check_usable", lambda d: None)
  monkeypatch.setattr(tpu.sweep_lib, "write_sweep_json", lambda *a: "")
  monkeypatch.setattr(tpu.workdir_lib, "read_status", lambda w: None)
  monkeypatch.setattr(tpu.points_lib, "check_points", lambda *a, **k: None)  # FIXTURE: fake's
  monkeypatch.setattr(tpu.worker_logs, "latest_logs", lambda *a: {})
  options = dict(config=os.path.join(REPO, FIXTURE), sweep_dir="gs://b/s", zone="us-central2-b",
                 accelerator_type="v5litepod-16", provisioning="best_effort",
                 points_per_slice=3, package="git+https://x/y", gcloud=sys.executable,
                 runner=runner, sleep=lambda s: None)
  return tpu.TpuLauncher(**{**options, **kwargs})


def test_up_waits_for_active_then_installs_and_starts(monkeypatch, capsys):
  """up: create every slice, poll until ACTIVE, then mkdir, scp, venv+pip, start on each."""
  fake = _FakeGcloud(waits=2)
  launcher = _launcher(fake, monkeypatch)
  assert launcher.create() == 0
  assert launcher.run() == 0
  creates = [c for c in fake.calls if "create" in c]
  assert len(creates) == 2 and all("--best-effort" in c and c[1] == "alpha" for c in creates)
  assert all(c[1] != "alpha" for c in fake.calls if "create" not in c)
  assert "--runtime-version=v2-alpha-tpuv5-lite" in creates[0]
  per_slice = ["tpu-vm ssh", "tpu-vm scp", "tpu-vm ssh", "tpu-vm ssh"]
  describe = ["queued-resources describe"]
  assert fake.verbs() == ((describe + ["queued-resources create"]) * 2 + describe * 4
                          + (describe + per_slice) * 2)
  commands = [a for c in fake.calls for a in c if a.startswith("--command=")]
  starts = [r for r in commands if "nohup" in r]
  assert len(starts) == 2 and starts[0].count("--multihost=on") == 3
  assert starts[1].count("--multihost=on") == 2
  assert all(r.count("~/bscan-venv/bin/python -m experiments.train") == r.count("--multihost")
             for r in starts)
  out = capsys.readouterr().out
  assert out.count("started 3 point(s) on 2 worker(s)") == 1
  assert out.count("started 2 point(s) on 2 worker(s)") == 1 and "already" not in out


def test_setup_makes_a_python_311_venv_unless_given_an_interpreter(monkeypatch):
  """Default: uv makes ~/bscan-venv (py 3.11) and pip uses it; --remote_python skips that."""
  fake = _FakeGcloud(waits=0)
  _launcher(fake, monkeypatch, tpu_name="vm").setup("vm")
  install = fake.calls[-1][fake.calls[-1].index("ssh") + 4]
  assert install.startswith("--command=if ! test -x ~/bscan-venv/bin/python; then")
  assert "python3 -m pip install -q --user uv" in install
  assert "~/.local/bin/uv venv -q --seed --python 3.11 ~/bscan-venv; fi" in install
  assert "&& ~/bscan-venv/bin/python -m pip install -q git+https://x/y 'jax[tpu]' gcsfs" in install
  fake = _FakeGcloud(waits=0)
  _launcher(fake, monkeypatch, tpu_name="vm", remote_python="/usr/bin/python3.11").setup("vm")
  install = fake.calls[-1][fake.calls[-1].index("ssh") + 4]
  assert "uv" not in install and "venv" not in install
  assert install.startswith("--command=/usr/bin/python3.11 -c ")
  assert install.endswith("&& /usr/bin/python3.11 -m pip install -q git+https://x/y "
                          "'jax[tpu]' gcsfs")


def test_venv_and_version_check_run_in_a_shell(tmp_path):
  """The venv line calls uv once (then the venv exists); the check rejects old Pythons."""
  home = tmp_path / "home"
  (home / ".local" / "bin").mkdir(parents=True)
  uv = home / ".local" / "bin" / "uv"
  uv.write_text(f"#!/bin/bash\necho \"$@\" >> {tmp_path}/uv.log\nmkdir -p \"${{@: -1}}/bin\"\n"
                f"ln -s {sys.executable} \"${{@: -1}}/bin/python\"\n")
  uv.chmod(0o755)
  env = {**os.environ, "HOME": str(home)}
  line = remote.venv_command("~/my venv", "3.11")
  for _ in range(2):
    subprocess.run(["bash", "-c", line], check=True, env=env, timeout=30)
  assert (tmp_path / "uv.log").read_text() == f"venv -q --seed --python 3.11 {home}/my venv\n"
  check = remote.install_command("~/'my venv'/bin/python", ["x"]).split(" && ")[0]
  assert subprocess.run(["bash", "-c", check], env=env, timeout=30).returncode == 0
  monkey = remote.install_command(sys.executable, ["x"]).split(" && ")[0].replace("(3, 11)", "(4, 0)")
  result = subprocess.run(["bash", "-c", monkey], capture_output=True, text=True, timeout=30)
  assert result.returncode == 1 and "bscan needs Python >= 3.11" in result.stderr


def test_rerunning_up_is_idempotent(monkeypatch, capsys):
  """A second up creates nothing and reports the slices as already running, exit 0."""
  fake = _FakeGcloud(waits=0)
  assert _launcher(fake, monkeypatch).create() == 0
  _launcher(fake, monkeypatch).run()
  fake.calls.clear()
  capsys.readouterr()
  launcher = _launcher(fake, monkeypatch)
  assert launcher.create() == 0 and launcher.run() == 0 and launcher.report() == 0
  assert "queued-resources create" not in fake.verbs()
  out = capsys.readouterr().out
  assert out.count("queued resource exists (ACTIVE); not creating it again") == 2
  assert out.count("already running on 2 worker(s); not started again") == 2
  assert "point(s) on" not in out
  # describe failing for another reason: create's ALREADY_EXISTS counts as success
  fake.fail = {("queued-resources describe", f"{P}-0"): "transient"}
  assert _launcher(fake, monkeypatch).create() == 0
  assert f"{P}-0: queued resource exists; not creating" in capsys.readouterr().out


def test_finished_slices_are_skipped_and_only_unfinished_points_start(monkeypatch, capsys):
  """Slices whose points are all done/diverged are neither created nor started."""
  fake = _FakeGcloud(waits=0)
  launcher = _launcher(fake, monkeypatch)
  final = {p.workdir: s for p, s in zip(launcher.points, ["done", "diverged", "done", "done",
                                                          "failed"])}
  monkeypatch.setattr(tpu.workdir_lib, "read_status",
                      lambda w: tpu.workdir_lib.Status(final[w]))
  assert launcher.create() == 0 and launcher.run() == 0
  names = {fake.name(c) for c in fake.calls}
  assert names == {f"{P}-1"}
  starts = [a for c in fake.calls for a in c if "nohup" in a]
  assert len(starts) == 1 and starts[0].count("--multihost=on") == 1 and "fail=1" in starts[0]
  assert f"{P}-0: all 3 points are done or diverged; skipping it" in (
      capsys.readouterr().out)


def test_errors_on_one_slice_do_not_stop_the_others(monkeypatch, capsys):
  """create/setup/start errors are per slice; all are listed at the end, exit 1."""
  fake = _FakeGcloud(waits=0, fail={("queued-resources create", f"{P}-0"): "quota",
                                    ("tpu-vm scp", f"{P}-1"): "scp broke"})
  launcher = _launcher(fake, monkeypatch, points_per_slice=2)
  assert launcher.create() == 1
  assert launcher.run() == 1
  assert [a for c in fake.calls for a in c if "nohup" in a and f"{P}-2" in a]
  assert not [c for c in fake.calls if f"{P}-0" in c and "describe" not in c
              and "create" not in c]
  capsys.readouterr()
  assert launcher.report() == 1
  out = capsys.readouterr().out
  assert out.splitlines() == ["2 slice(s) failed:",
                              f"  {P}-0: create failed: command failed: quota",
                              f"  {P}-1: setup or start failed: command failed: scp broke"]


def test_cli_exits_nonzero_after_reporting_all_failures(monkeypatch, capsys):
  """main runs every slice, then lists the failures and exits 1."""
  fake = _FakeGcloud(waits=0, state="FAILED")
  post_init = tpu.TpuLauncher.__post_init__

  def fake_post_init(self):
    post_init(self)
    self.runner = fake

  monkeypatch.setattr(tpu.TpuLauncher, "__post_init__", fake_post_init)
  monkeypatch.setattr(tpu.workdir_lib, "check_usable", lambda d: None)
  monkeypatch.setattr(tpu.workdir_lib, "read_status", lambda w: None)
  monkeypatch.setattr(tpu.sweep_lib, "write_sweep_json", lambda *a: "")
  monkeypatch.setattr(tpu.shutil, "which", lambda g: g)
  monkeypatch.setattr(tpu.points_lib, "check_points", lambda *a, **k: None)
  flag_values = flags.FlagValues()  # not absl's global FLAGS, which other tests' binaries use
  tpu.define_flags(flag_values)
  flag_values(["tpu", *[f.replace(FIXTURE, os.path.join(REPO, FIXTURE)) for f in FLAGS]])
  monkeypatch.setattr(tpu, "FLAGS", flag_values)
  with pytest.raises(SystemExit) as exit_info:
    tpu.main(["tpu", "up"])
  assert exit_info.value.code == 1
  out = capsys.readouterr().out
  assert "3 slice(s) failed:" in out and out.count("queued resource is FAILED") == 6


def test_failed_queued_resource_and_existing_vm(monkeypatch, capsys):
  """A FAILED slice is reported (exit 1); --tpu_name creates and deletes nothing."""
  fake = _FakeGcloud(waits=0, state="FAILED", existing=[f"{P}-0", f"{P}-1"])
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
  commands = [sweep_lib.trainer_command(python, "experiments.train", "configs/c.py", p, "on")
              for p in points]
  remote_dir = tmp_path / "remote dir"
  remote_dir.mkdir()
  for detach in (False, True):
    out.unlink(missing_ok=True)
    line = remote.remote_start_command(commands, str(remote_dir), "slice-0", detach=detach)
    subprocess.run(["bash", "-c", line], check=True, timeout=30)
    deadline = time.time() + 20
    while not (out.exists() and len(out.read_text().splitlines()) == 2):
      assert time.time() < deadline
      time.sleep(0.05)
    assert [json.loads(l) for l in out.read_text().splitlines()] == [c[2:] for c in commands]
  assert not marker.exists()


@pytest.mark.parametrize("detach", [True, False])
def test_remote_start_says_already_running_while_the_slice_runs(tmp_path, detach: bool):
  """While a slice's points run, starting it again prints 'already-running' and runs nothing."""
  home, stop, log = tmp_path / "h", tmp_path / "STOP", tmp_path / "runs.log"
  (home / "run dir").mkdir(parents=True)
  (home / "bin").mkdir()
  waiter = home / "bin" / "wait"  # '~/bin/wait': the worker's home is expanded
  waiter.write_text(f"#!/bin/bash\necho run >> {log}\nwhile [ ! -e {stop} ]; do sleep 0.05; done\n")
  waiter.chmod(0o755)
  env = {**os.environ, "HOME": str(home)}
  line = remote.remote_start_command([["~/bin/wait"]], "run dir", "s-0", detach=detach)
  start = lambda: subprocess.Popen(["bash", "-c", f"cd && {line}"], env=env, text=True,
                                   stdout=subprocess.PIPE)
  first = start()
  if detach:
    assert first.communicate(timeout=30)[0] == "started s-0, log in run dir/s-0.log\n"
  deadline = time.time() + 20
  while not log.exists():
    assert time.time() < deadline
    time.sleep(0.05)
  assert start().communicate(timeout=30)[0] == "already-running s-0\n"
  stop.touch()
  if not detach:
    assert first.communicate(timeout=30)[0] == ""
  deadline = time.time() + 20  # the lock goes when the points end; then a start runs them
  while "already" in (again := start().communicate(timeout=30)[0]):
    assert time.time() < deadline
    time.sleep(0.05)
  while log.read_text() != "run\n" * 2:  # the first start and the last; nothing in between
    assert time.time() < deadline and len(log.read_text()) < 8
    time.sleep(0.05)


def test_lock_of_a_reused_pid_is_stale(tmp_path):
  """A lock records its pids' start times; a live pid that started later is another process."""
  path = str(tmp_path / "p.lock")
  lock = locks.PointLock(path)
  assert lock.try_acquire()
  me, start = os.getpid(), locks.process_start_time(os.getpid())
  assert isinstance(start, int) and lock.owner()["pid_start"] == start
  lock.set_child(me)
  assert lock.owner()["child_start"] == start
  lock.release()
  owner = {"pid": me, "pid_start": start + 1, "child_pid": None, "child_start": None,
           "host": os.uname().nodename, "time": "t"}
  with open(path, "w") as f:  # our pid, but it started at another time: reused, stale
    json.dump(owner, f)
  assert locks.PointLock(path).try_acquire()
  with open(path, "w") as f:  # the same start time: the owner is alive
    json.dump({**owner, "pid_start": start}, f)
  assert not locks.PointLock(path).try_acquire()
  with open(path, "w") as f:  # older locks without start times: pid liveness only
    json.dump({k: v for k, v in owner.items() if "start" not in k}, f)
  assert not locks.PointLock(path).try_acquire()
  assert locks.pid_alive(me) and not locks.pid_alive(me, start + 1)


def test_bad_inputs_fail_clearly():
  """Local workdirs, missing gcloud and missing actions are clear errors."""
  result = _cli("up", *FLAGS[:1], "--workdir=runs/x", "--zone=us-central2-b")
  assert result.returncode == 2 and "use gs://BUCKET/PATH, or an absolute path" in result.stderr
  result = _cli("create", *FLAGS, "--gcloud=no-such-gcloud")
  assert result.returncode == 2 and "'no-such-gcloud' not found" in result.stderr
  result = _cli(*FLAGS)
  assert result.returncode == 2 and "give one action" in result.stderr


def test_status_reports_damaged_and_preempted_points(monkeypatch, capsys):
  """`status` lists a damaged status.json as a failed point with the file's fault, no traceback."""
  launcher = _launcher(_FakeGcloud(), monkeypatch, tpu_name="my-vm")

  def read_status(workdir: str) -> tpu.workdir_lib.Status:
    if workdir == launcher.points[0].workdir:
      raise ConfigError(f"{workdir}/status.json is not valid JSON; delete it and rerun")
    return tpu.workdir_lib.Status("preempted", "stopped by SIGTERM", 7)

  monkeypatch.setattr(tpu.workdir_lib, "read_status", read_status)
  launcher.status()
  lines = capsys.readouterr().out.splitlines()
  first = launcher.points[0]
  assert lines[0] == (f"my-vm {first.arg}: failed (step 0, {first.workdir}/status.json is not "
                      "valid JSON; delete it and rerun)")
  assert lines[1].endswith(": preempted (step 7, stopped by SIGTERM)")
  assert launcher.pending() == {"my-vm": launcher.points}  # all resumable


def _real_launcher(config: str, runner: _FakeGcloud, **kwargs) -> tpu.TpuLauncher:
  """A launcher whose points are checked by the real trainer's validation."""
  options = dict(config=os.path.join(REPO, config), sweep_dir="gs://b/k", zone="us-central2-b",
                 package="git+https://x/y", gcloud=sys.executable, runner=runner,
                 sleep=lambda s: None)
  return tpu.TpuLauncher(**{**options, **kwargs})


def test_every_point_is_checked_on_the_slice_before_any_gcloud_call():
  """kaplan.py's batch 8 cannot split over a v4-32's 16 devices: one error, nothing created."""
  fake = _FakeGcloud()
  launcher = _real_launcher("experiments/configs/kaplan.py", fake, accelerator_type="v4-32")
  for action in (launcher.create, launcher.run):
    with pytest.raises(ConfigError) as e:
      action()
    assert str(e.value).startswith("point size=3m,batch=8,seed=0 cannot run on v4-32 (16 "
                                   "devices, 4 hosts): batch_size=8 is not divisible by the 16 "
                                   "devices"), e.value
  assert fake.calls == []
  result = _cli("up", "--config=experiments/configs/kaplan.py", "--workdir=gs://b/k",
                "--zone=us-central2-b", "--accelerator_type=v4-32", "--dry_run")
  assert result.returncode == 2 and result.stdout == "", result.stdout  # no gcloud line printed
  assert result.stderr.startswith("error: point size=3m,batch=8,seed=0 cannot run on v4-32")
  # the pod config fits a v4-16; --config_override values are checked as the trainer reads them
  _real_launcher("tests/pod_scan_config.py", fake, accelerator_type="v4-16").validate_points()
  with pytest.raises(ConfigError, match="the config has no field data.dat_dir"):
    _real_launcher("tests/pod_scan_config.py", fake, accelerator_type="v4-16",
                   config_override=["data.dat_dir=gs://b/tfds"]).validate_points()
  with pytest.raises(ConfigError, match="cannot run on v4-16 .* batch_size=12 is not divisible"):
    _real_launcher("tests/pod_scan_config.py", fake, accelerator_type="v4-16",
                   config_override=["batch_size=12"]).validate_points()


def test_overrides_and_env_reach_every_points_command(monkeypatch):
  """--config_override and --env land in each point's trainer command, after its own flags."""
  fake = _FakeGcloud(waits=0)
  launcher = _launcher(fake, monkeypatch, config_override=[
      "data.data_dir=gs://b/tensorflow_datasets", "data.tfds_name=lm1b"],
      env=["TFDS_DATA_DIR=gs://b/tfds", "XLA_FLAGS=--xla_dump_to=/tmp/x y"])
  assert launcher.create() == 0 and launcher.run() == 0
  starts = [a for c in fake.calls for a in c if "nohup" in a]
  assert len(starts) == 2
  script = shlex.split(starts[1].split("nohup bash -c ", 1)[1])[0]
  point = shlex.split(script.split(" ; ")[2].lstrip("{ "))  # after export and header lines
  assert point[:3] == ["env", "TFDS_DATA_DIR=gs://b/tfds", "XLA_FLAGS=--xla_dump_to=/tmp/x y"]
  assert point[-2:] == ["--config.data.data_dir=gs://b/tensorflow_datasets",
                        "--config.data.tfds_name=lm1b"]
  for bad, flag in (("data_dir", "config_override"), ("1X=2", "env")):
    with pytest.raises(ConfigError, match=f"--{flag}="):
      _launcher(fake, monkeypatch, **{flag: [bad]})


def test_delete_tries_every_slice_and_reports_each(monkeypatch, capsys):
  """A queued resource already gone is reported, not fatal; a real failure is exit 1."""
  fake = _FakeGcloud(existing=[f"{P}-0"])  # P-1 is gone already
  launcher = _launcher(fake, monkeypatch)
  launcher.delete()
  assert launcher.report() == 0
  assert fake.verbs().count("queued-resources delete") == 2
  assert capsys.readouterr().out.splitlines() == [
      f"{P}-0: deleted", f"{P}-1: already gone", "delete: 1 deleted, 1 already gone, 0 failed"]
  fake = _FakeGcloud(existing=[f"{P}-0", f"{P}-1"],
                     fail={("queued-resources delete", f"{P}-0"): "PERMISSION_DENIED"})
  launcher = _launcher(fake, monkeypatch)
  launcher.delete()
  assert launcher.report() == 1 and fake.existing == {f"{P}-0"}  # P-1 deleted all the same
  out = capsys.readouterr().out
  assert f"{P}-0: delete failed: command failed: PERMISSION_DENIED" in out
  assert f"{P}-1: deleted" in out and "delete: 1 deleted, 0 already gone, 1 failed" in out


def test_a_local_package_dir_is_packed_to_a_file_of_its_sweep(monkeypatch, tmp_path):
  """Two sweeps packing the same source dir never write the same archive."""
  package = tmp_path / "src"
  (package / ".git").mkdir(parents=True)
  (package / "setup.py").write_text("# setup\n")
  archives = []
  for sweep in ("gs://b/one", "gs://b/two"):
    launcher = _launcher(_FakeGcloud(), monkeypatch, sweep_dir=sweep, package=str(package))
    files, requirement = package_lib.package_files(launcher.package, launcher.name_prefix,
                                                   launcher.remote_dir)
    assert files == [os.path.join(tempfile.gettempdir(), f"{launcher.name_prefix}-src.tar.gz")]
    assert requirement == f"bscan_run/{launcher.name_prefix}-src.tar.gz"
    with tarfile.open(files[0]) as tar:
      assert tar.getnames() == ["bscan-src", "bscan-src/setup.py"]  # .git left out
    archives.append(files[0])
    os.remove(files[0])
  assert archives[0] != archives[1]


def test_every_option_is_one_field_and_one_flag(monkeypatch):
  """The flags are made from TpuLauncher's fields, and main passes each flag to its field."""
  flag_values = flags.FlagValues()
  tpu.define_flags(flag_values)
  fields = tpu.option_fields()
  names = {f.metadata["flag"] or f.name: f for f in fields}
  assert set(flag_values) == set(names) | {"spot", "reserved", "best_effort"}
  for name, field in names.items():
    default = field.default if field.default is not dataclasses.MISSING else None
    assert flag_values[name].default == (list(default) if isinstance(default, tuple)
                                         else default), name
    assert field.metadata["help"] in flag_values[name].help  # absl adds to enum, multi helps
  argv = ["tpu", f"--config={FIXTURE}", "--workdir=gs://b/s", "--zone=europe-west4-a",
          "--accelerator_type=v5p-16", "--runtime_version=img", "--project=p", "--reserved",
          "--points_per_slice=3", "--name_prefix=pre", "--tpu_name=vm", "--package=pkg",
          "--pip_extra=a,b", "--config_override=x.y=1", "--config_override=z=2", "--env=A=1",
          "--remote_python=/py", "--remote_venv=v", "--remote_python_version=3.12",
          "--remote_dir=d", "--trainer=t", "--nodetach", "--nowatch", "--max_recreations=7",
          "--log_copy_s=5", "--wait_timeout_s=9", "--poll_s=2", "--gcloud=g", "--dry_run"]
  flag_values(argv)
  monkeypatch.setattr(tpu, "FLAGS", flag_values)
  seen = {}

  def capture(launcher):
    seen.update({f.name: getattr(launcher, f.name) for f in fields})
    raise ConfigError("captured")

  monkeypatch.setattr(tpu.TpuLauncher, "__post_init__", capture)
  with pytest.raises(ConfigError, match="captured"):
    tpu.main(["tpu", "status"])
  assert seen["sweep_dir"] == "gs://b/s" and seen["provisioning"] == "reserved"
  assert seen["config_override"] == ["x.y=1", "z=2"] and seen["pip_extra"] == ["a", "b"]
  assert (seen["detach"], seen["max_recreations"], seen["log_copy_s"]) == (False, 7, 5.0)


def test_watch_goes_with_up_and_not_with_an_existing_vm():
  """--watch recreates slices: only `up` does that, and never an existing --tpu_name VM."""
  result = _cli("run", *FLAGS, "--watch", "--dry_run")
  assert result.returncode == 2 and "--watch goes with `up`" in result.stderr
  result = _cli("up", *FLAGS, "--watch", "--tpu_name=my-vm", "--dry_run")
  assert result.returncode == 2 and "--watch recreates slices" in result.stderr
