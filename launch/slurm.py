r"""Runs a sweep on a SLURM cluster through submitit: one array task (job) per point.

  python -m launch.slurm --config=experiments/configs/scan.py --workdir=/shared/runs/scan \
      --partition=gpu --time=1440 --nodes=2 --gpus_per_node=8 --cpus_per_task=32 --mem=400G \
      [--account=ACC] [--qos=QOS] [--setup='source ~/venv/bin/activate'] [--render_only]

Each job runs one process per node (`--ntasks-per-node=1`) driving all of the node's GPUs:
`python -m experiments.train --config=FILE:ARG --workdir=POINT_DIR --multihost=on` (off on a
single node). jax.distributed.initialize() finds the job through SLURM's variables; by
default it would give each process one GPU (its local rank), so the job sets
JAX_LOCAL_DEVICE_IDS=0,...,G-1, and passes --backend=gpu: a job that asked for GPUs refuses
to train on a CPU-only JAX. Every point is validated first, as the trainer will on
nodes × GPUs devices in `--nodes` processes (a batch those cannot split is an error naming
the point, before anything is submitted). --config_override=FIELD=VALUE (repeatable) sets a
config field of every point, e.g. data.data_dir=/shared/tensorflow_datasets; --env=NAME=VALUE
(repeatable) sets a variable in every point's environment. Points already done or diverged are not submitted. On
timeout or preemption, submitit signals the job, which sends SIGTERM to the trainer (it
checkpoints) and requeues the point; the rerun resumes. --render_only prints the sbatch
script and each point's command and submits nothing. Needs the `slurm` extra (submitit).
Text that lands in the sbatch script (names, partitions, paths, --setup lines) is checked
first: a newline or a character sbatch would misread is one `error:` line, exit 2.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from absl import flags

from bscan import sweep as sweep_lib
from bscan import workdir as workdir_lib
from bscan.errors import ConfigError
from launch import cli
from launch import points as points_lib

try:
  import submitit
  from submitit.slurm import slurm as submitit_slurm
except ImportError:  # the `slurm` extra; checked in main() with a clear message
  submitit = None  # type: ignore[assignment]

FLAGS = flags.FLAGS
EXIT_ABORTED = 134  # JAX aborts every process of a job whose peer is gone (heartbeat timeout)


def define_flags() -> None:
  """Defines this binary's flags (only when run as one, so the module imports cleanly)."""
  flags.DEFINE_string("config", None, "Scan config file defining sweep().", required=True)
  flags.DEFINE_string("workdir", None, "Sweep dir on a shared file system (or gs://).",
                      required=True)
  flags.DEFINE_string("slurm_dir", "", "submitit folder (scripts, pickles, job logs) on "
                                "a shared file system; default SWEEP_DIR/slurm.")
  flags.DEFINE_string("partition", "", "SLURM partition.")
  flags.DEFINE_integer("time", 24 * 60, "Time limit per job, minutes.")
  flags.DEFINE_string("account", "", "SLURM account.")
  flags.DEFINE_string("qos", "", "SLURM quality of service.")
  flags.DEFINE_string("mem", "", "Memory per node, e.g. 64G ('' = cluster default).")
  flags.DEFINE_integer("cpus_per_task", 0, "CPUs per task (= per node); 0 = default.")
  flags.DEFINE_integer("nodes", 1, "Nodes per point (multi-host JAX when > 1).")
  flags.DEFINE_integer("gpus_per_node", 0, "GPUs per node, all driven by one process.")
  flags.DEFINE_string("constraint", "", "SLURM --constraint.")
  flags.DEFINE_string("exclude", "", "SLURM --exclude (nodes).")
  flags.DEFINE_multi_string("setup", [], "Shell lines run before the job (module load...).")
  flags.DEFINE_string("job_name", "bscan", "SLURM job name.")
  flags.DEFINE_integer("max_parallel", 256, "Array tasks running at the same time.")
  flags.DEFINE_string("python", "", "Python on the nodes; default this interpreter.")
  flags.DEFINE_string("trainer", "experiments.train",
                                 "Trainer module (python -m) or .py file.")
  flags.DEFINE_enum("executor", "slurm", ["slurm", "local", "debug"],
                                "submitit executor; local/debug run here (for tests).")
  flags.DEFINE_boolean("wait", False, "Wait for the jobs and report each point's outcome.")
  flags.DEFINE_boolean("render_only", False, "Print the sbatch script; submit nothing.")
  flags.DEFINE_multi_string("config_override", [], "FIELD=VALUE set on every point's config "
                            "(--config.FIELD=VALUE), e.g. data.data_dir=/shared/tfds.")
  flags.DEFINE_multi_string("env", [], "NAME=VALUE set in every point's environment.")


_MEM_RE = re.compile(r"^[0-9]+[KMGT]?B?$")
# What an #SBATCH line holds verbatim. submitit shell-quotes any other value, and sbatch
# keeps single quotes as part of it, ends it at whitespace or '#', and reads a newline as
# the start of a new directive (an injected `#SBATCH ...`).
_SBATCH_SAFE = re.compile(r"^[A-Za-z0-9_@%+=:,./-]*$")
_SBATCH_SAFE_TEXT = "letters, digits and _@%+=:,./-"


