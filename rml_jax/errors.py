"""The one exception type whose message is shown to the user as a single line, and the one place
that turns it into `error: ...` with exit status 2."""

from __future__ import annotations

import sys
from typing import Callable, NoReturn


class UserError(Exception):
  """Bad input (config key, file, directory): the message names it and what was expected."""


def fail(message: str) -> NoReturn:
  """Prints `error: <message>` on stderr and exits with status 2."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(2)


def run_program(main: Callable, flags_parser: Callable | None = None) -> None:
  """absl app.run(main), with a UserError ending the program as one `error:` line, status 2."""
  from absl import app

  try:
    if flags_parser is None:
      app.run(main)
    else:
      app.run(main, flags_parser=flags_parser)
  except UserError as e:
    fail(str(e))
