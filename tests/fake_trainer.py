"""A stand-in for experiments.train with the same contract, for launcher tests (no JAX).

--config=FILE:ARG --workdir=DIR [--multihost=...]. Writes its status and one metric row per
step through bscan.workdir, resuming after its last complete row (a row torn by a kill is
dropped). On SIGTERM it stops after the current step, writes status `preempted` and exits
143, like the real trainer. In ARG, fail=1 fails at step 2 and diverge=1 ends as diverged.
FAKE_TRAINER_STEPS / FAKE_TRAINER_STEP_S set steps and sleep.
"""

import argparse
import os
import signal
import sys
import time

from bscan import errors
from bscan import workdir as workdir_lib
from bscan.workdir import Col

TOKENS_PER_STEP = 64


def _status(workdir: str, status: str, step: int, reason: str = "") -> None:
  workdir_lib.write_status(workdir, status, reason, step, step * TOKENS_PER_STEP)


@errors.exit_on_user_error
def main() -> int:
  parser = argparse.ArgumentParser()
  parser.add_argument("--config", required=True)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--multihost", default="auto")
  args = parser.parse_args()
  arg = args.config.partition(":")[2]
  point = dict(kv.split("=", 1) for kv in arg.split(",") if kv)
  steps = int(os.environ.get("FAKE_TRAINER_STEPS", "8"))
  step_s = float(os.environ.get("FAKE_TRAINER_STEP_S", "0.05"))
  stop = []
  signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
  workdir_lib.check_usable(args.workdir)
  rows, _ = workdir_lib.read_metrics(args.workdir)  # a torn last line is not a row
  step = rows[-1][Col.STEP] if rows else 0
  writer = workdir_lib.MetricsWriter(args.workdir, tensorboard=False)
  writer.resume(step, len(rows))  # drops the torn line; any other damage is an error
  _status(args.workdir, workdir_lib.RUNNING, step)
  while step < steps:
    if stop:
      _status(args.workdir, workdir_lib.PREEMPTED, step, "stopped by SIGTERM")
      return 143
    time.sleep(step_s)
    if point.get("fail") == "1" and step + 1 == 2:
      print("RuntimeError: fake failure (fail=1)", file=sys.stderr)
      _status(args.workdir, workdir_lib.FAILED, step, "RuntimeError: fake failure (fail=1)")
      return 1
    step += 1
    writer.write({Col.STEP: step, Col.TOKENS: step * TOKENS_PER_STEP,
                  Col.TRAIN_LOSS: 4.0 / step, "arg": arg})
  writer.close()
  final = workdir_lib.DIVERGED if point.get("diverge") == "1" else workdir_lib.DONE
  _status(args.workdir, final, step, "loss is NaN" if final == workdir_lib.DIVERGED else
          "reached cap")
  return 0


if __name__ == "__main__":
  sys.exit(main())
