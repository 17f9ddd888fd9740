"""The one exception type for bad input.

Anything the user can fix (a missing folder, an unknown detector, a truncated
checkpoint...) raises :class:`OodensError` with a one-line message naming the
culprit and what was expected. The CLI prints it and exits with code 2; any
other exception is a bug and keeps its traceback.
"""


class OodensError(Exception):
    """A user-facing error: one line, names the culprit and what was expected."""
