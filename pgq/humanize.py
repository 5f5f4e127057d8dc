"""Text for people: durations and one-line errors, the same everywhere pgq prints them."""

from __future__ import annotations

from datetime import timedelta


def duration(delta: timedelta | None) -> str:
    """``850ms``, ``12.3s``, ``14m``, ``3.2h``, ``4.1d``; ``-`` for None."""
    if delta is None:
        return "-"
    seconds = max(0.0, delta.total_seconds())
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def error_line(exc: BaseException) -> str:
    """An exception as one line: libpq's multi-line messages joined with "; "."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return "; ".join(lines) if lines else type(exc).__name__
