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
one after another; on every worker, `python3 -m experiments.train ... --multihost=on`,
under `flock` so a repeated `run` never starts a slice's points twice. --dry_run prints
each gcloud command (shlex-quoted; the remote --command quoted per argument) and runs
nothing.
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

from absl import app
from absl import flags

from bscan import sweep as sweep_lib
from launch import workdirs

ACTIONS = ("create", "run", "up", "status", "delete")
ZONE_RE = re.compile(r"^[a-z]+-[a-z]+[0-9]+-[a-z]$")
ACCELERATOR_RE = re.compile(r"^(v2|v3|v4|v5p|v5litepod|v6e)-([0-9]+)$")
# Default TPU VM images per generation (cloud.google.com/tpu/docs/runtimes).
RUNTIMES = {"v2": "tpu-ubuntu2204-base", "v3": "tpu-ubuntu2204-base", "v4": "tpu-ubuntu2204-base",
            "v5p": "v2-alpha-tpuv5", "v5litepod": "v2-alpha-tpuv5-lite", "v6e": "v2-alpha-tpuv6e"}
PROVISIONING = {"on_demand": [], "spot": ["--spot"], "reserved": ["--reserved"],
                "best_effort": ["--best-effort"]}
_TAR_EXCLUDE = {".git", ".venv", "runs", "__pycache__", "build", ".pytest_cache", "data"}

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines this binary's flags (only when run as one, so the module imports cleanly)."""
  flags.DEFINE_string("config", None, "Scan config file defining sweep().", required=True)
  flags.DEFINE_string("workdir", None, "Sweep dir: gs://BUCKET/PATH (workers write it).",
                      required=True)
  flags.DEFINE_string("zone", None, "TPU zone, e.g. us-central2-b.", required=True)
  flags.DEFINE_string("accelerator_type", "v4-8", "e.g. v4-8, v5litepod-16, v5p-128.")
  flags.DEFINE_string("runtime_version", "", "TPU VM image; default per generation.")
  flags.DEFINE_string("project", "", "GCP project; default: gcloud's configured one.")
  flags.DEFINE_enum("provisioning", "on_demand", list(PROVISIONING),
                                    "Queued resource type (--spot/--reserved/--best_effort).")
  flags.DEFINE_boolean("spot", False, "Shorthand for --provisioning=spot.")
  flags.DEFINE_boolean("reserved", False, "Shorthand for --provisioning=reserved.")
  flags.DEFINE_boolean("best_effort", False, "Shorthand: --provisioning=best_effort.")
  flags.DEFINE_integer("points_per_slice", 1, "Points run one after another per slice.")
  flags.DEFINE_string("name_prefix", "", "Slice name prefix; default from --workdir.")
  flags.DEFINE_string("tpu_name", "", "Use this existing TPU VM; create nothing.")
  flags.DEFINE_string(
      "package", ".", "What workers pip install: a pip requirement (git URL) or a local "
      ".tar.gz/.whl/source dir (copied with tpu-vm scp).")
  flags.DEFINE_list("pip_extra", ["jax[tpu]", "gcsfs"], "Also pip installed.")
  flags.DEFINE_string("remote_python", "python3", "Python on the workers.")
  flags.DEFINE_string("remote_dir", "bscan_run", "Worker dir (relative to home).")
  flags.DEFINE_string("trainer", "experiments.train", "Trainer module (python -m).")
  flags.DEFINE_boolean("detach", True, "Start points in the background (nohup).")
  flags.DEFINE_float("wait_timeout_s", 3600.0, "How long `run` waits for ACTIVE slices.")
  flags.DEFINE_float("poll_s", 30.0, "Seconds between queued-resource state polls.")
  flags.DEFINE_string("gcloud", "gcloud", "gcloud binary.")
  flags.DEFINE_boolean("dry_run", False, "Print the commands; run nothing.")


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


def validate_zone(zone: str) -> str:
  """Returns zone, or raises ValueError for strings gcloud would reject (us-central2-b)."""
  if not zone or not ZONE_RE.match(zone):
    raise ValueError(f"--zone={zone!r} is not a zone like us-central2-b or europe-west4-a")
  return zone


def validate_accelerator(accelerator: str) -> str:
  """Returns the TPU generation of e.g. 'v4-8'; ValueError for malformed types."""
  m = ACCELERATOR_RE.match(accelerator or "")
  n = int(m.group(2)) if m else 0
  if not m or n < 1 or n & (n - 1) or (m.group(1) in ("v2", "v3", "v4", "v5p") and n < 8):
    raise ValueError(f"--accelerator_type={accelerator!r} is not a TPU type like v4-8, "
                     "v5litepod-16, v5p-128 or v6e-8 (generation-cores/chips, a power of 2)")
  return m.group(1)


