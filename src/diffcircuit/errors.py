"""The exceptions the CLI turns into a one-line message and a non-zero exit, and the one warning it prints.

Library code names what was wrong in its own terms — a config *field* (``n``, ``mean_reference``), a file, a
model — never a command-line flag; only the CLI maps fields to its flags (``ConfigError.with_flags``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

__all__ = ["ConfigError", "DiffcircuitError", "DiffcircuitWarning", "InputError", "ModelError"]


class DiffcircuitError(Exception):
    """A user-facing error: bad input, a missing file, a refused checkpoint.

    The message must be one self-contained line that names what was wrong. Where a setting could fix it, the message
    names its config field and ``fields`` lists them: the CLI shows them as the flags that set them (``with_flags``).
    """

    def __init__(self, message: str = "", *fields: str):
        super().__init__(message)
        self.fields = fields

    def with_flags(self, flags: Mapping[str, str] | None = None) -> str:
        """The message with each field named as its flag (``flags[field]``, default ``--field-name``)."""
        text = str(self)
        for field in sorted(self.fields, key=len, reverse=True):
            flag = (flags or {}).get(field, "--" + field.replace("_", "-"))
            # not inside a word, a 'quoted' name or a path (/tmp/out/run.json keeps its "out")
            text = re.sub(rf"(?<![\w\-.'/\\]){re.escape(field)}(?![\w\-'/\\])", flag, text)
        return text


class InputError(DiffcircuitError):
    """Data that cannot be used: an image, a folder, a file of embeddings, an output directory."""


class ModelError(DiffcircuitError):
    """A model that cannot be loaded or run as asked: its folder, weights, scheduler, conditioning."""


class ConfigError(DiffcircuitError, ValueError):
    """A setting or argument that is not allowed (also a ``ValueError``, as Python has it)."""


class DiffcircuitWarning(UserWarning):
    """Something the user should know that does not stop the work (an unreadable image skipped): the CLI prints
    it as one line, ``diffcircuit: warning: ...``."""