def check_sbatch_value(flag: str, value: str) -> str:
  """Returns value; ConfigError naming the flag when sbatch would misread it."""
  if _SBATCH_SAFE.fullmatch(value):
    return value
  bad = "".join(sorted({c for c in value if not _SBATCH_SAFE.fullmatch(c)}))
  raise ConfigError(f"--{flag}={value!r}: {bad!r} cannot go into an #SBATCH line (sbatch would "
                    f"misread it); use only {_SBATCH_SAFE_TEXT}")


@dataclasses.dataclass
class TrainPoint:
  """What a job runs on each node: the trainer for one point, requeued on timeout."""

  argv: list[str]
  workdir: str
  gpus_per_node: int = 0

  def __call__(self) -> str:
    status = workdir_lib.read_status_or_damaged(self.workdir)
    if workdir_lib.is_final(status):  # e.g. requeued after it finished
      return status.describe()
    env = dict(os.environ)
    if self.gpus_per_node:  # one process per node drives all of the node's GPUs
      env.setdefault("JAX_LOCAL_DEVICE_IDS", ",".join(map(str, range(self.gpus_per_node))))
    self._proc = subprocess.Popen(self.argv, env=env)
    rc = self._proc.wait()
    status = workdir_lib.read_status_or_damaged(self.workdir)
    if rc != 0 or not workdir_lib.is_final(status):  # preempted too: submitit requeues it
      lost = (" (JAX aborted it: a process of the job was lost, or a peer never came; rerun "
              "resumes)" if rc == EXIT_ABORTED else "")
      raise RuntimeError(f"trainer exited with code {rc}{lost}; {workdir_lib.describe(status)}")
    return status.describe()

  def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
    """Called by submitit before timeout/preemption: let the trainer checkpoint, requeue."""
    del args, kwargs
    proc = getattr(self, "_proc", None)
    if proc is not None and proc.poll() is None:
      proc.terminate()
      try:
        proc.wait(timeout=60)
      except subprocess.TimeoutExpired:
        proc.kill()
    return submitit.helpers.DelayedSubmission(
        TrainPoint(self.argv, self.workdir, self.gpus_per_node))


def slurm_parameters(*, job_name: str, partition: str, time: int, nodes: int, gpus_per_node: int,
                     cpus_per_task: int, mem: str, account: str, qos: str, constraint: str,
                     exclude: str, setup: Sequence[str], max_parallel: int) -> dict[str, Any]:
  """sbatch parameters (submitit's names); empty values are left to the cluster's defaults.

  ConfigError, naming the flag, for a value that is out of range or that sbatch would misread.
  """
  if mem and not _MEM_RE.fullmatch(mem):
    raise ConfigError(f"--mem={mem!r} is not a SLURM memory size like 64G or 500000M")
  minimums = {"nodes": (nodes, 1), "time": (time, 1), "max_parallel": (max_parallel, 1),
              "gpus_per_node": (gpus_per_node, 0), "cpus_per_task": (cpus_per_task, 0)}
  for flag, (value, least) in minimums.items():
    if value < least:
      raise ConfigError(f"--{flag}={value}: must be >= {least}")
  if not job_name:
    raise ConfigError("--job_name is empty; give a name such as bscan")
  for flag, value in (("job_name", job_name), ("partition", partition), ("account", account),
                      ("qos", qos), ("constraint", constraint), ("exclude", exclude)):
    check_sbatch_value(flag, value)
  for line in setup:  # shell lines by design: one line each, so no #SBATCH can hide in one
    cli.check_one_line("setup", line)
  params: dict[str, Any] = {
      "job_name": job_name, "time": time, "nodes": nodes, "ntasks_per_node": 1,
      "array_parallelism": max_parallel, "partition": partition, "account": account,
      "qos": qos, "mem": mem, "constraint": constraint, "exclude": exclude,
      "gpus_per_node": gpus_per_node, "cpus_per_task": cpus_per_task,
      "setup": list(setup)}
  return {k: v for k, v in params.items() if v not in ("", 0, [])}


def render(params: dict[str, Any], folder: str, python: str, n_points: int) -> str:
  """The sbatch script submitit would submit for n_points points (an array when > 1)."""
  command = " ".join([python, "-u -m submitit.core._submit",  # shell words, as submitit
                      shlex.quote(os.path.join(folder, "%j"))])
  return submitit_slurm._make_sbatch_string(  # pylint: disable=protected-access
      command=command, folder=os.path.join(folder, "%j"),
      map_count=n_points if n_points > 1 else None, **params)


def _executor(kind: str, folder: str, python: str, params: dict[str, Any]) -> Any:
  executor: Any
  if kind == "slurm":
    executor = submitit.SlurmExecutor(folder=os.path.join(folder, "%j"), python=python)
    executor.update_parameters(**params)
  elif kind == "local":
    executor = submitit.LocalExecutor(folder=os.path.join(folder, "%j"), python=python)
    executor.update_parameters(timeout_min=params["time"])
  else:
    executor = submitit.DebugExecutor(folder=os.path.join(folder, "%j"))
  return executor


