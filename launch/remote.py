"""Shell lines that run on a TPU worker: make a venv, install bscan, run a slice's points once.

Every argument is quoted for the remote shell (a leading '~/' stays unquoted, so it is the
worker's home); `launch.tpu` wraps each line in `gcloud ... tpu-vm ssh --command=LINE`.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence

MIN_PYTHON = (3, 11)  # what bscan's jax/flax pins need on the workers


def sh_quote(word: str) -> str:
  """shlex.quote, except that a leading '~/' stays unquoted so the shell expands it."""
  if word.startswith("~/") and len(word) > 2:
    return "~/" + shlex.quote(word[2:])
  return shlex.quote(word)


def sh_join(words: Sequence[str]) -> str:
  """shlex.join with sh_quote: '~/x' words are the worker's home."""
  return " ".join(sh_quote(w) for w in words)


def venv_command(venv: str, version: str) -> str:
  """Remote line that makes a Python `version` venv at `venv` with uv, unless it exists."""
  python, uv = sh_quote(f"{venv}/bin/python"), "~/.local/bin/uv"
  return (f"if ! test -x {python}; then {{ test -x {uv} || python3 -m pip install -q --user uv; }}"
          f" && {uv} venv -q --seed --python {shlex.quote(version)} {sh_quote(venv)}; fi")


def install_command(python: str, requirements: Sequence[str]) -> str:
  """Remote line that checks python is new enough, then pip installs requirements with it."""
  py = shlex.split(python)
  need = ".".join(map(str, MIN_PYTHON))
  check = (f'import sys; sys.exit(sys.version_info < {MIN_PYTHON!r} and "bscan needs Python >= '
           f'{need} on the workers (see --remote_python); got " + sys.version.split()[0])')
  return (f"{sh_join([*py, '-c', check])} && "
          f"{sh_join([*py, '-m', 'pip', 'install', '-q', *requirements])}")


def remote_start_command(commands: Sequence[Sequence[str]], remote_dir: str, name: str,
                         detach: bool = True) -> str:
  """The remote shell line that runs a slice's points in order, once, each arg quoted.

  The shell takes the slice's flock on fd 9 and the (background) run inherits it, so the
  lock is held until the points finish. It prints 'started NAME, log in ...' or, when the
  lock is held, 'already-running NAME'. Words starting with '~/' are in the worker's home.
  """
  script = " ; ".join(sh_join(c) for c in commands)  # ';': a failed point never stops the rest
  run = f"bash -c {shlex.quote(script)}"
  if detach:
    run = (f"nohup {run} >> {shlex.quote(name + '.log')} 2>&1 < /dev/null & "
           f"echo started {shlex.quote(name)}, log in {shlex.quote(remote_dir + '/' + name)}.log")
  return (f"cd {sh_quote(remote_dir)} && exec 9>> {shlex.quote(name + '.lock')} && "
          f"if flock -n 9; then {run}; else echo already-running {shlex.quote(name)}; fi")
