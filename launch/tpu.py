r"""Runs a sweep on Cloud TPU VMs: one queued resource per slice of points, gs:// results.

  python -m launch.tpu up --config=experiments/configs/scan.py --workdir=gs://BUCKET/scan \
      --zone=us-central2-b --accelerator_type=v4-8 --project=PROJECT --spot \
      --package='bscan @ git+https://github.com/ORG/bscan@COMMIT' [--points_per_slice=2] [--dry_run]
  python -m launch.tpu status ...   # queued resources and each point's status.json
  python -m launch.tpu delete ...   # deletes the queued resources `create`/`up` made

Actions: create (queue the slices), run (wait until ACTIVE, install on every worker, start
the slice's points in the background), up (create + run), status, delete. Slice names are
derived from the sweep dir, so every action finds the same slices. With --tpu_name the
points run on an existing TPU VM (nothing is created or deleted). Points on one slice run
one after another; on every worker, `PYTHON -m experiments.train ... --multihost=on`,
under `flock` so a repeated `run` never starts a slice's points twice (it prints "already
running" instead). --dry_run prints each gcloud command (shlex-quoted; the remote --command
quoted per argument) and runs nothing.

Rerunning is safe: `create`/`up` skip queued resources that exist, slices whose points
are all final (done or diverged in their status.json) are neither created nor started, and
a slice's unfinished points only are started. An error on one slice (create, setup, start,
a FAILED queued resource) does not stop the others; all are listed at the end and the exit
code is 1. --provisioning=best_effort uses `gcloud alpha` (--best-effort is alpha-only).

Python on the workers: bscan needs Python >= 3.11 but the default TPU VM images (Ubuntu
22.04) ship 3.10. So by default setup makes a Python 3.11 virtual environment in
~/bscan-venv (--remote_venv) on every worker, with uv, which downloads a standalone CPython
(no apt): `python3 -m pip install --user uv && ~/.local/bin/uv venv --seed --python 3.11
~/bscan-venv`, skipped when the venv exists; the package is pip installed into it and
points run with ~/bscan-venv/bin/python. --remote_python=/usr/bin/python3.11 (any
interpreter >= 3.11 on the workers) uses that interpreter instead and makes no venv.

Inputs are checked here before any gcloud call: zone, accelerator type and names; --package
and --pip_extra must be local paths or pip requirements; --remote_dir (it ends up in an scp
destination, which the legacy scp protocol expands in the worker's shell) only plain path
characters. A bad input is one `error:` line, exit 2.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import TextIO

from absl import flags

from bscan import sweep as sweep_lib
from bscan import workdir as workdir_lib
from bscan.errors import ConfigError
from launch import cli
from launch import remote
from launch import tpu_inputs

ACTIONS = ("create", "run", "up", "status", "delete")
# Default TPU VM images per generation (cloud.google.com/tpu/docs/runtimes).
RUNTIMES = {"v2": "tpu-ubuntu2204-base", "v3": "tpu-ubuntu2204-base", "v4": "tpu-ubuntu2204-base",
            "v5p": "v2-alpha-tpuv5", "v5litepod": "v2-alpha-tpuv5-lite", "v6e": "v2-alpha-tpuv6e"}
PROVISIONING = {"on_demand": [], "spot": ["--spot"], "reserved": ["--reserved"],
                "best_effort": ["--best-effort"]}
ALPHA_PROVISIONING = {"best_effort"}  # flags only `gcloud alpha ... queued-resources create` has
BAD_STATES = ("FAILED", "SUSPENDED", "SUSPENDING", "DELETING")
_TAR_EXCLUDE = {".git", ".venv", "runs", "__pycache__", "build", ".pytest_cache", "data"}

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  """Defines this binary's flags (only when run as one, so the module imports cleanly)."""
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string("config", None, "Scan config file defining sweep().", required=True, **fv)
  flags.DEFINE_string("workdir", None, "Sweep dir: gs://BUCKET/PATH (workers write it).",
                      required=True, **fv)
  flags.DEFINE_string("zone", None, "TPU zone, e.g. us-central2-b.", required=True, **fv)
  flags.DEFINE_string("accelerator_type", "v4-8", "e.g. v4-8, v5litepod-16, v5p-128.", **fv)
  flags.DEFINE_string("runtime_version", "", "TPU VM image; default per generation.", **fv)
  flags.DEFINE_string("project", "", "GCP project; default: gcloud's configured one.", **fv)
  flags.DEFINE_enum("provisioning", "on_demand", list(PROVISIONING),
                    "Queued resource type (--spot/--reserved/--best_effort).", **fv)
  flags.DEFINE_boolean("spot", False, "Shorthand for --provisioning=spot.", **fv)
  flags.DEFINE_boolean("reserved", False, "Shorthand for --provisioning=reserved.", **fv)
  flags.DEFINE_boolean("best_effort", False, "Shorthand: --provisioning=best_effort.", **fv)
  flags.DEFINE_integer("points_per_slice", 1, "Points run one after another per slice.", **fv)
  flags.DEFINE_string("name_prefix", "", "Slice name prefix; default from --workdir.", **fv)
  flags.DEFINE_string("tpu_name", "", "Use this existing TPU VM; create nothing.", **fv)
  flags.DEFINE_string(
      "package", ".", "What workers pip install: a pip requirement (git URL) or a local "
      ".tar.gz/.whl/source dir (copied with tpu-vm scp).", **fv)
  flags.DEFINE_list("pip_extra", ["jax[tpu]", "gcsfs"], "Also pip installed.", **fv)
  flags.DEFINE_string(
      "remote_python", "", "Python (>= 3.11) on the workers; empty: the --remote_venv venv's, "
      "made with uv on first setup. E.g. /usr/bin/python3.11 uses that and makes no venv.", **fv)
  flags.DEFINE_string("remote_venv", "bscan-venv",
                      "Worker venv dir (relative to home) used when --remote_python is empty.",
                      **fv)
  flags.DEFINE_string("remote_python_version", "3.11", "Python version of that venv.", **fv)
  flags.DEFINE_string("remote_dir", "bscan_run", "Worker dir (relative to home).", **fv)
  flags.DEFINE_string("trainer", "experiments.train", "Trainer module (python -m).", **fv)
  flags.DEFINE_boolean("detach", True, "Start points in the background (nohup).", **fv)
  flags.DEFINE_float("wait_timeout_s", 3600.0, "How long `run` waits for ACTIVE slices.", **fv)
  flags.DEFINE_float("poll_s", 30.0, "Seconds between queued-resource state polls.", **fv)
  flags.DEFINE_string("gcloud", "gcloud", "gcloud binary.", **fv)
  flags.DEFINE_boolean("dry_run", False, "Print the commands; run nothing.", **fv)