def default_prefix(sweep_dir: str) -> str:
  """Slice name prefix: 'bscan-<sweep basename>-<hash>', a valid TPU name."""
  base = re.sub(r"[^a-z0-9]+", "-", os.path.basename(sweep_dir.rstrip("/")).lower()).strip("-")
  digest = hashlib.sha256(sweep_dir.rstrip("/").encode()).hexdigest()[:6]
  return f"bscan-{base[:30]}-{digest}".replace("--", "-")


def point_command(python: str, trainer: str, config: str, point: sweep_lib.ExpandedPoint
                  ) -> list[str]:
  """argv of one point's trainer run on every worker of a slice."""
  return [*shlex.split(python), "-m", trainer, f"--config={config}:{point.arg}",
          f"--workdir={point.workdir}", "--multihost=on"]


def remote_start_command(commands: Sequence[Sequence[str]], remote_dir: str, name: str,
                         detach: bool = True) -> str:
  """The remote shell line that runs a slice's points in order, once, each arg quoted."""
  script = " ; ".join(shlex.join(c) for c in commands)  # ';': a failed point never stops the rest
  inner = f"flock -n {shlex.quote(name + '.lock')} bash -c {shlex.quote(script)}"
  if detach:
    inner = (f"nohup {inner} >> {shlex.quote(name + '.log')} 2>&1 < /dev/null & "
             f"echo started {shlex.quote(name)}, log in {shlex.quote(remote_dir + '/' + name)}.log")
  return f"cd {shlex.quote(remote_dir)} && {inner}"


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
  remote_python: str = "python3"
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

  def __post_init__(self):
    validate_zone(self.zone)
    generation = validate_accelerator(self.accelerator_type)
    self.runtime_version = self.runtime_version or RUNTIMES[generation]
    if self.points_per_slice < 1:
      raise ValueError(f"--points_per_slice must be >= 1, got {self.points_per_slice}")
    if not self.sweep_dir.startswith("gs://"):
      raise ValueError(f"--workdir={self.sweep_dir!r}: TPU workers write results to Cloud "
                       "Storage; use gs://BUCKET/PATH")
    self.name_prefix = self.name_prefix or default_prefix(self.sweep_dir)
    if not re.match(r"^[a-z]([-a-z0-9]*[a-z0-9])?$", self.name_prefix):
      raise ValueError(f"--name_prefix={self.name_prefix!r}: lowercase letters, digits, '-'")
    self.sweep = sweep_lib.load_sweep(self.config)
    self.points = sweep_lib.expand(self.sweep, self.sweep_dir)

  def slices(self) -> dict[str, list[sweep_lib.ExpandedPoint]]:
    """Slice name -> its points, deterministic; one slice when using --tpu_name."""
    if self.tpu_name:
      return {self.tpu_name: self.points}
    n = self.points_per_slice
    return {f"{self.name_prefix}-{i // n}": self.points[i:i + n]
            for i in range(0, len(self.points), n)}

  def _say(self, text: str) -> None:
    print(text, file=self.out or sys.stdout, flush=True)

  def _run(self, argv: Sequence[str], capture: bool = False) -> str:
    if self.dry_run:
      self._say(shlex.join(argv))
      return ""
    return self.runner(argv, capture)

  def _gcloud(self, *args: str) -> list[str]:
    return [self.gcloud, "compute", "tpus", *args, f"--zone={self.zone}",
            *([f"--project={self.project}"] if self.project else [])]

  def _ssh(self, node: str, command: str) -> list[str]:
    return self._gcloud("tpu-vm", "ssh", node, "--worker=all", "--quiet", f"--command={command}")

  def _check(self) -> None:
    """Fails early on what would fail later: no gcloud, no access to the gs:// sweep dir."""
    if self.dry_run:
      return
    if shutil.which(self.gcloud) is None:
      raise CommandError(f"{self.gcloud!r} not found: install the Google Cloud SDK "
                         "(cloud.google.com/sdk) or use --dry_run")
    workdirs.check_access(self.sweep_dir)
    sweep_lib.write_sweep_json(self.config, self.sweep, self.sweep_dir)

  def create(self) -> None:
    """Queues one TPU VM per slice (nothing with --tpu_name)."""
    self._check()
    if self.tpu_name:
      self._say(f"using existing TPU VM {self.tpu_name}; nothing to create")
      return
    for name in self.slices():
      self._run(self._gcloud("queued-resources", "create", name, f"--node-id={name}",
                             f"--accelerator-type={self.accelerator_type}",
                             f"--runtime-version={self.runtime_version}",
                             *PROVISIONING[self.provisioning]))

  def _state(self, name: str) -> str:
    if self.dry_run:
      self._run(self._gcloud("queued-resources", "describe", name, "--format=value(state.state)"))
      return "ACTIVE"
    return self._run(self._gcloud("queued-resources", "describe", name,
                                  "--format=value(state.state)"), capture=True).strip()

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
    """Copies the config (and a local package) to every worker and pip installs."""
    files, requirement = self._package_files()
    self._run(self._ssh(node, f"mkdir -p {shlex.quote(self.remote_dir + '/configs')}"))
    self._run(self._gcloud("tpu-vm", "scp", self.config, f"{node}:{self.remote_dir}/configs/",
                           "--worker=all", "--quiet"))
    if files:
      self._run(self._gcloud("tpu-vm", "scp", *files, f"{node}:{self.remote_dir}/",
                             "--worker=all", "--quiet"))
    pip = [*shlex.split(self.remote_python), "-m", "pip", "install", "-q", requirement,
           *self.pip_extra]
    self._run(self._ssh(node, shlex.join(pip)))

  def start(self, node: str, points: Sequence[sweep_lib.ExpandedPoint]) -> None:
    """Starts the slice's points on all workers (in the background unless --nodetach)."""
    config = "configs/" + os.path.basename(self.config)
    commands = [point_command(self.remote_python, self.trainer, config, p) for p in points]
    self._run(self._ssh(node, remote_start_command(commands, self.remote_dir, node, self.detach)))

  def run(self) -> int:
    """Waits for each slice to be ACTIVE, then sets it up and starts its points."""
    self._check()
    waiting = dict(self.slices())
    deadline = time.time() + self.wait_timeout_s
    failed = []
    while waiting:
      for name in list(waiting):
        state = "ACTIVE" if self.tpu_name else self._state(name)
        if state == "ACTIVE":
          self.setup(name)
          self.start(name, waiting.pop(name))
        elif state in ("FAILED", "SUSPENDED", "SUSPENDING", "DELETING"):
          failed.append(name)
          self._say(f"{name}: queued resource is {state}; `delete` it and `up` again")
          waiting.pop(name)
      if waiting and time.time() > deadline:
        self._say(f"still queued after {self.wait_timeout_s:.0f}s: {sorted(waiting)}; "
                  "rerun `run` later (started slices are not started twice)")
        return 1
      if waiting:
        self.sleep(self.poll_s)
    return 1 if failed else 0

  def status(self) -> None:
    """Lists this sweep's queued resources and each point's status.json."""
    if not self.tpu_name:
      self._run(self._gcloud("queued-resources", "list", f"--filter=name~{self.name_prefix}-"))
    if self.dry_run:
      return
    workdirs.check_access(self.sweep_dir)
    for name, points in self.slices().items():
      for p in points:
        self._say(f"{name} {p.arg}: {workdirs.describe(workdirs.read_status(p.workdir))}")

  def delete(self) -> None:
    """Deletes the queued resources (and their TPU VMs) this sweep created."""
    if self.tpu_name:
      self._say(f"{self.tpu_name} was not created by this launcher; not deleting it")
      return
    for name in self.slices():
      self._run(self._gcloud("queued-resources", "delete", name, "--force", "--async", "--quiet"))


