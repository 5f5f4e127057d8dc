"""Retry arithmetic: pure, no database. The delay is computed here; the database adds it to its own
clock (``now() + delay``), so a worker with a wrong clock still schedules correctly."""

from __future__ import annotations

import random

#: Upper bound of a computed backoff, so attempt 20 of a base-2 backoff does not wait for 12 days.
MAX_BACKOFF_SECONDS = 3600.0


def backoff_seconds(attempt: int, base: float, *, cap: float = MAX_BACKOFF_SECONDS, jitter: bool = True) -> float:
    """Delay before the attempt that follows attempt number *attempt* (1-based).

    ``base ** attempt`` seconds, capped, with "equal jitter": half the delay is kept and the other half
    is random, so many jobs that failed together (a database blip) do not all return at the same
    instant, while no retry comes back sooner than half its nominal delay.
    """
    if base <= 0:
        return 0.0
    delay = min(cap, float(base) ** max(1, attempt))
    if not jitter:
        return delay
    return delay / 2 + random.uniform(0, delay / 2)
