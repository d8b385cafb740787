"""The one exception type that reaches users as a single line.

Library code raises :class:`DebiasError` for anything a user can fix (bad config, missing file,
wrong checkpoint). The CLI and the stage scripts print its message as one line and exit with
code 2; every other exception is a bug and keeps its traceback.
"""


class DebiasError(Exception):
    """A user-facing error: the message names the problem in one line."""