class CommandError(RuntimeError):
  """A gcloud command failed."""


def subprocess_runner(argv: Sequence[str], capture: bool) -> str:
  """Runs argv (no shell); returns stdout when captured; CommandError on failure."""
  result = subprocess.run(list(argv), check=False, text=True,
                          capture_output=capture, stdin=subprocess.DEVNULL)
  if result.returncode:
    raise CommandError(f"command failed (exit code {result.returncode}): {shlex.join(argv)}\n"
                       f"{(result.stderr or '').strip()}")
  return result.stdout or ""


def default_prefix(sweep_dir: str) -> str:
  """Slice name prefix: 'bscan-<sweep basename>-<hash>', a valid TPU name."""
  base = re.sub(r"[^a-z0-9]+", "-", os.path.basename(sweep_dir.rstrip("/")).lower()).strip("-")
  digest = hashlib.sha256(sweep_dir.rstrip("/").encode()).hexdigest()[:6]
  return f"bscan-{base[:30]}-{digest}".replace("--", "-")


@dataclasses.dataclass
class TpuLauncher:
  """Builds and runs the gcloud commands for a sweep's slices."""

  config: str
  sweep_dir: str
  zone: str
  accelerator_type: str = "v4-8"
  runtime_version: str = ""
  project: str = ""
  provisioning: str = "on_demand"
  points_per_slice: int = 1
  name_prefix: str = ""
  tpu_name: str = ""
  package: str = "."
  pip_extra: Sequence[str] = ("jax[tpu]", "gcsfs")
  remote_python: str = ""  # empty: ~/REMOTE_VENV/bin/python, made by setup
  remote_venv: str = "bscan-venv"
  remote_python_version: str = "3.11"
  remote_dir: str = "bscan_run"
  trainer: str = "experiments.train"
  detach: bool = True
  wait_timeout_s: float = 3600.0
  poll_s: float = 30.0
  gcloud: str = "gcloud"
  dry_run: bool = False
  runner: Callable[[Sequence[str], bool], str] = subprocess_runner
  out: TextIO | None = None  # None: sys.stdout at print time
  sleep: Callable[[float], None] = time.sleep
  failures: dict[str, str] = dataclasses.field(default_factory=dict)  # slice -> what failed

  def __post_init__(self):
    tpu_inputs.validate_zone(self.zone)
    generation = tpu_inputs.validate_accelerator(self.accelerator_type)
    self.runtime_version = self.runtime_version or RUNTIMES[generation]
    if self.points_per_slice < 1:
      raise ConfigError(f"--points_per_slice={self.points_per_slice}: must be >= 1")
    if self.poll_s <= 0 or self.wait_timeout_s < 0:
      raise ConfigError(f"--poll_s={self.poll_s} must be > 0 and --wait_timeout_s="
                        f"{self.wait_timeout_s} >= 0")
    if not self.sweep_dir.startswith("gs://"):
      raise ConfigError(f"--workdir={self.sweep_dir!r}: TPU workers write results to Cloud "
                        "Storage; use gs://BUCKET/PATH")
    self.name_prefix = self.name_prefix or default_prefix(self.sweep_dir)
    for flag, name in (("name_prefix", self.name_prefix), ("tpu_name", self.tpu_name)):
      if name and not tpu_inputs.TPU_NAME_RE.fullmatch(name):
        raise ConfigError(f"--{flag}={name!r}: use lowercase letters, digits and '-', starting "
                          "with a letter")
    if not self.remote_python and not self.remote_venv:
      raise ConfigError("--remote_venv and --remote_python are both empty; give one")
    for flag in ("remote_python", "remote_venv", "remote_python_version", "trainer"):
      cli.check_one_line(flag, getattr(self, flag))
    tpu_inputs.validate_remote_dir(self.remote_dir)
    tpu_inputs.validate_package("package", self.package)
    for extra in self.pip_extra:
      tpu_inputs.validate_package("pip_extra", extra)
    self.sweep = cli.load_sweep(self.config)
    self.points = sweep_lib.expand(self.sweep, self.sweep_dir)

  def slices(self) -> dict[str, list[sweep_lib.ExpandedPoint]]:
    """Slice name -> its points, deterministic; one slice when using --tpu_name."""
    if self.tpu_name:
      return {self.tpu_name: self.points}
    n = self.points_per_slice
    return {f"{self.name_prefix}-{i // n}": self.points[i:i + n]
            for i in range(0, len(self.points), n)}

  @property
  def venv(self) -> str:
    """The workers' venv dir setup makes ('~/' is the worker's home); '' with --remote_python."""
    if self.remote_python:
      return ""
    return self.remote_venv if self.remote_venv.startswith(("/", "~/")) else "~/" + self.remote_venv

  @property
  def python(self) -> str:
    """The Python that installs the package and runs points on the workers."""
    return self.remote_python or f"{self.venv}/bin/python"

  def pending(self) -> dict[str, list[sweep_lib.ExpandedPoint]]:
    """Slices with points that are not final yet, each with those points (all in a dry run)."""
    if self.dry_run:
      return self.slices()
    result = {}
    for name, points in self.slices().items():
      todo = [p for p in points
              if not workdir_lib.is_final(workdir_lib.read_status_or_damaged(p.workdir))]
      if todo:
        result[name] = todo
      else:
        hint = "" if self.tpu_name else "; `delete` frees its TPU if it still exists"
        self._say(f"{name}: all {len(points)} points are done or diverged; skipping it{hint}")
    return result

  def _say(self, text: str) -> None:
    print(text, file=self.out or sys.stdout, flush=True)

  def _fail(self, name: str, reason: str) -> None:
    self.failures[name] = reason
    self._say(f"{name}: {reason}")

  def report(self) -> int:
    """Lists every slice that failed; 1 when some did."""
    if not self.failures:
      return 0
    self._say(f"{len(self.failures)} slice(s) failed:")
    for name, reason in self.failures.items():
      self._say(f"  {name}: {reason.splitlines()[0] if reason else ''}")
    return 1

  def _run(self, argv: Sequence[str], capture: bool = False) -> str:
    if self.dry_run:
      self._say(shlex.join(argv))
      return ""
    return self.runner(argv, capture)

  def _gcloud(self, *args: str, alpha: bool = False) -> list[str]:
    return [self.gcloud, *(["alpha"] if alpha else []), "compute", "tpus", *args,
            f"--zone={self.zone}",
            *([f"--project={self.project}"] if self.project else [])]

  def _ssh(self, node: str, command: str) -> list[str]:
    return self._gcloud("tpu-vm", "ssh", node, "--worker=all", "--quiet", f"--command={command}")

  def _check(self) -> None:
    """Fails early on what would fail later: no gcloud, no access to the gs:// sweep dir."""
    if self.dry_run:
      return
    if shutil.which(self.gcloud) is None:
      raise ConfigError(f"--gcloud={self.gcloud!r} not found: install the Google Cloud SDK "
                        "(cloud.google.com/sdk) or use --dry_run")
    workdir_lib.check_usable(self.sweep_dir)
    sweep_lib.write_sweep_json(self.config, self.sweep, self.sweep_dir)

  def create(self) -> int:
    """Queues one TPU VM per unfinished slice, unless it exists (nothing with --tpu_name).

    Returns 1 when some slice could not be created (recorded in failures), else 0.
    """
    self._check()
    if self.tpu_name:
      self._say(f"using existing TPU VM {self.tpu_name}; nothing to create")
      return 0
    failed = 0
    for name in self.pending():
      try:
        state = self._describe(name)
      except CommandError:  # not found (or describe denied: then create says why)
        state = ""
      if state:
        self._say(f"{name}: queued resource exists ({state}); not creating it again")
        continue
      try:
        self._run(self._gcloud("queued-resources", "create", name, f"--node-id={name}",
                               f"--accelerator-type={self.accelerator_type}",
                               f"--runtime-version={self.runtime_version}",
                               *PROVISIONING[self.provisioning],
                               alpha=self.provisioning in ALPHA_PROVISIONING))
      except CommandError as e:
        if "ALREADY_EXISTS" in str(e) or "already exists" in str(e):
          self._say(f"{name}: queued resource exists; not creating it again")
        else:
          failed = 1
          self._fail(name, f"create failed: {e}")
    return failed

  def _describe(self, name: str) -> str:
    """The queued resource's state; CommandError when it does not exist."""
    return self._run(self._gcloud("queued-resources", "describe", name,
                                  "--format=value(state.state)"), capture=True).strip()

  def _state(self, name: str) -> str:
    state = self._describe(name)
    return "ACTIVE" if self.dry_run else state

  def _package_files(self) -> tuple[list[str], str]:
    """Local files to copy to workers and the pip requirement that installs the package."""
    local = os.path.exists(self.package) and "://" not in self.package
    if not local:
      return [], self.package
    path = self.package
    if os.path.isdir(path):
      path = os.path.join(tempfile.gettempdir(), "bscan-src.tar.gz")
      if not self.dry_run:
        with tarfile.open(path, "w:gz") as tar:
          tar.add(self.package, arcname="bscan-src", filter=lambda t: None if any(
              part in _TAR_EXCLUDE or part.endswith(".egg-info")
              for part in t.name.split("/")) else t)
    return [path], f"{self.remote_dir}/{os.path.basename(path)}"

  def setup(self, node: str) -> None:
    """Copies the config (and a local package) to every worker; makes the venv; pip installs."""
    files, requirement = self._package_files()
    self._run(self._ssh(node, f"mkdir -p {remote.sh_quote(self.remote_dir + '/configs')}"))
    self._run(self._gcloud("tpu-vm", "scp", self.config, f"{node}:{self.remote_dir}/configs/",
                           "--worker=all", "--quiet"))
    if files:
      self._run(self._gcloud("tpu-vm", "scp", *files, f"{node}:{self.remote_dir}/",
                             "--worker=all", "--quiet"))
    install = remote.install_command(self.python, [requirement, *self.pip_extra])
    if self.venv:
      install = f"{remote.venv_command(self.venv, self.remote_python_version)} && {install}"
    self._run(self._ssh(node, install))

  def start(self, node: str, points: Sequence[sweep_lib.ExpandedPoint]) -> None:
    """Starts the slice's points on all workers (in the background unless --nodetach)."""
    config = "configs/" + os.path.basename(self.config)
    commands = [sweep_lib.trainer_command(self.python, self.trainer, config, p, "on")
                for p in points]
    argv = self._ssh(node, remote.remote_start_command(commands, self.remote_dir, node, self.detach))
    if not self.detach:  # the points' output streams here; so does an already-running line
      self._run(argv)
      return
    lines = self._run(argv, capture=True).splitlines()
    if self.dry_run:
      return
    running = sum(line.startswith("already-running ") for line in lines)
    started = sum(line.startswith("started ") for line in lines)
    if running:
      self._say(f"{node}: already running on {running} worker(s); not started again")
    if started:
      self._say(f"{node}: started {len(points)} point(s) on {started} worker(s), log in "
                f"~/{self.remote_dir}/{node}.log")
    if not running and not started:
      self._say(f"{node}: workers did not confirm the start; output: {' | '.join(lines)}")

  def run(self) -> int:
    """Waits for each unfinished slice to be ACTIVE, then sets it up and starts its points.

    Errors on one slice are recorded in failures and the others go on; returns 1 when any
    slice (here or in create) failed, else 0.
    """
    self._check()
    waiting = {n: ps for n, ps in self.pending().items() if n not in self.failures}
    deadline = time.time() + self.wait_timeout_s
    while waiting:
      for name in list(waiting):
        try:
          state = "ACTIVE" if self.tpu_name else self._state(name)
        except CommandError as e:
          waiting.pop(name)
          self._fail(name, f"cannot get its queued resource's state: {e}")
          continue
        if state == "ACTIVE":
          points = waiting.pop(name)
          try:
            self.setup(name)
            self.start(name, points)
          except CommandError as e:
            self._fail(name, f"setup or start failed: {e}")
        elif state in BAD_STATES:
          waiting.pop(name)
          self._fail(name, f"queued resource is {state}; `delete` it and `up` again")
      if waiting and time.time() > deadline:
        for name in sorted(waiting):
          self._fail(name, f"still queued after {self.wait_timeout_s:.0f}s; rerun `run` later "
                     "(started slices are not started twice)")
        break
      if waiting:
        self.sleep(self.poll_s)
    return 1 if self.failures else 0

  def status(self) -> None:
    """Lists this sweep's queued resources and each point's status.json."""
    if not self.tpu_name:
      self._run(self._gcloud("queued-resources", "list", f"--filter=name~{self.name_prefix}-"))
    if self.dry_run:
      return
    workdir_lib.check_usable(self.sweep_dir)
    for name, points in self.slices().items():
      for p in points:
        status = workdir_lib.read_status_or_damaged(p.workdir)
        self._say(f"{name} {p.arg}: {workdir_lib.describe(status)}")

  def delete(self) -> None:
    """Deletes the queued resources (and their TPU VMs) this sweep created."""
    if self.tpu_name:
      self._say(f"{self.tpu_name} was not created by this launcher; not deleting it")
      return
    for name in self.slices():
      self._run(self._gcloud("queued-resources", "delete", name, "--force", "--async", "--quiet"))


