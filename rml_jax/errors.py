"""The one exception type whose message is shown to the user as a single line."""


class UserError(Exception):
  """Bad input (config key, file, directory): the message names it and what was expected."""
