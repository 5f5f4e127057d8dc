"""JSON in, JSON out. Nothing in pgq ever unpickles: a job row must be readable by a person with psql and
safe to load from a database someone else can write to."""

from __future__ import annotations

import json
import re
from typing import Any

from .errors import SerializationError

# A NUL character in a string, as json.dumps writes it: "\u0000" preceded by an even number of
# backslashes (an odd number means the backslash before "u0000" is itself an escaped backslash).
_NUL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")
# One encoder for every dumps(): json.dumps() with options builds a new JSONEncoder per call.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def dumps(value: Any, *, what: str) -> str:
    """Serialize *value* for a jsonb column, or raise SerializationError naming *what* it was.

    Also refused: what JSON allows but PostgreSQL cannot store — the NUL character (jsonb rejects
    its escape) and lone surrogates (not UTF-8) — so the problem surfaces here, naming the value, and
    not as a database error in the middle of recording other jobs' outcomes."""
    try:
        text = _ENCODER.encode(value)
        text.encode("utf-8")
    except (TypeError, ValueError) as exc:  # UnicodeEncodeError is a ValueError
        raise SerializationError(f"{what} is not JSON-serializable: {exc}") from None
    if "\\u0000" in text and _NUL_ESCAPE.search(text):
        raise SerializationError(f"{what} is not JSON-serializable: PostgreSQL cannot store the NUL character "
                                 "(\\u0000) in jsonb")
    return text


def loads(text: str | bytes) -> Any:
    return json.loads(text)
