"""The one exception type for bad user input.

Library code raises `UserError` for anything a user can fix (a bad flag, a missing file, a
config that does not fit the data). Its message names the bad value and the fix. CLIs catch
it (see `imagen_jax.cli.gin_utils.run`), print one line to stderr and exit with status 2.
Bugs raise anything else and keep their traceback.
"""


class UserError(ValueError):
  """Bad input that the user can fix; the message says how."""
