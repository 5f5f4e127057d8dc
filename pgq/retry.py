"""Retry arithmetic: pure, no database. The delay is computed here; the database adds it to its own
clock (``now() + delay``), so a worker with a wrong clock still schedules correctly."""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

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


@dataclass(frozen=True)
class Backoff:
    """A retry delay for ``retry_on``: ``base ** attempt`` seconds after attempt number *attempt*, at most
    *cap*, with equal jitter unless ``jitter=False`` (the same arithmetic as a task's ``retry_backoff``).
    ``Backoff(base=5, cap=600)`` waits about 5, 25, 125, 600, 600, … seconds."""

    base: float = 2.0
    cap: float = MAX_BACKOFF_SECONDS
    jitter: bool = True

    def __post_init__(self) -> None:
        for name in ("base", "cap"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0:
                raise ValueError(f"Backoff {name} must be a number of seconds >= 0, got {value!r}")

    def seconds(self, attempt: int) -> float:
        return backoff_seconds(attempt, self.base, cap=self.cap, jitter=self.jitter)


class _Rule(Enum):
    DISCARD = "discard"  # discard_on: fail at once
    DEFAULT = "default"  # autoretry_for: retry with the job's own backoff (retry_backoff)


ExceptionClasses = type[BaseException] | tuple[type[BaseException], ...]


class RetryPolicy:
    """Which exceptions a task retries, after how long, and which fail its job at once.

    The rules, for an exception of class E raised by an attempt that is not the job's last:

    - The classes named in ``retry_on`` (class → :class:`Backoff`), ``discard_on`` and
      ``autoretry_for`` are looked up along E's MRO: the most specific one wins (``discard_on=(OSError,)``
      with ``retry_on={TimeoutError: …}`` retries a TimeoutError and discards other OSErrors).
      ``retry_on`` retries with its Backoff, ``autoretry_for`` with the job's ``retry_backoff``, and
      ``discard_on`` fails the job at once.
    - E matches none of them: without ``autoretry_for`` it is retried with the job's ``retry_backoff``,
      as every exception is by default (``retry_on`` and ``discard_on`` only change the classes they
      name). A non-empty ``autoretry_for`` turns this around, as in Celery: the job fails at once.

    On the last attempt the job fails whatever the rules say. ``self.retry()`` is always honoured; its
    delay is its ``countdown``, else the ``retry_on`` Backoff of its ``exc``, else ``retry_backoff``.
    """

    def __init__(
        self,
        retry_on: Mapping[ExceptionClasses, Backoff] | None = None,
        discard_on: ExceptionClasses | Iterable[type[BaseException]] = (),
        autoretry_for: ExceptionClasses | Iterable[type[BaseException]] | None = None,
        *,
        owner: str = "task",
    ):
        self.rules: dict[type[BaseException], Backoff | _Rule] = {}
        self.allowlist = False
        where: dict[type[BaseException], str] = {}

        def add(cls: Any, rule: Backoff | _Rule, option: str) -> None:
            if not (isinstance(cls, type) and issubclass(cls, BaseException)):
                raise ValueError(f"{owner}: {option} takes exception classes, got {cls!r}")
            if cls in self.rules and (where[cls] != option or self.rules[cls] != rule):
                raise ValueError(f"{owner}: {cls.__name__} is named twice, in {where[cls]} and in {option}, "
                                 "with different rules")
            where[cls] = option
            self.rules[cls] = rule

        if retry_on is not None:
            if not isinstance(retry_on, Mapping):
                raise ValueError(f"{owner}: retry_on takes a dict of exception class -> pgq.Backoff, got "
                                 f"{type(retry_on).__name__}")
            for key, backoff in retry_on.items():
                if not isinstance(backoff, Backoff):
                    raise ValueError(f"{owner}: retry_on values must be pgq.Backoff(...), got {backoff!r}")
                for cls in _classes(key):
                    add(cls, backoff, "retry_on")
        for cls in _classes(discard_on):
            add(cls, _Rule.DISCARD, "discard_on")
        if autoretry_for is not None:
            listed = _classes(autoretry_for)
            for cls in listed:
                add(cls, _Rule.DEFAULT, "autoretry_for")
            self.allowlist = bool(listed)

    def __bool__(self) -> bool:
        return bool(self.rules)

    def _match(self, exc_type: type[BaseException]) -> Backoff | _Rule | None:
        for cls in exc_type.__mro__:
            rule = self.rules.get(cls)
            if rule is not None:
                return rule
        return None

    def delay_for(self, exc_type: type[BaseException], attempt: int, default_base: float) -> float | None:
        """Seconds until the next attempt after attempt *attempt* raised *exc_type*, or None: fail now.
        *default_base* is the job's ``retry_backoff``. The caller checks whether attempts are left."""
        rule = self._match(exc_type)
        if isinstance(rule, Backoff):
            return rule.seconds(attempt)
        if rule is _Rule.DISCARD or (rule is None and self.allowlist):
            return None
        return backoff_seconds(attempt, default_base)

    def requested_delay(self, exc_type: type[BaseException] | None, attempt: int, default_base: float) -> float:
        """The delay of a ``self.retry(exc=…)`` without countdown: the Backoff of *exc_type* in ``retry_on``,
        else the job's own backoff. discard_on and autoretry_for do not apply: the retry was asked for."""
        rule = self._match(exc_type) if exc_type is not None else None
        if isinstance(rule, Backoff):
            return rule.seconds(attempt)
        return backoff_seconds(attempt, default_base)


def _classes(value: Any) -> list[Any]:
    """``ValueError``, ``(ValueError, KeyError)`` or any iterable of classes, as a list."""
    if isinstance(value, type):
        return [value]
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        return [value]  # refused by the caller, naming it
    return list(value)
