"""Runs one CLI's main for many argv lists in forked children of one process (imports paid once).

python tests/cli_fork.py MODULE CASES.json OUT.json: each case is an argv list; OUT gets
[{"rc": ..., "stderr": ...}] in order. Nothing touches JAX's backend before the fork.
"""

import importlib
import json
import os
import sys
import tempfile

from absl import app


def run_case(module, argv: list[str]) -> dict:
  """Forks; the child runs the CLI with `argv` and exits; returns its exit status and stderr."""
  with tempfile.TemporaryFile() as err:
    pid = os.fork()
    if pid == 0:  # the child: a fresh `python -m MODULE argv...`
      os.dup2(err.fileno(), 2)
      sys.argv = [module.__name__, *argv]
      try:
        app.run(module.main, flags_parser=module.parse_flags)
      except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        sys.stderr.flush()
        os._exit(code)
      except BaseException:  # pylint: disable=broad-exception-caught
        import traceback  # pylint: disable=g-import-not-at-top
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
      os._exit(0)
    _, status = os.waitpid(pid, 0)
    err.seek(0)
    return {"rc": os.waitstatus_to_exitcode(status), "stderr": err.read().decode()}


def main() -> None:
  module = importlib.import_module(sys.argv[1])
  importlib.import_module("bscan.train")  # the heavy imports, once, before forking
  with open(sys.argv[2]) as f:
    cases = json.load(f)
  with open(sys.argv[3], "w") as f:
    json.dump([run_case(module, argv) for argv in cases], f)


if __name__ == "__main__":
  main()
