"""Shell lines that run on a TPU worker: make a venv, install bscan, run a slice's points once.

Every argument is quoted for the remote shell (a leading '~/' stays unquoted, so it is the
worker's home); `launch.tpu` wraps each line in `gcloud ... tpu-vm ssh --command=LINE`.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence

from launch import worker_logs

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


def points_script(commands: Sequence[Sequence[str]], labels: Sequence[str] = (),
                  python: str = "python3", log: str = "", log_dest: str = "",
                  copy_every_s: float = 60.0, tee: bool = False, header: str = "") -> str:
  """The shell script that runs a slice's points in order (';': a failed point never stops
  the rest), each followed by `bscan: exit status RC of point LABEL` when labels are given;
  `header` is printed first, followed by the worker's hostname.

  With log_dest (a path prefix, e.g. 'gs://b/s/logs/SLICE/STAMP-'), the output goes through
  launch.worker_logs, which appends it to `log` and copies it to LOG_DEST$(hostname).log; if
  that tool cannot run, `cat` still appends the output to `log`.
  """
  steps = [f'echo {shlex.quote(header)} "$(hostname)"'] if header else []
  for i, command in enumerate(commands):
    steps.append(sh_join(command))
    if labels:
      steps.append(f'echo "{worker_logs.EXIT_PREFIX}$? of point" {shlex.quote(labels[i])}')
  script = " ; ".join(steps)
  if not log_dest:
    return script
  copy = sh_join([*shlex.split(python), "-m", "launch.worker_logs", f"--log={log}",
                  f"--every_s={copy_every_s:g}", *(["--tee"] if tee else [])])
  dest = sh_quote(f"--dest={log_dest}") + '"$(hostname)".log'
  return (f"export PYTHONUNBUFFERED=1 ; {{ {script} ; }} 2>&1 | "
          f"{{ {copy} {dest} || cat >> {shlex.quote(log)} ; }}")


def remote_start_command(commands: Sequence[Sequence[str]], remote_dir: str, name: str,
                         detach: bool = True, script: str = "") -> str:
  """The remote shell line that runs a slice's points in order, once, each arg quoted.

  `script` (from points_script) replaces the plain run of `commands`. The shell takes the
  slice's flock on fd 9 and the (background) run inherits it, so the lock is held until the
  points finish. It prints 'started NAME, log in ...' or, when the lock is held,
  'already-running NAME'. Words starting with '~/' are in the worker's home.
  """
  script = script or points_script(commands)
  run = f"bash -c {shlex.quote(script)}"
  if detach:
    run = (f"nohup {run} >> {shlex.quote(name + '.log')} 2>&1 < /dev/null & "
           f"echo started {shlex.quote(name)}, log in {shlex.quote(remote_dir + '/' + name)}.log")
  return (f"cd {sh_quote(remote_dir)} && exec 9>> {shlex.quote(name + '.lock')} && "
          f"if flock -n 9; then {run}; else echo already-running {shlex.quote(name)}; fi")