def main(argv: Sequence[str]) -> None:
  if len(argv) != 2 or argv[1] not in ACTIONS:
    raise app.UsageError(f"give one action: {' | '.join(ACTIONS)} (got {list(argv[1:])})")
  provisioning = ("spot" if FLAGS.spot else "reserved" if FLAGS.reserved else
                  "best_effort" if FLAGS.best_effort else FLAGS.provisioning)
  try:
    launcher = TpuLauncher(
        config=FLAGS.config, sweep_dir=FLAGS.workdir, zone=FLAGS.zone,
        accelerator_type=FLAGS.accelerator_type, runtime_version=FLAGS.runtime_version,
        project=FLAGS.project, provisioning=provisioning, points_per_slice=FLAGS.points_per_slice,
        name_prefix=FLAGS.name_prefix, tpu_name=FLAGS.tpu_name, package=FLAGS.package,
        pip_extra=FLAGS.pip_extra, remote_python=FLAGS.remote_python,
        remote_dir=FLAGS.remote_dir, trainer=FLAGS.trainer, detach=FLAGS.detach,
        wait_timeout_s=FLAGS.wait_timeout_s, poll_s=FLAGS.poll_s, gcloud=FLAGS.gcloud,
        dry_run=FLAGS.dry_run)
    action = argv[1]
    if action in ("create", "up"):
      launcher.create()
    rc = launcher.run() if action in ("run", "up") else 0
    if action == "status":
      launcher.status()
    elif action == "delete":
      launcher.delete()
  except (FileNotFoundError, ValueError, TypeError, CommandError, workdirs.WorkdirError) as e:
    sys.exit(f"error: {e}")
  sys.exit(rc)


if __name__ == "__main__":
  define_flags()
  app.run(main)
