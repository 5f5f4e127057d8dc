"""Periodic tasks: schedules, their tick arithmetic, and the scheduler that enqueues every tick exactly once.

A schedule fires at *ticks*, instants computed from its cron expression in its time zone, or from its
interval (``every``: the multiples of the interval since the Unix epoch, so every scheduler agrees on them).

Exactly once, however many schedulers run (``pgq beat``, ``pgq worker -B``, on as many machines as you
like), and without a leader: a scheduler that finds a tick due inserts ``(schedule, tick)`` into
``pgq.periodic_ticks``, whose primary key lets exactly one insert win, and only the winner inserts the job,
in the same transaction. No advisory lock is involved, so it works through PgBouncer in transaction mode.

The decisions use the database clock: the scheduler reads ``now()`` from the database and computes the
due ticks from it, so schedulers on machines whose clocks disagree still agree on what is due.

Missed ticks (nothing ran while they fell due): by default only the latest due tick is enqueued;
``catch_up=N`` also enqueues up to N missed ticks before it. A schedule nobody has fired yet starts when
the first scheduler sees it: ticks before that are not missed ticks, they never fire.

Daylight saving time behaves as in cron (Debian's, whose rules cronsim follows): a 5-field expression with
a specific minute and hour (``30 2 * * *``) whose time is skipped when clocks spring forward fires right
after the jump, and fires once when that time repeats as clocks fall back; expressions with a wildcard
minute or hour (``0 * * * *``, ``*/15 * * * *``) follow real time, so an hourly schedule fires every real
hour across both transitions.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone, tzinfo
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import psycopg
from cronsim import CronSim, CronSimError

from . import db, enqueue, metrics, migrate, sql
from .errors import ConfigurationError, DatabaseUnavailable, EnqueueError
from .humanize import error_line
from .tasks import Task

if TYPE_CHECKING:
    from .app import App

log = logging.getLogger("pgq.periodic")

UTC = timezone.utc
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MIN_EVERY = timedelta(seconds=1)
_US = timedelta(microseconds=1)
_SECOND = timedelta(seconds=1)
#: apply_async's options a schedule may set for its jobs.
JOB_OPTIONS = ("queue", "priority", "max_attempts", "retry_backoff", "lease_seconds", "ignore_result")
#: Keys of a Celery-style beat schedule entry (see :func:`add_beat_schedule`).
BEAT_KEYS = ("task", "schedule", "args", "kwargs", "options", "tz", "catch_up")
ALIASES = {
    "@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *", "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@hourly": "0 * * * *",
}
#: Tick rows are kept this long after they were enqueued (the latest of each schedule always stays: it is
#: where the next one starts).
KEEP_TICKS = timedelta(days=1)
PRUNE_INTERVAL = 300.0
PRUNE_BATCH = 10_000
_MAX_STEPS = 10_000  # a bound on any single walk over a cron iterator (it never comes near)


class ScheduleError(ConfigurationError, ValueError):
    """A periodic schedule is defined wrongly; the message names the schedule and the problem."""


# --- the schedule model and its pure tick arithmetic --------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    """When a task is enqueued, with what, and under which unique name.

    Exactly one of ``cron`` (5 fields, or 6 with seconds first; ``@hourly``-style aliases) and ``every``
    (a timedelta or seconds, at least 1 s). ``tz`` is the cron expression's time zone (default UTC);
    ``every`` ticks are instants, multiples of the interval since 1970-01-01 UTC, and take no ``tz``.
    """

    name: str
    task_name: str
    cron: str | None = None
    every: timedelta | None = None
    tz: str = "UTC"
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)
    catch_up: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.task_name, str) or not self.task_name.strip():
            raise ScheduleError(f"a periodic schedule's task must be a Task or a task name, got {self.task_name!r}")
        name = self.name
        if not isinstance(name, str) or not name.strip() or len(name) > enqueue.MAX_TASK_NAME:
            raise ScheduleError(f"a periodic schedule's name must be 1-{enqueue.MAX_TASK_NAME} characters, "
                                f"got {name!r}")

        def refuse(problem: str) -> ScheduleError:
            return ScheduleError(f"periodic schedule {name!r}: {problem}")

        if (self.cron is None) == (self.every is None):
            raise refuse("give exactly one of cron= (a cron expression) and every= (an interval)")
        if self.cron is not None:
            if not isinstance(self.cron, str):
                raise refuse(f"cron must be a string like '*/5 * * * *', got {type(self.cron).__name__}")
            cron = " ".join(self.cron.split())
            cron = ALIASES.get(cron.lower(), cron)
            object.__setattr__(self, "cron", cron)
            object.__setattr__(self, "tz", _zone_name(self.tz, refuse))
            try:
                next(CronSim(cron, datetime(2000, 1, 1, tzinfo=self.zone)))
            except CronSimError as exc:
                raise refuse(f"bad cron expression {cron!r}: {exc}") from None
            except StopIteration:
                raise refuse(f"cron expression {cron!r} never fires") from None
        else:
            every = self.every
            if isinstance(every, (int, float)) and not isinstance(every, bool):
                try:
                    every = timedelta(seconds=every)
                except (OverflowError, ValueError):
                    every = None
            if not isinstance(every, timedelta) or every < MIN_EVERY:
                raise refuse(f"every must be a timedelta (or seconds) of at least 1 s, got {self.every!r}")
            object.__setattr__(self, "every", every)
            if _zone_name(self.tz, refuse) != "UTC":
                raise refuse("tz= applies to cron schedules; every= ticks are multiples of the interval since "
                             "1970-01-01 UTC (use cron for wall-clock times)")
            object.__setattr__(self, "tz", "UTC")
        if isinstance(self.catch_up, bool) or not isinstance(self.catch_up, int) or self.catch_up < 0:
            raise refuse(f"catch_up must be an integer >= 0 (missed ticks to enqueue), got {self.catch_up!r}")
        options = dict(self.options or {})
        unknown = sorted(set(options) - set(JOB_OPTIONS))
        if unknown:
            raise refuse(f"unsupported option(s) {', '.join(unknown)}; a schedule's jobs take {', '.join(JOB_OPTIONS)}")
        args = self.args
        if isinstance(args, Sequence) and not isinstance(args, (str, bytes)):
            args = tuple(args)
        object.__setattr__(self, "args", args)
        object.__setattr__(self, "kwargs", {} if self.kwargs is None else self.kwargs)
        object.__setattr__(self, "options", options)
        try:
            enqueue.build(self.task_name, args=args, kwargs=self.kwargs, **options)
        except EnqueueError as exc:
            raise refuse(str(exc)) from None

    def __hash__(self) -> int:  # kwargs and options are dicts: hash what identifies the schedule
        return hash((self.name, self.task_name, self.cron, self.every, self.tz))

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.tz)

    def describe(self) -> str:
        """``cron 30 2 * * * (Europe/Paris)`` or ``every 30s``."""
        if self.cron is not None:
            return f"cron {self.cron} ({self.tz})"
        assert self.every is not None
        return f"every {_duration(self.every)}"

    def job_spec(self, app: App | None = None) -> enqueue.JobSpec:
        """The job a tick enqueues: the registered task's defaults (when *app* knows it), then the options."""
        task = app.tasks.get(self.task_name) if app is not None else None
        if task is not None:
            return task._spec(args=self.args, kwargs=self.kwargs, **self.options)
        return enqueue.build(self.task_name, args=self.args, kwargs=self.kwargs, **self.options)

    # Ticks are timezone-aware UTC datetimes; every argument must be timezone-aware.

    def next_after(self, t: datetime) -> datetime:
        """The first tick strictly after *t*."""
        if self.every is not None:
            return self._every_floor(t) + self.every
        for tick in self._cron_forward(t):
            return tick
        raise ScheduleError(f"periodic schedule {self.name!r}: cron expression {self.cron!r} never fires again")

    def latest(self, t: datetime) -> datetime | None:
        """The last tick at or before *t* (None if there is none in the 50 years before it)."""
        if self.every is not None:
            return self._every_floor(t)
        found = None
        # Reverse from the end of t's second (cronsim truncates microseconds, and steps one second back
        # from a whole second).
        start = (t + _US).astimezone(self.zone)
        for local in itertools.islice(CronSim(self.cron, start, reverse=True), _MAX_STEPS):  # type: ignore[arg-type]
            tick = local.astimezone(UTC)
            if tick <= t:
                found = tick
                break
        if found is None:
            return None
        # Walking backwards, cronsim can step over a tick inside a repeated (fall-back) hour when it starts
        # from the second pass of that hour; walking forward never does. Finish the walk forwards.
        for tick in self._cron_forward(found):
            if tick > t:
                break
            found = tick
        return found

    def ticks_between(self, after: datetime | None, until: datetime, limit: int) -> list[datetime]:
        """The latest *limit* ticks in ``(after, until]``, oldest first (*after* None: unbounded)."""
        if limit < 1:
            return []
        top = self.latest(until)
        if top is None or (after is not None and top <= after):
            return []
        if self.every is not None:
            ticks = [top - i * self.every for i in range(limit)]
            return sorted(t for t in ticks if after is None or t > after)
        # Find where the latest `limit` ticks begin by walking back, then list them walking forward.
        back = [top]
        while len(back) < limit:
            previous = self.latest(back[-1] - _US)
            if previous is None or (after is not None and previous <= after):
                break
            back.append(previous)
        window: deque[datetime] = deque(maxlen=limit)
        if len(back) < limit and after is not None:
            begin = after  # fewer ticks than the limit: list all of (after, until]
        else:
            begin = back[-1]
            window.append(begin)
        for tick in itertools.islice(self._cron_forward(begin), _MAX_STEPS):
            if tick > until:
                break
            window.append(tick)
        return list(window)

    def due(self, now: datetime, last: datetime | None) -> list[datetime]:
        """The ticks to enqueue at *now* when the last one enqueued (or the start) was *last*: the latest
        due tick, and up to ``catch_up`` missed ticks before it; oldest first."""
        return self.ticks_between(last, now, self.catch_up + 1)

    def _every_floor(self, t: datetime) -> datetime:
        assert self.every is not None
        step = self.every // _US
        return EPOCH + timedelta(microseconds=(t - EPOCH) // _US // step * step)

    def _cron_forward(self, t: datetime) -> Iterator[datetime]:
        """Ticks strictly after *t*, in order. For a specific-time expression cronsim walks in naive local
        time, so from the second pass of a repeated hour it can return the first pass's tick, which is
        before *t*: those are dropped (cron fires a specific time once when it repeats)."""
        for local in CronSim(self.cron, t.astimezone(self.zone)):  # type: ignore[arg-type]
            tick = local.astimezone(UTC)
            if tick > t:
                yield tick


def _zone_name(tz: Any, refuse: Callable[[str], ScheduleError]) -> str:
    if tz is None or tz is UTC:
        return "UTC"
    if isinstance(tz, tzinfo):
        tz = getattr(tz, "key", None) or getattr(tz, "zone", None) or str(tz)  # zoneinfo, pytz
    if not isinstance(tz, str):
        raise refuse(f"tz must be an IANA time zone name like 'Europe/Paris', got {tz!r}")
    try:
        return ZoneInfo(tz).key
    except (ZoneInfoNotFoundError, ValueError):
        raise refuse(f"unknown time zone {tz!r} (give an IANA name like 'Europe/Paris')") from None


def _duration(delta: timedelta) -> str:
    seconds = delta.total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


# --- defining schedules on an App ----------------------------------------------------------------------


def add(
    app: App,
    task: Task | str,
    *,
    cron: str | None = None,
    every: timedelta | float | None = None,
    tz: Any = None,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    name: str | None = None,
    catch_up: int = 0,
    options: Mapping[str, Any] | None = None,
) -> Schedule:
    """Register a schedule on *app* (see :meth:`pgq.App.add_periodic`)."""
    task_name = task.name if isinstance(task, Task) else task
    schedule = Schedule(
        name=task_name if name is None else name, task_name=task_name, cron=cron, every=every,  # type: ignore[arg-type]
        tz=tz, args=args, kwargs=kwargs or {}, options=options or {}, catch_up=catch_up,
    )
    existing = app.schedules.get(schedule.name)
    if existing is not None and existing != schedule:
        raise ScheduleError(f"a different periodic schedule is already registered as {schedule.name!r}; "
                            "give this one its own name=")
    app.schedules[schedule.name] = schedule
    return schedule


def decorator(app: App, **when: Any) -> Callable[[Task], Task]:
    """``@app.periodic(...)`` above ``@app.task``: registers the schedule, returns the task unchanged."""

    def register(task: Task) -> Task:
        if not isinstance(task, Task):
            raise ScheduleError(f"@app.periodic goes above @app.task (it schedules a registered task), got "
                                f"{getattr(task, '__name__', task)!r}")
        add(app, task, **when)
        return task

    return register


def add_beat_schedule(app: App, entries: Mapping[str, Mapping[str, Any]]) -> list[Schedule]:
    """Celery's ``beat_schedule`` dict: ``{name: {"task": …, "schedule": …, "args": …, "kwargs": …,
    "options": {…}}}``, plus pgq's ``tz`` and ``catch_up``. ``schedule`` is a timedelta or seconds
    (``every``), a cron string, or a Celery ``crontab``/``schedule`` object (read, not imported)."""
    added = []
    for name, entry in entries.items():
        if not isinstance(entry, Mapping):
            raise ScheduleError(f"beat schedule entry {name!r} must be a dict, got {type(entry).__name__}")
        unknown = sorted(set(entry) - set(BEAT_KEYS))
        missing = [key for key in ("task", "schedule") if key not in entry]
        if unknown or missing:
            problem = (f"unknown key(s) {', '.join(unknown)}" if unknown else f"missing {' and '.join(missing)}")
            raise ScheduleError(f"beat schedule entry {name!r}: {problem} (keys: {', '.join(BEAT_KEYS)})")
        cron, every, tz = _celery_schedule(name, entry["schedule"])
        added.append(add(app, entry["task"], cron=cron, every=every, tz=entry.get("tz", tz), name=name,
                         args=entry.get("args") or (), kwargs=entry.get("kwargs"),
                         catch_up=entry.get("catch_up", 0), options=entry.get("options")))
    return added


def _celery_schedule(name: str, when: Any) -> tuple[str | None, Any, Any]:
    """(cron, every, tz) from a beat entry's ``schedule``."""
    if isinstance(when, str):
        return when, None, None
    if isinstance(when, timedelta) or (isinstance(when, (int, float)) and not isinstance(when, bool)):
        return None, when, None
    if hasattr(when, "_orig_minute"):  # celery.schedules.crontab
        fields = [getattr(when, f"_orig_{part}") for part in
                  ("minute", "hour", "day_of_month", "month_of_year", "day_of_week")]
        return " ".join(_cron_field(f) for f in fields), None, getattr(when, "tz", None)
    if isinstance(getattr(when, "run_every", None), timedelta):  # celery.schedules.schedule
        return None, when.run_every, None
    raise ScheduleError(f"beat schedule entry {name!r}: schedule must be a timedelta, seconds, a cron string "
                        f"or a Celery crontab, got {type(when).__name__}")


def _cron_field(value: Any) -> str:
    if value is None:
        return "*"
    if isinstance(value, (set, frozenset, list, tuple)):
        return ",".join(str(v) for v in sorted(value))
    return str(value)


# --- the scheduler service -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Fired:
    """One tick this scheduler enqueued."""

    schedule: str
    tick: datetime
    job_id: int


class Scheduler:
    """Enqueues the due ticks of ``app.schedules``; run as many as you like, each tick is enqueued once.

    Settings:

    - ``max_interval``: the longest sleep between two looks at the schedules, in seconds. The loop sleeps
      until the next tick, so this only bounds how long a clock step on the database goes unnoticed.
      Default 5 s.
    - ``keep_ticks``: how long tick rows are kept after they were enqueued (``pgq periodic list`` and audits
      read them); the latest of each schedule is always kept. Default one day.
    """

    def __init__(
        self,
        app: App,
        *,
        max_interval: float = 5.0,
        keep_ticks: timedelta = KEEP_TICKS,
        prune_interval: float = PRUNE_INTERVAL,
        scheduler_id: str | None = None,
    ):
        self.app = app
        self.max_interval = max_interval
        self.keep_ticks = keep_ticks
        self.prune_interval = prune_interval
        self.id = scheduler_id or f"{db.hostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.lost = 0  # ticks another scheduler enqueued first (the race this design makes harmless)
        self.error: BaseException | None = None
        self._since: dict[str, datetime] = {}
        self._stop = threading.Event()
        self._conn: psycopg.Connection | None = None
        self._next_tick: datetime | None = None
        self._db_now: datetime | None = None
        self._read_at = 0.0
        self._last_prune: float | None = None

    def __repr__(self) -> str:
        return f"<pgq.Scheduler {self.id} schedules={len(self.app.schedules)}>"

    # --- one pass ------------------------------------------------------------------------------

    def run_once(self) -> list[Fired]:
        """Enqueue every due tick now (on the database clock); return what this scheduler enqueued."""
        schedules = list(self.app.schedules.values())
        if not schedules:
            self._next_tick = None
            return []
        conn = self._connection()
        read_at = time.monotonic()  # before the query: now() is taken after it, so we never wake early
        rows = conn.execute(sql.PERIODIC_LAST_TICKS, {"names": [s.name for s in schedules]}).fetchall()
        now = rows[0][0].astimezone(UTC)
        last = {name: (None if tick is None else tick.astimezone(UTC)) for _, name, tick in rows}
        fired: list[Fired] = []
        for schedule in schedules:
            # A schedule never fired starts when this scheduler first saw it: earlier ticks are not missed.
            since = last.get(schedule.name) or self._since.setdefault(schedule.name, now)
            due = schedule.due(now, since)
            if not due:
                continue
            try:
                fired += self._fire(conn, schedule, due)
            except EnqueueError as exc:
                log.error("periodic %s: cannot enqueue %s: %s", schedule.name, schedule.task_name, exc)
        self._db_now, self._read_at = now, read_at
        self._next_tick = min(s.next_after(now) for s in schedules)
        self._maybe_prune(conn)
        return fired

    def _fire(self, conn: psycopg.Connection, schedule: Schedule, ticks: list[datetime]) -> list[Fired]:
        spec = schedule.job_spec(self.app)
        fired = []
        with conn.transaction():
            rows = conn.execute(sql.PERIODIC_CLAIM_TICKS, {
                "schedule": schedule.name, "ticks": ticks, "task_name": spec.task_name, "enqueued_by": self.id,
            }).fetchall()
            for tick in sorted(row[0].astimezone(UTC) for row in rows):
                row = conn.execute(sql.PERIODIC_ENQUEUE, {**spec.params(), "schedule": schedule.name,
                                                         "tick_at": tick}).fetchone()
                assert row is not None
                fired.append(Fired(schedule.name, tick, int(row[0])))
        metrics.enqueued(spec.task_name, spec.queue, len(fired))
        for f in fired:
            log.info("periodic %s: tick %s enqueued as job %d (%s)", f.schedule, _iso(f.tick, schedule.zone),
                     f.job_id, spec.task_name)
        lost = len(ticks) - len(fired)
        if lost:
            self.lost += lost
            log.debug("periodic %s: %d due tick(s) already enqueued by another scheduler", schedule.name, lost)
        return fired

    def _maybe_prune(self, conn: psycopg.Connection) -> None:
        if self._last_prune is not None and time.monotonic() - self._last_prune < self.prune_interval:
            return
        self._last_prune = time.monotonic()
        pruned = conn.execute(sql.PERIODIC_PRUNE, {"keep": self.keep_ticks.total_seconds(),
                                                   "limit": PRUNE_BATCH}).rowcount
        if pruned:
            log.debug("pruned %d old tick row(s)", pruned)

    def sleep_time(self) -> float:
        """Seconds until the next tick of any schedule (by the database clock, as of the last pass), 5 ms
        past it so the database's now() has reached it, and never more than ``max_interval``."""
        if self._next_tick is None or self._db_now is None:
            return self.max_interval
        elapsed = time.monotonic() - self._read_at
        remaining = (self._next_tick - self._db_now).total_seconds() - elapsed + 0.005
        return min(max(remaining, 0.0), self.max_interval)

    # --- lifecycle -----------------------------------------------------------------------------

    def run(self, *, install_signals: bool = True) -> None:
        """Run the loop until stop() or SIGTERM/SIGINT."""
        with db.connect(self.app.database_url, role="scheduler", autocommit=True) as conn:
            migrate.check(conn)
        if install_signals and threading.current_thread() is threading.main_thread():
            def handler(signum: int, frame: Any) -> None:
                log.info("%s received: scheduler stopping", signal.Signals(signum).name)
                self.stop()

            signal.signal(signal.SIGTERM, handler)
            signal.signal(signal.SIGINT, handler)
        log.info("scheduler %s started: %s", self.id,
                 ", ".join(f"{s.name} ({s.describe()})" for s in self.app.schedules.values()) or "no schedules")
        try:
            self.loop()
        finally:
            self._close()
            log.info("scheduler %s stopped", self.id)

    def loop(self) -> None:
        """run_once, then sleep until the next tick (or a stop); survive a lost database."""
        backoff = db.Reconnect(log)
        while not self._stop.is_set():
            try:
                self.run_once()
                backoff.reset()
            except (psycopg.OperationalError, DatabaseUnavailable) as exc:
                self._close()
                backoff.wait(self._stop, "scheduler", exc)
                continue
            except psycopg.Error as exc:  # not an outage (a missing grant…): loud, but keep scheduling
                self._close()
                backoff.failed(self._stop, "scheduler", exc)
                continue
            self._stop.wait(self.sleep_time())

    def start(self) -> threading.Thread:
        """Run in a daemon thread (next to a worker); a crash is logged and kept in ``self.error``."""

        def target() -> None:
            try:
                self.run(install_signals=False)
            except BaseException as exc:
                self.error = exc
                log.error("scheduler %s stopped by an error: %s", self.id, error_line(exc))

        thread = threading.Thread(target=target, name="pgq-beat", daemon=True)
        thread.start()
        return thread

    @contextmanager
    def running(self) -> Iterator[Scheduler]:
        """Run in a background thread for the duration of a ``with`` block (examples, tests)."""
        thread = self.start()
        try:
            yield self
        finally:
            self.stop()
            thread.join()
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        """Close the scheduler's connection (run() does it on its way out; callers of run_once() do)."""
        self._close()

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = db.connect(self.app.database_url, role="scheduler", autocommit=True)
        return self._conn

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


# --- what `pgq periodic list` shows ----------------------------------------------------------------------


@dataclass(frozen=True)
class ScheduleStatus:
    """A schedule as the database knows it: when it fires next, and the last tick enqueued."""

    name: str
    task_name: str
    when: str  # Schedule.describe(), or "(not in this app)" for a schedule only the database knows
    zone: ZoneInfo
    next_fire: datetime | None
    last_tick: datetime | None
    last_job_id: int | None
    last_job_status: str | None
    enqueued_by: str | None


def overview(conn: psycopg.Connection, schedules: Sequence[Schedule]) -> tuple[datetime, list[ScheduleStatus]]:
    """The database's now, and every schedule of *schedules* or of the tick table, by name."""
    now = conn.execute(sql.DB_NOW).fetchone()[0].astimezone(UTC)  # type: ignore[index]
    latest = {row[0]: row for row in conn.execute(sql.PERIODIC_LIST).fetchall()}
    out = []
    for schedule in schedules:
        row = latest.get(schedule.name)
        out.append(ScheduleStatus(
            schedule.name, schedule.task_name, schedule.describe(), schedule.zone, schedule.next_after(now),
            *_last(row)))
    known = {s.name for s in schedules}
    for name, row in latest.items():
        if name not in known:
            out.append(ScheduleStatus(name, row[1], "(not in this app)", ZoneInfo("UTC"), None, *_last(row)))
    return now, sorted(out, key=lambda s: s.name)


def _last(row: tuple | None) -> tuple:
    if row is None:
        return None, None, None, None
    return row[2].astimezone(UTC), row[3], row[4], row[5]


def _iso(t: datetime, zone: tzinfo) -> str:
    return t.astimezone(zone).isoformat(sep=" ", timespec="seconds")

