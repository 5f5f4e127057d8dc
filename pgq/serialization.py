"""JSON in, JSON out. Nothing in pgq ever unpickles: a job row must be readable by a person with psql and
safe to load from a database someone else can write to."""

from __future__ import annotations

import json
from typing import Any

from .errors import SerializationError


def dumps(value: Any, *, what: str) -> str:
    """Serialize *value* for a jsonb column, or raise SerializationError naming *what* it was."""
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise SerializationError(f"{what} is not JSON-serializable: {exc}") from None


def loads(text: str | bytes) -> Any:
    return json.loads(text)
