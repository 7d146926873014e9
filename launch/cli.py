"""What the launchers' command lines share: flag and input errors as one `error: …` line,
and options declared once, as dataclass fields that are also flags.

Every user error (a bad flag value, a missing config file, a bad sweep(), an unusable
workdir) reaches the user as `error: …` on stderr with exit status 2 and no traceback.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
from collections.abc import Callable, Sequence
from typing import Any

from absl import app
from absl import flags

from bscan import errors
from bscan import sweep as sweep_lib
from bscan.errors import ConfigError


def option(default: Any = dataclasses.MISSING, help: str = "",  # pylint: disable=redefined-builtin
           *, flag: str = "", choices: Sequence[str] = (), multi: bool = False) -> Any:
  """A dataclass field that is also a flag (named `flag`, else the field; no default: required).

  Its type picks the flag kind: str, int, float, bool, Sequence[str] (a comma list, or a
  repeatable flag with multi=True); choices make an enum.
  """
  return dataclasses.field(default=tuple(default) if isinstance(default, list) else default,
                           metadata=dict(help=help, flag=flag, choices=tuple(choices), multi=multi))


def option_fields(cls: type) -> list[dataclasses.Field]:
  """The fields of dataclass cls that are flags (made with `option`)."""
  return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def _flag_name(field: dataclasses.Field) -> str:
  return field.metadata["flag"] or field.name


def define_option_flags(cls: type, flag_values: flags.FlagValues) -> None:
  """Defines one flag per `option` field of cls, with its default and help."""
  define = {"str": flags.DEFINE_string, "int": flags.DEFINE_integer,
            "float": flags.DEFINE_float, "bool": flags.DEFINE_boolean,
            "Sequence[str]": flags.DEFINE_list}
  for field in option_fields(cls):
    meta, name = field.metadata, _flag_name(field)
    required = field.default is dataclasses.MISSING
    default = None if required else field.default
    default = list(default) if isinstance(default, tuple) else default
    if meta["choices"]:
      flags.DEFINE_enum(name, default, list(meta["choices"]), meta["help"],
                        flag_values=flag_values)
    elif meta["multi"]:
      flags.DEFINE_multi_string(name, default, meta["help"], flag_values=flag_values)
    else:
      define[str(field.type)](name, default, meta["help"], required=required,
                              flag_values=flag_values)


def option_values(cls: type, flag_values: flags.FlagValues) -> dict[str, Any]:
  """{field: its flag's value} for every `option` field of cls: the kwargs that build it."""
  return {f.name: flag_values[_flag_name(f)].value for f in option_fields(cls)}


_MISSING = re.compile(r"Flag --(\w+) must have a value other than None")


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's flag parsing, with an unknown, missing or malformed flag as one error line."""
  try:
    return flags.FLAGS(list(argv))
  except flags.Error as e:
    missing = _MISSING.search(str(e))  # absl words a missing required flag as a None value
    errors.fail(f"--{missing.group(1)} is required (see --help)" if missing else
                f"{e} (see --help)")
    raise  # unreachable: fail() exits


def run(main: Callable[[list[str]], Any]) -> None:
  """app.run(main) where a ConfigError anywhere in main is one `error:` line, exit 2."""
  app.run(errors.exit_on_user_error(main), flags_parser=parse_flags)


def no_arguments(argv: Sequence[str]) -> None:
  """Raises ConfigError for positional arguments (a flag typed without its '--')."""
  if len(argv) > 1:
    raise ConfigError(f"unexpected arguments {list(argv[1:])}: every input is a --flag=value")


def load_sweep(config: str) -> sweep_lib.Sweep:
  """The --config file's sweep(); its faults (missing, not importable, bad) as ConfigError."""
  if ":" in config:  # the launcher appends each point's ':ARG'; a second one would break it
    raise ConfigError(f"--config={config}: give the config file only, without ':ARG' (each "
                      "point's arg comes from sweep())")
  try:
    return sweep_lib.load_sweep(config)
  except (FileNotFoundError, ValueError, TypeError) as e:
    raise ConfigError(f"--config: {e}") from e


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_one_line(flag: str, value: str) -> str:
  """Returns value; ConfigError when it holds a newline or another control character."""
  if _CONTROL.search(value):
    raise ConfigError(f"--{flag}={value!r}: newlines and control characters cannot go into a "
                      "command line or script; give one line (repeat the flag for more)")
  return value


def check_python(flag: str, python: str, here: bool) -> str:
  """Returns python (a path, or words like 'conda run python'); ConfigError when unusable.

  With `here`, it must run on this machine (launch.local); cluster paths are not checked.
  """
  try:
    words = shlex.split(check_one_line(flag, python))
  except ValueError as e:  # e.g. an unbalanced quote
    raise ConfigError(f"--{flag}={python!r}: {e}; quote it as in a shell") from e
  if not words:
    raise ConfigError(f"--{flag} is empty; give a Python interpreter")
  if here and shutil.which(words[0]) is None:
    raise ConfigError(f"--{flag}={python!r}: {words[0]!r} is not an executable here; give a "
                      "Python interpreter (a path or a name on PATH)")
  return python


def check_local_dir(flag: str, path: str) -> str:
  """Returns path after making it; ConfigError unless it is a writable local (or NFS) dir."""
  if "://" in path:
    raise ConfigError(f"--{flag}={path}: must be a local or NFS path (lock files need "
                      "O_CREAT|O_EXCL, which object stores lack)")
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise ConfigError(f"--{flag}={path} cannot be created ({e.strerror}); use another "
                      "path") from e
  if not os.access(path, os.W_OK):
    raise ConfigError(f"--{flag}={path} is not writable; fix its permissions or use another "
                      "path")
  return path
