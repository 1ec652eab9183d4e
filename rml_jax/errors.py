"""The one exception type whose message is shown to the user as a single line."""


class UserError(Exception):
  """Bad input (config key, file, directory): the message names it and what was expected."""


def run_program(main) -> None:
  """absl app.run(main), with a UserError ending the program as one `error:` line, status 2."""
  import sys

  from absl import app

  try:
    app.run(main)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
