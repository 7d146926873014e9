r"""Runs a sweep on Cloud TPU VMs: one queued resource per slice of points, one shared sweep dir.

  python -m launch.tpu up --config=experiments/configs/kaplan.py --workdir=gs://BUCKET/scan \
      --zone=us-central2-b --accelerator_type=v4-8 --project=PROJECT --spot --watch \
      --package='bscan @ git+https://github.com/ORG/bscan@COMMIT' \
      --config_override=data.data_dir=gs://BUCKET/tensorflow_datasets [--env=NAME=VALUE]
  python -m launch.tpu status ...   # queued resources, each point's status.json, lost processes
  python -m launch.tpu delete ...   # deletes every slice; reports each: deleted / already gone

Actions: create (queue the slices), run (wait until ACTIVE, install on every worker, start
the slice's points in the background), up (create + run), status, delete. `up --watch` stays
until every point is done or diverged, recreating preempted, failed or deleted slices and
rerunning unfinished points (launch/tpu_watch.py). Slice names come from the sweep dir, so
every action finds the same slices; --tpu_name uses an existing TPU VM (nothing is created or
deleted). --dry_run prints each gcloud command and runs nothing. Each option is one
TpuLauncher field; the flags are made from the fields.

The sweep dir is gs://BUCKET/PATH, or an absolute path that this machine and every worker
mount (NFS, Filestore, gcsfuse). Before anything is created, every point is checked as the
trainer will check it on the slice's devices and hosts (tpu_inputs.topology), with the
--config_override values applied: kaplan.py's batch 8 on a v4-32 (16 devices) fails here.
--config_override=FIELD=VALUE reaches every point as --config.FIELD=VALUE, --env=NAME=VALUE
as its environment (both repeatable): that is how data (data.data_dir=gs://...) and settings
reach the workers.

On every worker a slice's points run one after another, `PYTHON -m experiments.train ...
--multihost=on` (JAX's cluster detection joins the workers into one job), under `flock`, so
a repeated start prints "already running" instead of starting them twice. Their output goes to
~/REMOTE_DIR/SLICE.log and, every --log_copy_s seconds and at the end, to
SWEEP_DIR/logs/SLICE/STAMP-HOSTNAME.log (launch/worker_logs.py): a preempted slice's logs
survive it. Workers of a point that exit 134 (JAX's abort when a peer is gone) show the
point as "lost process N" in `status` and `--watch`.

Rerunning is safe: existing queued resources are not created again, slices whose points are
all final are skipped, and only unfinished points start. An error on one slice (create,
setup, start, a FAILED queued resource, a failed delete) does not stop the others; all are
listed at the end, exit 1. --provisioning=best_effort uses `gcloud alpha`.

Python on the workers: bscan needs Python >= 3.11; TPU VM images ship 3.10. By default setup
makes a 3.11 venv in ~/bscan-venv (--remote_venv) with uv (a standalone CPython, no apt) and
pip installs the package there; --remote_python=/usr/bin/python3.11 uses that interpreter and
makes no venv. A local --package dir is packed to /tmp/SLICE_PREFIX-src.tar.gz, one per sweep.
Inputs are checked before any gcloud call (launch/tpu_inputs.py); a bad one is one `error:`
line, exit 2.
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
import time
from collections.abc import Callable, Sequence
from typing import TextIO

from absl import flags

from bscan import sweep as sweep_lib
from bscan import workdir as workdir_lib
from bscan.errors import ConfigError
from launch import cli
from launch import package as package_lib
from launch import points as points_lib
from launch import remote
from launch import tpu_inputs
from launch import worker_logs

ACTIONS = ("create", "run", "up", "status", "delete")
# Default TPU VM images per generation (cloud.google.com/tpu/docs/runtimes).
RUNTIMES = {"v2": "tpu-ubuntu2204-base", "v3": "tpu-ubuntu2204-base", "v4": "tpu-ubuntu2204-base",
            "v5p": "v2-alpha-tpuv5", "v5litepod": "v2-alpha-tpuv5-lite", "v6e": "v2-alpha-tpuv6e"}
PROVISIONING = {"on_demand": [], "spot": ["--spot"], "reserved": ["--reserved"],
                "best_effort": ["--best-effort"]}
ALPHA_PROVISIONING = {"best_effort"}  # flags only `gcloud alpha ... queued-resources create` has
BAD_STATES = ("FAILED", "SUSPENDED", "SUSPENDING", "DELETING", "PREEMPTED")

FLAGS = flags.FLAGS


class CommandError(RuntimeError):
  """A gcloud command failed."""


def not_found(error: CommandError) -> bool:
  """Whether gcloud failed because the resource does not exist."""
  return "NOT_FOUND" in str(error) or "was not found" in str(error)


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
  """Builds and runs the gcloud commands for a sweep's slices; each flag is a field here."""

  config: str = cli.option(help="Scan config file defining sweep().")
  sweep_dir: str = cli.option(flag="workdir", help="Sweep dir: gs://BUCKET/PATH, or an "
                              "absolute path that every worker mounts (NFS, Filestore, gcsfuse).")
  zone: str = cli.option(help="TPU zone, e.g. us-central2-b.")
  accelerator_type: str = cli.option("v4-8", "e.g. v4-8, v5litepod-16, v5p-128.")
  runtime_version: str = cli.option("", "TPU VM image; default per generation.")
  project: str = cli.option("", "GCP project; default: gcloud's configured one.")
  provisioning: str = cli.option("on_demand", "Queued resource type (--spot/--reserved/"
                                 "--best_effort).", choices=list(PROVISIONING))
  points_per_slice: int = cli.option(1, "Points run one after another per slice.")
  name_prefix: str = cli.option("", "Slice name prefix; default from --workdir.")
  tpu_name: str = cli.option("", "Use this existing TPU VM; create nothing.")
  package: str = cli.option(".", "What workers pip install: a pip requirement (git URL) or a "
                            "local .tar.gz/.whl/source dir (copied with tpu-vm scp).")
  pip_extra: Sequence[str] = cli.option(["jax[tpu]", "gcsfs"], "Also pip installed.")
  config_override: Sequence[str] = cli.option(
      [], "FIELD=VALUE set on every point's config, e.g. data.data_dir=gs://BUCKET/"
      "tensorflow_datasets (repeatable).", multi=True)
  env: Sequence[str] = cli.option([], "NAME=VALUE in every point's environment (repeatable).",
                                  multi=True)
  remote_python: str = cli.option(
      "", "Python (>= 3.11) on the workers; empty: the --remote_venv venv's, made with uv on "
      "first setup. E.g. /usr/bin/python3.11 uses that and makes no venv.")
  remote_venv: str = cli.option("bscan-venv", "Worker venv dir (relative to home) used when "
                                "--remote_python is empty.")
  remote_python_version: str = cli.option("3.11", "Python version of that venv.")
  remote_dir: str = cli.option("bscan_run", "Worker dir (relative to home).")
  trainer: str = cli.option("experiments.train", "Trainer module (python -m).")
  detach: bool = cli.option(True, "Start points in the background (nohup).")
  watch: bool = cli.option(False, "With up: stay until every point is done or diverged, "
                           "recreating preempted, failed or deleted slices and rerunning "
                           "unfinished points.")
  max_recreations: int = cli.option(3, "--watch: recreations of a slice, and restarts of its "
                                    "unfinished points, before giving up on it.")
  log_copy_s: float = cli.option(60.0, "Seconds between copies of each worker's log to "
                                 "SWEEP_DIR/logs/.")
  wait_timeout_s: float = cli.option(3600.0, "How long `run` waits for ACTIVE slices.")
  poll_s: float = cli.option(30.0, "Seconds between queued-resource state polls.")
  gcloud: str = cli.option("gcloud", "gcloud binary.")
  dry_run: bool = cli.option(False, "Print the commands; run nothing.")
  runner: Callable[[Sequence[str], bool], str] = subprocess_runner
  out: TextIO | None = None  # None: sys.stdout at print time
  sleep: Callable[[float], None] = time.sleep
  failures: dict[str, str] = dataclasses.field(default_factory=dict)  # slice -> what failed

  def __post_init__(self):
    generation = tpu_inputs.check_options(self)  # every flag's value, before anything runs
    self.devices, self.hosts = tpu_inputs.topology(self.accelerator_type)
    self.runtime_version = self.runtime_version or RUNTIMES[generation]
    self.name_prefix = self.name_prefix or default_prefix(self.sweep_dir)
    tpu_inputs.validate_name("name_prefix", self.name_prefix)
    self.overrides = points_lib.parse_overrides(self.config_override)
    self.env_vars = points_lib.parse_env(self.env)
    self.sweep = cli.load_sweep(self.config)
    self.points = sweep_lib.expand(self.sweep, self.sweep_dir)
    self._validated = False

  def validate_points(self) -> None:
    """Every point checked as the trainer will on this slice, before anything is created."""
    if self._validated:
      return
    try:
      points_lib.check_points(
          self.config, self.points, num_devices=self.devices, num_processes=self.hosts,
          overrides=self.overrides, trainer=self.trainer,
          target=tpu_inputs.describe_topology(self.accelerator_type))
    except ConfigError:
      raise
    except Exception as e:  # a config the default trainer cannot read (e.g. another trainer's)
      raise ConfigError(f"--config={self.config}: its points cannot be checked as "
                        f"{self.trainer} reads them ({type(e).__name__}: {e}); is --trainer "
                        "right?") from e
    self._validated = True

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

  def pending(self, quiet: bool = False) -> dict[str, list[sweep_lib.ExpandedPoint]]:
    """Slices with points that are not final yet, each with those points (all in a dry run)."""
    if self.dry_run:
      return self.slices()
    result = {}
    for name, points in self.slices().items():
      todo = [p for p in points
              if not workdir_lib.is_final(workdir_lib.read_status_or_damaged(p.workdir))]
      if todo:
        result[name] = todo
      elif not quiet:
        hint = "" if self.tpu_name else "; `delete` frees its TPU if it still exists"
        self.say(f"{name}: all {len(points)} points are done or diverged; skipping it{hint}")
    return result

  def say(self, text: str) -> None:
    print(text, file=self.out or sys.stdout, flush=True)

  def fail(self, name: str, reason: str) -> None:
    self.failures[name] = reason
    self.say(f"{name}: {reason}")

  def report(self) -> int:
    """Lists every slice that failed; 1 when some did."""
    if not self.failures:
      return 0
    self.say(f"{len(self.failures)} slice(s) failed:")
    for name, reason in self.failures.items():
      self.say(f"  {name}: {reason.splitlines()[0] if reason else ''}")
    return 1

  def _run(self, argv: Sequence[str], capture: bool = False) -> str:
    if self.dry_run:
      self.say(shlex.join(argv))
      return ""
    return self.runner(argv, capture)

  def _gcloud(self, *args: str, alpha: bool = False) -> list[str]:
    return [self.gcloud, *(["alpha"] if alpha else []), "compute", "tpus", *args,
            f"--zone={self.zone}",
            *([f"--project={self.project}"] if self.project else [])]

  def _ssh(self, node: str, command: str) -> list[str]:
    return self._gcloud("tpu-vm", "ssh", node, "--worker=all", "--quiet", f"--command={command}")

  def check(self) -> None:
    """Fails early on what would fail later: no gcloud, no access to the sweep dir."""
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
    self.validate_points()
    self.check()
    if self.tpu_name:
      self.say(f"using existing TPU VM {self.tpu_name}; nothing to create")
      return 0
    failed = 0
    for name in self.pending():
      try:
        state = self.describe(name)
      except CommandError:  # not found (or describe denied: then create says why)
        state = ""
      if state and not self.dry_run:
        self.say(f"{name}: queued resource exists ({state}); not creating it again")
        continue
      failed |= not self.create_one(name)
    return failed

  def create_one(self, name: str) -> bool:
    """Queues slice `name`; False (recorded in failures) when gcloud refused."""
    try:
      self._run(self._gcloud("queued-resources", "create", name, f"--node-id={name}",
                             f"--accelerator-type={self.accelerator_type}",
                             f"--runtime-version={self.runtime_version}",
                             *PROVISIONING[self.provisioning],
                             alpha=self.provisioning in ALPHA_PROVISIONING), capture=True)
    except CommandError as e:
      if "ALREADY_EXISTS" in str(e) or "already exists" in str(e):
        self.say(f"{name}: queued resource exists; not creating it again")
        return True
      self.fail(name, f"create failed: {e}")
      return False
    return True

  def describe(self, name: str) -> str:
    """The queued resource's state (ACTIVE in a dry run); CommandError when it does not exist."""
    state = self._run(self._gcloud("queued-resources", "describe", name,
                                   "--format=value(state.state)"), capture=True).strip()
    return "ACTIVE" if self.dry_run else state

  def setup(self, node: str) -> None:
    """Copies the config (and a local package) to every worker; makes the venv; pip installs."""
    files, requirement = package_lib.package_files(self.package, self.name_prefix, self.remote_dir,
                                                     self.dry_run)
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

  def start_command(self, node: str, points: Sequence[sweep_lib.ExpandedPoint]) -> str:
    """The remote line that starts the slice's points once, their logs copied to the sweep."""
    config = "configs/" + os.path.basename(self.config)
    commands = [sweep_lib.trainer_command(self.python, self.trainer, config, p, "on",
                                          overrides=self.overrides, env=self.env_vars)
                for p in points]
    now = time.time()  # names this start's logs: each start keeps its own
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
    script = remote.points_script(
        commands, [p.arg for p in points], python=self.python, log=f"{node}.log",
        log_dest=f"{worker_logs.log_dir(self.sweep_dir, node)}/{stamp}-",
        copy_every_s=self.log_copy_s, tee=not self.detach,
        header=f"bscan: start {stamp} of {len(points)} point(s) of slice {node} on")
    return remote.remote_start_command(commands, self.remote_dir, node, self.detach, script)

  def start(self, node: str, points: Sequence[sweep_lib.ExpandedPoint]) -> str:
    """Starts the slice's points on all workers (in the background unless --nodetach).

    Returns 'started', 'running' (already, not started again) or 'unconfirmed'.
    """
    argv = self._ssh(node, self.start_command(node, points))
    if not self.detach:  # the points' output streams here; so does an already-running line
      self._run(argv)
      return "started"
    lines = self._run(argv, capture=True).splitlines()
    if self.dry_run:
      return "started"
    running = sum(line.startswith("already-running ") for line in lines)
    started = sum(line.startswith("started ") for line in lines)
    if running:
      self.say(f"{node}: already running on {running} worker(s); not started again")
    if started:
      self.say(f"{node}: started {len(points)} point(s) on {started} worker(s), log in "
                f"~/{self.remote_dir}/{node}.log and {worker_logs.log_dir(self.sweep_dir, node)}/")
    if not running and not started:
      self.say(f"{node}: workers did not confirm the start; output: {' | '.join(lines)}")
    return "started" if started else "running" if running else "unconfirmed"

  def idle(self, node: str) -> bool:
    """Whether no worker of the slice is running its points (nobody holds the slice's lock)."""
    lock = shlex.quote(f"{node}.lock")
    out = self._run(self._ssh(node, f"if cd {remote.sh_quote(self.remote_dir)} 2>/dev/null; "
                              f"then exec 9>> {lock}; flock -n 9 && echo idle || echo busy; "
                              "else echo idle; fi"), capture=True)
    return "busy" not in out

  def run(self) -> int:
    """Waits for each unfinished slice to be ACTIVE, then sets it up and starts its points.

    Errors on one slice are recorded in failures and the others go on; returns 1 when any
    slice (here or in create) failed, else 0.
    """
    self.validate_points()
    self.check()
    waiting = {n: ps for n, ps in self.pending().items() if n not in self.failures}
    deadline = time.time() + self.wait_timeout_s
    while waiting:
      for name in list(waiting):
        try:
          state = "ACTIVE" if self.tpu_name else self.describe(name)
        except CommandError as e:
          waiting.pop(name)
          self.fail(name, f"cannot get its queued resource's state: {e}")
          continue
        if state == "ACTIVE":
          points = waiting.pop(name)
          try:
            self.setup(name)
            self.start(name, points)
          except CommandError as e:
            self.fail(name, f"setup or start failed: {e}")
        elif state in BAD_STATES:
          waiting.pop(name)
          self.fail(name, f"queued resource is {state}; `delete` it and `up` again, or use "
                     "`up --watch`")
      if waiting and time.time() > deadline:
        for name in sorted(waiting):
          self.fail(name, f"still queued after {self.wait_timeout_s:.0f}s; rerun `run` later "
                     "(started slices are not started twice)")
        break
      if waiting:
        self.sleep(self.poll_s)
    return 1 if self.failures else 0

  def status(self) -> None:
    """Lists this sweep's queued resources and each point's status.json (and lost processes)."""
    if not self.tpu_name:
      self._run(self._gcloud("queued-resources", "list", f"--filter=name~{self.name_prefix}-"))
    if self.dry_run:
      return
    workdir_lib.check_usable(self.sweep_dir)
    for name, points in self.slices().items():
      lost = worker_logs.lost_processes_of(self.sweep_dir, name)
      for p in points:
        status = workdir_lib.read_status_or_damaged(p.workdir)
        extra = f"; last start: {lost[p.arg]}" if p.arg in lost else ""
        self.say(f"{name} {p.arg}: {workdir_lib.describe(status)}{extra}")
    self.say(f"worker logs: {worker_logs.log_dir(self.sweep_dir, '')}")

  def delete_one(self, name: str) -> str:
    """Deletes a queued resource and its TPU VM: 'deleted', 'already gone' or 'failed: ...'."""
    try:
      self._run(self._gcloud("queued-resources", "delete", name, "--force", "--async",
                             "--quiet"), capture=True)  # captured: its error says NOT_FOUND
    except CommandError as e:
      return "already gone" if not_found(e) else f"failed: {e}"
    return "deleted"

  def delete(self) -> None:
    """Deletes every slice's queued resource; each outcome reported, failures recorded."""
    if self.tpu_name:
      self.say(f"{self.tpu_name} was not created by this launcher; not deleting it")
      return
    outcomes = {name: self.delete_one(name) for name in self.slices()}
    if self.dry_run:
      return
    for name, outcome in outcomes.items():
      if outcome.startswith("failed"):
        self.fail(name, f"delete {outcome}")
      else:
        self.say(f"{name}: {outcome}")
    counts = [sum(o.startswith(k) for o in outcomes.values())
              for k in ("deleted", "already gone", "failed")]
    self.say("delete: {} deleted, {} already gone, {} failed".format(*counts))


