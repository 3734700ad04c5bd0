"""The one exception type for what a user can fix: a config field, a flag, a file or a path.

The command-line programs report a `UserError` as one line and exit status 2 (the launchers do
not restart those: running again would fail the same way); any other exception is a bug in ctx
or below it and ends with status 1 and the exception's type named.
"""


class UserError(Exception):
    """Bad input from the user: the message names the field, flag, file or split and the fix."""


class InputError(UserError, ValueError):
    """A flag, data file or data split that leaves nothing to work on or cannot be read."""


class MissingInput(UserError, FileNotFoundError):
    """A file or folder the user named does not exist (or holds none of what it should)."""


class TrainingDiverged(UserError, FloatingPointError):
    """The loss or a gradient became non-finite; the last good checkpoint is kept."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with what the command kept and how to go on (the commands print it in one line)."""