def main(argv: Sequence[str]) -> None:
  if len(argv) != 2 or argv[1] not in ACTIONS:
    raise ConfigError(f"give one action: {' | '.join(ACTIONS)} (got {list(argv[1:])})")
  provisioning = ("spot" if FLAGS.spot else "reserved" if FLAGS.reserved else
                  "best_effort" if FLAGS.best_effort else FLAGS.provisioning)
  try:
    launcher = TpuLauncher(
        config=FLAGS.config, sweep_dir=FLAGS.workdir, zone=FLAGS.zone,
        accelerator_type=FLAGS.accelerator_type, runtime_version=FLAGS.runtime_version,
        project=FLAGS.project, provisioning=provisioning, points_per_slice=FLAGS.points_per_slice,
        name_prefix=FLAGS.name_prefix, tpu_name=FLAGS.tpu_name, package=FLAGS.package,
        pip_extra=FLAGS.pip_extra, remote_python=FLAGS.remote_python,
        remote_venv=FLAGS.remote_venv, remote_python_version=FLAGS.remote_python_version,
        remote_dir=FLAGS.remote_dir, trainer=FLAGS.trainer, detach=FLAGS.detach,
        wait_timeout_s=FLAGS.wait_timeout_s, poll_s=FLAGS.poll_s, gcloud=FLAGS.gcloud,
        dry_run=FLAGS.dry_run)
    action = argv[1]
    if action in ("create", "up"):
      launcher.create()
    if action in ("run", "up"):
      launcher.run()
    if action == "status":
      launcher.status()
    elif action == "delete":
      launcher.delete()
    rc = launcher.report()
  except CommandError as e:  # gcloud failed outside a slice (status, delete): not bad input
    sys.exit(f"error: {e}")
  sys.exit(rc)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