def option_fields() -> list[dataclasses.Field]:
  """The TpuLauncher fields that are flags."""
  return cli.option_fields(TpuLauncher)


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  """Defines this binary's flags from TpuLauncher's fields (only when run as one)."""
  cli.define_option_flags(TpuLauncher, flag_values)
  fv = dict(flag_values=flag_values)
  flags.DEFINE_boolean("spot", False, "Shorthand for --provisioning=spot.", **fv)
  flags.DEFINE_boolean("reserved", False, "Shorthand for --provisioning=reserved.", **fv)
  flags.DEFINE_boolean("best_effort", False, "Shorthand: --provisioning=best_effort.", **fv)


def main(argv: Sequence[str]) -> None:
  if len(argv) != 2 or argv[1] not in ACTIONS:
    raise ConfigError(f"give one action: {' | '.join(ACTIONS)} (got {list(argv[1:])})")
  action = argv[1]
  options = cli.option_values(TpuLauncher, FLAGS)
  options["provisioning"] = ("spot" if FLAGS.spot else "reserved" if FLAGS.reserved else
                             "best_effort" if FLAGS.best_effort else FLAGS.provisioning)
  if options["watch"] and action != "up":
    raise ConfigError(f"--watch goes with `up` (got `{action}`)")
  try:
    launcher = TpuLauncher(**options)
    if launcher.watch:
      from launch import tpu_watch  # pylint: disable=g-import-not-at-top
      tpu_watch.watch(launcher)
    if action in ("create", "up") and not launcher.watch:
      launcher.create()
    if action in ("run", "up") and not launcher.watch:
      launcher.run()
    if action == "status":
      launcher.status()
    elif action == "delete":
      launcher.delete()
    rc = launcher.report()
  except CommandError as e:  # gcloud failed outside a slice (status): not bad input
    sys.exit(f"error: {e}")
  sys.exit(rc)


if __name__ == "__main__":
  # Run launch.tpu's own copy, not __main__'s: launch.tpu_watch catches launch.tpu's errors.
  from launch import tpu  # pylint: disable=g-import-not-at-top,import-self
  tpu.define_flags()
  cli.run(tpu.main)
