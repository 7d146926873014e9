"""The one error a user sees for anything they typed or own: a field or file, and the fix."""

from collections.abc import Callable
import functools
import sys
from typing import Any

EXIT_USAGE = 2  # what argparse and most Unix tools return for bad input


class ConfigError(ValueError):
  """Input that cannot work (config field, arg key, data, tokenizer, workdir, run file).

  The message names the field or file and says how to fix it; it is shown as one line.
  """


def exit_on_user_error(main: Callable[..., Any]) -> Callable[..., Any]:
  """Wraps a CLI main: a ConfigError becomes one `error: …` line on stderr and exit status 2."""

  @functools.wraps(main)
  def wrapped(*args, **kwargs):
    try:
      return main(*args, **kwargs)
    except ConfigError as e:
      fail(str(e))

  return wrapped


def fail(message: str) -> None:
  """Prints `error: message` (one line) and exits with status 2."""
  print(f"error: {' '.join(message.split())}", file=sys.stderr, flush=True)
  sys.exit(EXIT_USAGE)
