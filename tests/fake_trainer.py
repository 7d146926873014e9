"""A stand-in for experiments.train with the same contract, for launcher tests (stdlib only).

--config=FILE:ARG --workdir=DIR [--multihost=...]. Writes status.json (running -> done,
diverged or failed) and one metrics.jsonl line per step, resuming after its last complete
line; on SIGTERM it stops after the current step. In ARG, fail=1 fails at step 2 and
diverge=1 ends as diverged. FAKE_TRAINER_STEPS / FAKE_TRAINER_STEP_S set steps and sleep.
"""

import argparse
import json
import os
import signal
import sys
import time


def _write_status(workdir: str, status: str, step: int, reason: str = "") -> None:
  tmp = os.path.join(workdir, f"status.json.{os.getpid()}.tmp")
  with open(tmp, "w") as f:
    json.dump({"status": status, "reason": reason, "step": step, "tokens": step * 64,
               "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}, f)
  os.replace(tmp, os.path.join(workdir, "status.json"))


def _resume(path: str) -> int:
  """Last complete step in metrics.jsonl; cuts off a line torn by a kill."""
  if not os.path.exists(path):
    return 0
  with open(path, "rb") as f:
    data = f.read()
  good, step = 0, 0
  for line in data.splitlines(keepends=True):
    try:
      step = json.loads(line)["step"] if line.endswith(b"\n") else step
    except ValueError:
      break
    if not line.endswith(b"\n"):
      break
    good += len(line)
  if good != len(data):
    with open(path, "r+b") as f:
      f.truncate(good)
  return step


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
  os.makedirs(args.workdir, exist_ok=True)
  metrics = os.path.join(args.workdir, "metrics.jsonl")
  step = _resume(metrics)
  stop = []
  signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
  _write_status(args.workdir, "running", step)
  fd = os.open(metrics, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
  while step < steps:
    if stop:
      _write_status(args.workdir, "running", step, "stopped by SIGTERM")
      return 143
    time.sleep(step_s)
    if point.get("fail") == "1" and step + 1 == 2:
      print("RuntimeError: fake failure (fail=1)", file=sys.stderr)
      _write_status(args.workdir, "failed", step, "RuntimeError: fake failure (fail=1)")
      return 1
    step += 1
    os.write(fd, (json.dumps({"step": step, "tokens": step * 64, "train_loss": 4.0 / step,
                              "arg": arg}) + "\n").encode())  # one write: whole line or none
  final = "diverged" if point.get("diverge") == "1" else "done"
  _write_status(args.workdir, final, step, "loss is NaN" if final == "diverged" else "reached cap")
  return 0


if __name__ == "__main__":
  sys.exit(main())
