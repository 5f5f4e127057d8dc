"""Retention: finished jobs, and their results, are deleted once they are older than their state's retention.

Running workers do it (:class:`Pruner`, on its own thread in every worker), one worker at a time: each
round is won by the worker whose upsert of the ``prune`` row in ``pgq.maintenance_runs`` finds it due
(``next_run_at <= now()``), which moves ``next_run_at`` on by the interval. No leader, no advisory lock
(so it works behind PgBouncer in transaction mode); a worker that dies mid-round leaves nothing to clean
up, the next round simply comes due. ``pgq prune`` runs :func:`prune` by hand.

Deleting happens in batches of :data:`BATCH` jobs, each one autocommitted statement (its own short
transaction; ``FOR UPDATE SKIP LOCKED`` passes rows that a retry by hand or another pruner holds), so
pruning never holds locks or a snapshot for long, however large the backlog. Batches go round-robin over
the states, oldest first within each, so a backlog of successes does not starve the others.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import psycopg

from . import db, sql
from .errors import DatabaseUnavailable
from .states import TERMINAL

if TYPE_CHECKING:
    from .app import App

log = logging.getLogger("pgq.pruner")

#: What a finished job is kept for, by state, unless configured otherwise. ``None`` keeps it forever.
#:
#: - succeeded, 1 day: ``get()`` reads a result soon after the job ends, and a day covers "did it run
#:   last night?"; it is Celery's ``result_expires`` default. Successes are most of the rows, so this is
#:   the number that sizes the table (at 100 jobs/s, a day is 8.6 million rows).
#: - cancelled, 7 days: someone chose to stop these; a week lets the decision be reviewed or undone
#:   (``pgq retry --cancelled``) after a weekend.
#: - failed, 30 days: failures are what people investigate and retry by hand (``pgq retry --failed``),
#:   sometimes only after the next release; they are few, so keeping them a month costs little.
DEFAULT_RETENTION: dict[str, timedelta | None] = {
    "succeeded": timedelta(days=1),
    "cancelled": timedelta(days=7),
    "failed": timedelta(days=30),
}
STATES = tuple(str(s) for s in TERMINAL)

#: Jobs deleted per statement (and transaction). A batch of 5,000 takes tens of milliseconds: row locks
#: and the snapshot are held that long, and a batch's WAL stays a few megabytes.
BATCH = 5_000
#: Seconds between two pruning rounds (each worker asks; one wins each round).
INTERVAL = 60.0
#: The round name in pgq.maintenance_runs.
ROUND = "prune"

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
FOREVER = ("forever", "never", "inf", "none")


def parse_duration(text: str | float | timedelta | None) -> timedelta | None:
    """``90``/``90s``, ``15m``, ``12h``, ``1d``, ``2w``, combinations (``1d12h``) or a timedelta; ``forever``
    (or ``never``, None) means no limit and returns None."""
    if text is None or isinstance(text, timedelta):
        return text
    if isinstance(text, (int, float)):
        if text < 0:
            raise ValueError(f"a duration cannot be negative: {text!r}")
        return timedelta(seconds=text)
    value = text.strip().lower()
    if value in FOREVER:
        return None
    try:
        seconds = float(value)
    except ValueError:
        parts = _DURATION.findall(value)
        if not parts or _DURATION.sub("", value).strip():
            raise ValueError(f"not a duration: {text!r} (examples: 90s, 15m, 12h, 1d, 2w, 1d12h, forever)") from None
        seconds = sum(float(n) * _UNITS[unit] for n, unit in parts)
    if seconds < 0:
        raise ValueError(f"a duration cannot be negative: {text!r}")
    return timedelta(seconds=seconds)


def format_duration(value: timedelta | None) -> str:
    """The shortest exact spelling: ``1d``, ``36h``, ``90s``, ``forever``."""
    if value is None:
        return "forever"
    seconds = value.total_seconds()
    for unit in ("d", "h", "m"):
        if seconds >= _UNITS[unit] and seconds % _UNITS[unit] == 0:
            return f"{int(seconds // _UNITS[unit])}{unit}"
    return f"{seconds:g}s"


def retention(overrides: Mapping[str, timedelta | float | str | None] | None = None) -> dict[str, timedelta | None]:
    """DEFAULT_RETENTION with *overrides* applied (values as :func:`parse_duration` takes them)."""
    out = dict(DEFAULT_RETENTION)
    for state, value in (overrides or {}).items():
        if state not in STATES:
            raise ValueError(f"retention is for finished states ({', '.join(STATES)}), not {state!r}")
        out[state] = parse_duration(value)
    return out


@dataclass(frozen=True)
class Batch:
    """One DELETE: its state, what it deleted, and the transaction it ran in."""

    state: str
    jobs: int
    results: int
    xid: int


@dataclass
class PruneStats:
    """What one :func:`prune` call deleted."""

    jobs: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATES, 0))
    results: int = 0
    batches: list[Batch] = field(default_factory=list)
    seconds: float = 0.0
    more: bool = False  # stopped (deadline or stop request) with rows possibly left to delete

    @property
    def total(self) -> int:
        return sum(self.jobs.values())


def prune(
    conn: psycopg.Connection,
    keep: Mapping[str, timedelta | None],
    *,
    batch_size: int = BATCH,
    deadline: float | None = None,
    stop: threading.Event | None = None,
    progress: Callable[[PruneStats], None] | None = None,
) -> PruneStats:
    """Delete the finished jobs (and their results) of each state in *keep* whose ``finished_at`` is older
    than its retention (None: keep forever), *batch_size* per autocommitted statement, until none is left,
    the monotonic *deadline* passes or *stop* is set. *progress* is called after each batch."""
    if not conn.autocommit:
        raise ValueError("prune() needs an autocommit connection: each batch is its own transaction")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    started = time.monotonic()
    stats = PruneStats()
    pending = [s for s in STATES if s in keep and keep[s] is not None]
    after: dict[str, datetime | None] = dict.fromkeys(pending)  # where each state's next batch starts
    while pending:
        for state in list(pending):
            if (deadline is not None and time.monotonic() >= deadline) or (stop is not None and stop.is_set()):
                stats.more = True
                stats.seconds = time.monotonic() - started
                return stats
            age = keep[state]
            assert age is not None
            jobs, results, xid, last = conn.execute(sql.PRUNE_BATCH, {
                "status": state, "keep": age.total_seconds(), "limit": batch_size, "after": after[state],
            }).fetchone() or (0, 0, "0", None)
            after[state] = last or after[state]
            if jobs:
                stats.jobs[state] += jobs
                stats.results += results
                stats.batches.append(Batch(state, jobs, results, int(xid)))
                if progress is not None:
                    progress(stats)
            if jobs < batch_size:
                pending.remove(state)
    stats.seconds = time.monotonic() - started
    return stats


@dataclass(frozen=True)
class Candidates:
    """What :func:`prune` would delete of one state now."""

    state: str
    keep: timedelta | None
    jobs: int
    oldest: datetime | None


def count(conn: psycopg.Connection, keep: Mapping[str, timedelta | None]) -> list[Candidates]:
    """``pgq prune --dry-run``: the jobs of each state that are past their retention (one index range each)."""
    out = []
    for state in STATES:
        if state not in keep:
            continue
        age = keep[state]
        if age is None:
            out.append(Candidates(state, None, 0, None))
            continue
        row = conn.execute(sql.PRUNE_COUNT, {"status": state, "keep": age.total_seconds()}).fetchone()
        out.append(Candidates(state, age, row[0] if row else 0, row[1] if row else None))
    return out


@dataclass(frozen=True)
class PruneRound:
    """A round this pruner won (``started_at`` is the database time it claimed it) and what it deleted."""

    started_at: datetime
    stats: PruneStats


class Pruner:
    """The worker's pruning service: every *interval* seconds it asks for the round; the one worker that
    gets it deletes what is past *keep* (see :data:`DEFAULT_RETENTION`), in batches of *batch_size*.

    A round lasts at most 80% of the interval (the next round cannot come due before it ends, so two
    rounds never overlap). A round that had to stop with work left hands the next round out at once, so
    a backlog is worked through round after round, by whichever worker asks first.
    """

    def __init__(
        self,
        app: App,
        *,
        keep: Mapping[str, timedelta | float | str | None] | None = None,
        interval: float = INTERVAL,
        batch_size: int = BATCH,
        owner: str = "pgq",
    ):
        if interval <= 0:
            raise ValueError("the prune interval must be positive")
        self.app = app
        self.keep = retention(keep)
        self.interval = interval
        self.batch_size = batch_size
        self.owner = owner
        self._stop = threading.Event()
        self._conn: psycopg.Connection | None = None

    @property
    def enabled(self) -> bool:
        """False when every state is kept forever: then there is nothing to do."""
        return any(v is not None for v in self.keep.values())

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = db.connect(self.app.database_url, role="pruner", autocommit=True)
        return self._conn

    def run_once(self) -> PruneRound | None:
        """Take this round if it is due and nobody else took it, and prune; None when not ours."""
        conn = self._connection()
        row = conn.execute(sql.MAINTENANCE_CLAIM, {"name": ROUND, "interval": self.interval,
                                                   "run_by": self.owner}).fetchone()
        if row is None:
            return None
        started_at = row[0]
        stats = prune(conn, self.keep, batch_size=self.batch_size, stop=self._stop,
                      deadline=time.monotonic() + 0.8 * self.interval)
        conn.execute(sql.MAINTENANCE_DONE, {"name": ROUND, "run_by": self.owner, "started_at": started_at,
                                            "deleted": stats.total, "more": stats.more})
        if stats.total:
            log.info("pruned %d finished job(s) (%s) in %d batch(es), %.2f s%s", stats.total,
                     ", ".join(f"{n} {s}" for s, n in stats.jobs.items() if n), len(stats.batches),
                     stats.seconds, "; more to do" if stats.more else "")
        return PruneRound(started_at, stats)

    def loop(self) -> None:
        """Ask for a round every interval (at once again after a round that left work), until stop()."""
        delay = 1.0
        while not self._stop.is_set():
            wait = self.interval
            try:
                done = self.run_once()
                delay = 1.0
                if done is not None and done.stats.more:
                    wait = 0.0
            except (psycopg.OperationalError, DatabaseUnavailable) as exc:
                log.warning("database unavailable (pruning): %s; retrying in %.0f s", exc, delay)
                wait, delay = delay, min(delay * 2, self.interval)
            except psycopg.Error as exc:
                hint = (": grant the worker role DELETE on pgq.jobs and pgq.results (pgq grants --kind worker)"
                        if isinstance(exc, psycopg.errors.InsufficientPrivilege) else "")
                log.error("pruning failed: %s: %s%s", type(exc).__name__, str(exc).strip(), hint)
            if wait:
                self._close()  # one short-lived connection per interval, not one more held per worker
                self._stop.wait(wait)
        self._close()

    def stop(self) -> None:
        self._stop.set()

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def states_of(values: Iterable[str]) -> list[str]:
    """``--state failed --state succeeded,cancelled`` as a list of finished states, in pgq's order."""
    wanted = {v.strip() for value in values for v in value.split(",") if v.strip()}
    bad = sorted(wanted - set(STATES))
    if bad:
        raise ValueError(f"only finished jobs are pruned ({', '.join(STATES)}), not {', '.join(bad)}")
    return [s for s in STATES if s in wanted]
