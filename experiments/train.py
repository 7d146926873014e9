"""Trains one run: python -m experiments.train --config=experiments/configs/FILE.py:ARG --workdir=DIR."""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, optionally :ARG.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (local or gs://).")
_MULTIHOST = flags.DEFINE_enum("multihost", "auto", ["auto", "on", "off"],
                               "Whether to call jax.distributed.initialize() first.")
_ALLOW_CHANGE = flags.DEFINE_bool("allow_config_change", False,
                                  "Continue a workdir that holds a different config.")
flags.mark_flags_as_required(["config", "workdir"])


def _is_multihost_job() -> bool:
  """A multi-process job we can see from the environment (a lone SLURM_* var is not one)."""
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return True
  if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_ID" in env:
    return True
  return "," in env.get("TPU_WORKER_HOSTNAMES", "")


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  # Must precede every other JAX call, or JAX starts single-process.
  if _MULTIHOST.value == "on" or (_MULTIHOST.value == "auto" and _is_multihost_job()):
    import jax  # pylint: disable=g-import-not-at-top
    jax.distributed.initialize()
  from bscan import train  # pylint: disable=g-import-not-at-top

  filename = config_flags.get_config_filename(flags.FLAGS["config"])
  arg = filename.split(":", 1)[1] if ":" in filename else ""
  from bscan import config as config_lib  # pylint: disable=g-import-not-at-top
  try:
    status = train.run(_CONFIG.value, _WORKDIR.value, arg=arg,
                       allow_config_change=_ALLOW_CHANGE.value)
  except config_lib.ConfigError as e:  # a config that cannot work: say why, no traceback
    sys.exit(f"error: {e}")
  if status == "failed":
    sys.exit(143)  # preempted: the checkpoint is saved; rerun to resume


if __name__ == "__main__":
  app.run(main)
