"""The one exception type the CLI turns into a one-line message and a non-zero exit."""

__all__ = ["DiffcircuitError"]


class DiffcircuitError(Exception):
    """A user-facing error: bad input, a missing file, a refused checkpoint.

    The message must be one self-contained line that names what was wrong.
    """
