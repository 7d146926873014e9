"""Trains one run: python -m experiments.train --config=experiments/configs/FILE.py:ARG --workdir=DIR."""

import re
import sys
from typing import Any

from absl import app
from absl import flags
from absl import logging
from etils import epath
from ml_collections import config_flags

from bscan import errors
from bscan import multihost

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, optionally :ARG.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (local or gs://).")
_MULTIHOST = flags.DEFINE_enum(
    "multihost", "auto", ["auto", "on", "off"],
    "Call jax.distributed.initialize() first: on = always; auto = when a coordinator flag is "
    "given or JAX's cluster detection finds a job (Cloud TPU pod, SLURM, Open MPI, k8s); "
    "off = a single process.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of the coordinator, which process 0 serves; "
    "unset: $JAX_COORDINATOR_ADDRESS or JAX's cluster detection.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Processes in the job; unset: JAX's cluster detection.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "This process's index in [0, num_processes); unset: detected.")
_INIT_TIMEOUT = flags.DEFINE_integer(
    "initialization_timeout", 300, "Seconds to reach the coordinator and every peer at start; "
    "then one error line (a process that cannot reach the coordinator fails at the deadline).")
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "heartbeat_timeout", 100, "Seconds without a peer's heartbeat before JAX aborts the job "
    "(exit 134: a lost process); rerun to resume from the checkpoint.")
_ALLOW_CHANGE = flags.DEFINE_bool("allow_config_change", False,
                                  "Continue a workdir that holds a different config.")
_BACKEND = flags.DEFINE_enum(
    "backend", "any", ["any", "cpu", "gpu", "tpu"],
    "Refuse to train unless JAX runs on this backend (launch.slurm sets gpu with "
    "--gpus_per_node). With 'any', visible GPUs that JAX did not load are refused too.")
_ALLOW_CPU = flags.DEFINE_bool("allow_cpu", False,
                               "Train on CPU even though GPUs are visible or were asked for.")
_PACK_ARG = flags.DEFINE_multi_string(
    "pack_arg", [], "Train this config-file arg too, packed into one vmapped step with the "
    "--config run (same shapes; seed, optim.lr and budget.* may differ). Repeat it, once per "
    "--pack_workdir, in the same order.")
_PACK_WORKDIR = flags.DEFINE_multi_string("pack_workdir", [],
                                          "The workdir of each --pack_arg run, in order.")
flags.mark_flags_as_required(["config", "workdir"])

EXIT_PREEMPTED = 143  # 128 + SIGTERM: the checkpoint is saved; rerun to resume


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing whose errors (the config file's included) are one `error:` line."""
  try:
    rest = flags.FLAGS(argv)
    if _CONFIG.value is not None:
      _CONFIG.value.get("seed")  # config_flags defers a config file's load error to first use
    return rest
  except Exception as e:  # pylint: disable=broad-exception-caught
    errors.fail(_flag_error_message(e, argv))


def _flag_error_message(e: BaseException, argv: list[str]) -> str:
  """The user's mistake in one line: the config's own error, else the flag and its value."""
  text = str(e)
  # config_flags flattens get_config's exception into text (a traceback): find the cause.
  if found := re.findall(r"\bConfigError: (.*)", text):
    return found[-1]
  if "Failed loading config file" in text:
    path = flags.FLAGS["config"].config_filename if flags.FLAGS["config"].present else "?"
    return f"--config={path}: the config file cannot be loaded ({text.strip().splitlines()[-1].strip()})"
  if "Error whilst parsing config file" in text:
    return f"--config: {text.strip().splitlines()[-1].strip()}"
  text = text.strip()
  if isinstance(e, (AttributeError, KeyError)):  # an override of a field that does not exist
    text = text.strip("'\"").replace("\\'", "'").replace("\\n", " ")
    overrides = [a.split("=", 1)[0] for a in argv if a.startswith("--config.")]
    return (f"{', '.join(overrides)}: no such config field ({text}); see "
            "experiments/configs/base.py for every field")
  return text.splitlines()[0] if text else type(e).__name__


@errors.exit_on_user_error
def main(argv):
  if len(argv) > 1:
    raise errors.ConfigError(f"unexpected arguments {argv[1:]}; flags look like --name=value")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  # Must precede every other JAX call, or JAX starts single-process.
  multihost.initialize(multihost.Options(
      mode=_MULTIHOST.value, coordinator_address=_COORDINATOR.value,
      num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value,
      initialization_timeout=_INIT_TIMEOUT.value, heartbeat_timeout=_HEARTBEAT_TIMEOUT.value))
  multihost.check_backend(_BACKEND.value, allow_cpu=_ALLOW_CPU.value)
  from bscan import train  # pylint: disable=g-import-not-at-top

  filename = config_flags.get_config_filename(flags.FLAGS["config"])
  path, _, arg = filename.partition(":")
  specs = [train.RunSpec(_CONFIG.value, epath.Path(_WORKDIR.value), arg)]
  specs += packed_runs(path, _PACK_ARG.value, _PACK_WORKDIR.value)
  statuses = train.run_packed(specs, allow_config_change=_ALLOW_CHANGE.value)
  if "preempted" in statuses:
    sys.exit(EXIT_PREEMPTED)


def packed_runs(path: str, args: list[str], workdirs: list[str]) -> list[Any]:
  """The --pack_arg runs: the config file at each arg, with the same --config.* overrides."""
  from bscan import train  # pylint: disable=g-import-not-at-top
  from launch import points  # pylint: disable=g-import-not-at-top

  if len(args) != len(workdirs):
    raise errors.ConfigError(f"--pack_arg given {len(args)} time(s) and --pack_workdir "
                             f"{len(workdirs)}: give one workdir per packed arg, in order")
  overrides = [a[len("--config."):] for a in sys.argv if a.startswith("--config.")]
  return [train.RunSpec(points.point_config(path, arg, overrides), epath.Path(workdir), arg)
          for arg, workdir in zip(args, workdirs)]


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
