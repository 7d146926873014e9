"""Trains one run: python -m experiments.train --config=experiments/configs/FILE.py:ARG --workdir=DIR."""

import os
import re
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from bscan import errors

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, optionally :ARG.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (local or gs://).")
_MULTIHOST = flags.DEFINE_enum("multihost", "auto", ["auto", "on", "off"],
                               "Whether to call jax.distributed.initialize() first.")
_ALLOW_CHANGE = flags.DEFINE_bool("allow_config_change", False,
                                  "Continue a workdir that holds a different config.")
flags.mark_flags_as_required(["config", "workdir"])

EXIT_PREEMPTED = 143  # 128 + SIGTERM: the checkpoint is saved; rerun to resume


def _is_multihost_job() -> bool:
  """A multi-process job we can see from the environment (a lone SLURM_* var is not one)."""
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return True
  if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_ID" in env:
    return True
  return "," in env.get("TPU_WORKER_HOSTNAMES", "")


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
  if _MULTIHOST.value == "on" or (_MULTIHOST.value == "auto" and _is_multihost_job()):
    import jax  # pylint: disable=g-import-not-at-top
    jax.distributed.initialize()
  from bscan import train  # pylint: disable=g-import-not-at-top

  filename = config_flags.get_config_filename(flags.FLAGS["config"])
  arg = filename.split(":", 1)[1] if ":" in filename else ""
  status = train.run(_CONFIG.value, _WORKDIR.value, arg=arg,
                     allow_config_change=_ALLOW_CHANGE.value)
  if status == "preempted":
    sys.exit(EXIT_PREEMPTED)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