def job_folder(sweep_dir: str, slurm_dir: str) -> str:
  """The absolute submitit folder; ConfigError when sbatch's --output could not hold it."""
  if slurm_dir:
    return os.path.abspath(check_sbatch_value("slurm_dir", slurm_dir))
  if "://" in sweep_dir:
    raise ConfigError(f"--workdir={sweep_dir}: a gs:// sweep needs --slurm_dir on a shared "
                      "file system for the job files")
  folder = os.path.abspath(os.path.join(sweep_dir, "slurm"))
  if not _SBATCH_SAFE.fullmatch(folder):  # it lands in #SBATCH --output
    raise ConfigError(f"--workdir={sweep_dir}: the job logs' path {folder!r} cannot go into an "
                      f"#SBATCH line; pass --slurm_dir=PATH with only {_SBATCH_SAFE_TEXT}")
  return folder


def main(argv: Sequence[str]) -> None:
  cli.no_arguments(argv)
  if submitit is None:
    raise ConfigError("launch.slurm needs submitit: pip install 'bscan[slurm]'")
  sweep_dir = FLAGS.workdir
  folder = job_folder(sweep_dir, FLAGS.slurm_dir)
  # The command runs on the nodes: the interpreter is checked for form, not existence here.
  python = cli.check_python("python", FLAGS.python or shlex.quote(sys.executable), here=False)
  # Nodes may start elsewhere: give them an absolute config path.
  config = os.path.abspath(FLAGS.config)
  sweep = cli.load_sweep(config)
  params = slurm_parameters(
      job_name=FLAGS.job_name, partition=FLAGS.partition, time=FLAGS.time,
      nodes=FLAGS.nodes, gpus_per_node=FLAGS.gpus_per_node, cpus_per_task=FLAGS.cpus_per_task,
      mem=FLAGS.mem, account=FLAGS.account, qos=FLAGS.qos, constraint=FLAGS.constraint,
      exclude=FLAGS.exclude, setup=FLAGS.setup, max_parallel=FLAGS.max_parallel)
  points = sweep_lib.expand(sweep, sweep_dir)
  overrides = points_lib.parse_overrides(FLAGS.config_override)
  env = points_lib.parse_env(FLAGS.env)
  # One process per node, each driving all of its GPUs (or one CPU device).
  devices = FLAGS.nodes * max(FLAGS.gpus_per_node, 1)
  points_lib.check_points(
      config, points, num_devices=devices, num_processes=FLAGS.nodes, overrides=overrides,
      trainer=FLAGS.trainer, target=f"{FLAGS.nodes} node(s) × "
      f"{FLAGS.gpus_per_node or 'no'} GPU(s) ({devices} device(s))")
  if not FLAGS.render_only:
    workdir_lib.check_usable(sweep_dir)
    sweep_lib.write_sweep_json(config, sweep, sweep_dir)
    points = [p for p in points
              if not workdir_lib.is_final(workdir_lib.read_status_or_damaged(p.workdir))]
  multihost = "on" if FLAGS.nodes > 1 else "off"
  # A job that asked for GPUs must not train on CPU unnoticed (a CPU-only jax install).
  ours = FLAGS.trainer == points_lib.DEFAULT_TRAINER
  backend = ["--backend=gpu"] if FLAGS.gpus_per_node and ours else []
  commands = [sweep_lib.trainer_command(python, FLAGS.trainer, config, p, multihost, overrides,
                                        env, backend) for p in points]
  if FLAGS.render_only:
    for p, cmd in zip(points, commands):
      print(f"# point {p.arg}\n#   {shlex.join(cmd)}")
    print(render(params, folder, python, len(points)))
    return
  if not points:
    print("every point is done or diverged; nothing to submit")
    return
  executor = _executor(FLAGS.executor, folder, python, params)
  with executor.batch():
    jobs = [executor.submit(TrainPoint(cmd, p.workdir, FLAGS.gpus_per_node))
            for p, cmd in zip(points, commands)]
  for p, job in zip(points, jobs):
    print(f"{p.arg}: job {job.job_id} -> {p.workdir}")
  if not FLAGS.wait:
    print(f"submitted {len(jobs)} jobs; logs in {folder}; `squeue --me` to follow")
    return
  unfinished = 0
  for p, job in zip(points, jobs):
    try:
      print(f"{p.arg}: {job.result()}")
    except Exception as e:  # submitit re-raises the job's error with its traceback
      unfinished += 1
      lines = str(e).strip().splitlines() or [repr(e)]
      line = next((l.strip() for l in reversed(lines) if "trainer exited" in l), lines[0])
      if f"; {workdir_lib.PREEMPTED} (" in line:  # SIGTERM outside submitit's requeue
        print(f"{p.arg}: preempted: {line}; rerun resumes it")
      else:
        print(f"{p.arg}: failed: {line}")
  sys.exit(1 if unfinished else 0)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
