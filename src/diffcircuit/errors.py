"""The one exception type the CLI turns into a one-line message and a non-zero exit."""

__all__ = ["DiffcircuitError", "DiffcircuitWarning"]


class DiffcircuitError(Exception):
    """A user-facing error: bad input, a missing file, a refused checkpoint.

    The message must be one self-contained line that names what was wrong.
    """


class DiffcircuitWarning(UserWarning):
    """Something the user should know that does not stop the work (an unreadable image skipped): the CLI prints
    it as one line, ``diffcircuit: warning: ...``."""
