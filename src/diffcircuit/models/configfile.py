"""Reading a model folder's JSON files (``config.json``, ``model_index.json``, scheduler configs): a file that is
not JSON is refused in one line that names it and the place it breaks, never with a parser's traceback."""

from __future__ import annotations

import json
from pathlib import Path

from diffcircuit.errors import ModelError

__all__ = ["read_json"]


def read_json(path: Path) -> dict:
    """The object in the JSON file ``path``; a file that cannot be read or parsed, or holds no object, is refused."""
    try:
        value = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(
            f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if not isinstance(value, dict):
        raise ModelError(f"{path} holds a JSON {type(value).__name__}, not an object of settings")
    return value
