"""Reading the small JSON files of model folders and runs, with one-line errors."""

from __future__ import annotations

import json

from upcycle.errors import InputError


def read_json(path: str) -> dict:
    """The JSON object stored in `path`.

    A file that is not valid JSON, or holds something other than an object, is an InputError
    naming it; a missing file raises OSError as `open` does (callers say what was expected).
    """
    try:
        with open(path) as f:
            value = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(f"{path}: not valid JSON") from None
    if not isinstance(value, dict):
        raise InputError(f"{path}: not a JSON object")
    return value
