"""Turning a call into a job row: validation (before anything is written) and the insert, on pgq's own
connection or inside the caller's transaction."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg import generators, pq

from . import metrics, serialization, sql
from .errors import EnqueueError

QUEUE_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,100}$")
MAX_TASK_NAME = 200
PRIORITY_RANGE = (-32768, 32767)  # the column is a smallint; higher runs first
DEFAULT_MAX_PAYLOAD = 1024 * 1024
MAX_UNIQUE_KEY_BYTES = 1000  # a btree entry holds at most ~2700 bytes; long keys should be hashed
UNIQUE_TRIES = 10  # see write()


def max_payload_bytes() -> int:
    """Arguments larger than this are refused at enqueue (``PGQ_MAX_PAYLOAD_BYTES``, default 1 MiB):
    large payloads belong in object storage, with their key in the job."""
    return int(os.environ.get("PGQ_MAX_PAYLOAD_BYTES", DEFAULT_MAX_PAYLOAD))


@dataclass(frozen=True)
class JobSpec:
    """A validated job, ready to insert."""

    task_name: str
    queue: str
    args: str  # JSON text
    kwargs: str  # JSON text
    priority: int
    max_attempts: int
    retry_backoff: float
    lease_seconds: int
    ignore_result: bool
    eta: datetime | None
    countdown: float | None
    unique_key: str | None = None  # while a job with this key waits or runs, enqueueing returns that job
    unique_for: float | None = None  # seconds a finished job keeps its key taken (None: only while unfinished)
    concurrency_key: str | None = None  # at most key_concurrency running jobs with this key (see pgq.limits)
    key_concurrency: int | None = None

    def params(self) -> dict[str, Any]:
        return {
            "task_name": self.task_name,
            "queue": self.queue,
            "args": self.args,
            "kwargs": self.kwargs,
            "priority": self.priority,
            "max_attempts": self.max_attempts,
            "retry_backoff": self.retry_backoff,
            "lease_seconds": self.lease_seconds,
            "ignore_result": self.ignore_result,
            "eta": self.eta,
            "countdown": self.countdown,
            "unique_key": self.unique_key,
            "unique_for": self.unique_for,
            "concurrency_key": self.concurrency_key,
            "key_concurrency": self.key_concurrency,
        }


def build(
    task_name: Any,
    *,
    args: Any = (),
    kwargs: Any = None,
    queue: Any = "default",
    priority: Any = 0,
    max_attempts: Any = 3,
    retry_backoff: Any = 2.0,
    lease_seconds: Any = 30,
    ignore_result: bool = False,
    eta: Any = None,
    countdown: Any = None,
    unique_key: Any = None,
    unique_for: Any = None,
    concurrency_key: Any = None,
    key_concurrency: Any = None,
) -> JobSpec:
    """Validate everything about a job; raise EnqueueError naming the task and the problem."""
    if not isinstance(task_name, str) or not task_name.strip():
        raise EnqueueError(f"task name must be a non-empty string, got {task_name!r}")
    if len(task_name) > MAX_TASK_NAME:
        raise EnqueueError(f"task name {task_name[:40]!r}… is longer than {MAX_TASK_NAME} characters")
    problem = text_key_problem(task_name, "task name")  # NUL, lone surrogates: a text parameter cannot carry them
    if problem:
        raise EnqueueError(problem)

    def refuse(problem: str) -> EnqueueError:
        return EnqueueError(f"cannot enqueue {task_name}: {problem}")

    if not isinstance(queue, str) or not QUEUE_NAME.match(queue):
        raise refuse(f"queue name {queue!r} must be 1-100 characters of letters, digits, '_', '.', ':' or '-'")
    args_json, kwargs_json = arguments_json(task_name, args, kwargs)

    if isinstance(priority, bool) or not isinstance(priority, int) or not (
        PRIORITY_RANGE[0] <= priority <= PRIORITY_RANGE[1]
    ):
        raise refuse(f"priority must be an integer from {PRIORITY_RANGE[0]} to {PRIORITY_RANGE[1]}, got {priority!r}")
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
        raise refuse(f"max_attempts must be an integer >= 1, got {max_attempts!r}")
    if isinstance(lease_seconds, bool) or not isinstance(lease_seconds, int) or lease_seconds < 1:
        raise refuse(f"lease_seconds must be an integer >= 1, got {lease_seconds!r}")
    if not _finite_number(retry_backoff) or retry_backoff < 0:
        raise refuse(f"retry_backoff must be a number >= 0, got {retry_backoff!r}")

    if eta is not None and countdown is not None:
        raise refuse("give eta or countdown, not both")
    if eta is not None:
        if not isinstance(eta, datetime):
            raise refuse(f"eta must be a datetime, got {type(eta).__name__}")
        if eta.tzinfo is None or eta.utcoffset() is None:
            raise refuse(
                "eta is a naive datetime; pass a timezone-aware one (e.g. datetime.now(timezone.utc) + delta), "
                "because a naive time means different instants on different machines"
            )
    if countdown is not None and (not _finite_number(countdown) or countdown < 0):
        raise refuse(f"countdown must be a number of seconds >= 0, got {countdown!r}")
    if unique_key is not None:
        problem = unique_key_problem(unique_key)
        if problem:
            raise refuse(problem)
    try:
        unique_seconds = unique_for_seconds(unique_for)
    except ValueError as exc:
        raise refuse(str(exc)) from None
    if unique_seconds is not None and unique_key is None:
        raise refuse("unique_for needs a unique key: pass unique_key=, or register the task with unique=True or "
                     "unique_key=")
    try:
        key_limit = concurrency_limit(concurrency_key, key_concurrency)
    except ValueError as exc:
        raise refuse(str(exc)) from None

    return JobSpec(
        task_name=task_name,
        queue=queue,
        args=args_json,
        kwargs=kwargs_json,
        priority=priority,
        max_attempts=max_attempts,
        retry_backoff=float(retry_backoff),
        lease_seconds=lease_seconds,
        ignore_result=bool(ignore_result),
        eta=eta,
        countdown=None if countdown is None else float(countdown),
        unique_key=unique_key,
        unique_for=unique_seconds,
        concurrency_key=concurrency_key,
        key_concurrency=key_limit,
    )


def arguments_json(task_name: str, args: Any, kwargs: Any, limit: int | None = None) -> tuple[str, str]:
    """*args* and *kwargs* as JSON texts, or EnqueueError naming the task and the problem. *limit*: the
    payload limit in bytes, max_payload_bytes() unless given (a bulk enqueue reads it once)."""
    if isinstance(args, (str, bytes)) or not isinstance(args, Sequence):
        raise EnqueueError(f"cannot enqueue {task_name}: args must be a list or tuple, got {type(args).__name__}")
    kwargs = {} if kwargs is None else kwargs
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        raise EnqueueError(f"cannot enqueue {task_name}: kwargs must be a dict with string keys")
    args_json = "[]" if not args else serialization.dumps(list(args), what=f"an argument of {task_name}")
    kwargs_json = "{}" if not kwargs else serialization.dumps(dict(kwargs), what=f"a keyword argument of {task_name}")
    limit = max_payload_bytes() if limit is None else limit
    if 4 * (len(args_json) + len(kwargs_json)) > limit:  # UTF-8 takes at most 4 bytes a character
        size = len(args_json.encode()) + len(kwargs_json.encode())
        if size > limit:
            raise EnqueueError(f"cannot enqueue {task_name}: arguments take {size} bytes as JSON, over the limit "
                               f"of {limit} bytes")
    return args_json, kwargs_json


def with_arguments(base: JobSpec, args: Any, kwargs: Any) -> JobSpec:
    """*base* (options validated by build(), no unique key) with these arguments, checked as build() checks
    them. For ``delay()``: a task's options are validated once, not at every call (building the whole
    spec was 45 of a delay()'s 138 us of CPU, in a loop that also waited on the database)."""
    spec = copy.copy(base)
    args_json, kwargs_json = arguments_json(base.task_name, args, kwargs)
    object.__setattr__(spec, "args", args_json)  # a fresh copy of a frozen spec; nothing else sees it yet
    object.__setattr__(spec, "kwargs", kwargs_json)
    return spec


def bulk_job(index: int, base: JobSpec, args: Any, kwargs: Any, limit: int) -> str:
    """One job of a bulk enqueue as JSON text, ``[index of its base, args, kwargs]``: *base* (options
    already validated) with these arguments, checked as for a single enqueue; *limit* is
    max_payload_bytes(), read once per bulk enqueue."""
    args_json, kwargs_json = arguments_json(base.task_name, args, kwargs, limit)
    return f"[{index},{args_json},{kwargs_json}]"


def with_concurrency_key(job: str, base: JobSpec, concurrency_key: Any, key_concurrency: Any) -> str:
    """A bulk_job() with its own concurrency key (its task computes the key from the arguments):
    ``[index, args, kwargs, key, key_concurrency]``."""
    try:
        limit = concurrency_limit(concurrency_key, key_concurrency)
    except ValueError as exc:
        raise EnqueueError(f"cannot enqueue {base.task_name}: {exc}") from None
    return f"{job[:-1]},{serialization.dumps(concurrency_key, what='concurrency_key')},{limit}]"


def concurrency_limit(concurrency_key: Any, key_concurrency: Any) -> int | None:
    """The key_concurrency a job with *concurrency_key* gets (1 unless given), None without a key;
    ValueError when either is wrong."""
    from .limits import check_concurrency

    if concurrency_key is None:
        if key_concurrency is not None:
            raise ValueError("key_concurrency needs a concurrency_key (pass concurrency_key=, or give the task one)")
        return None
    problem = text_key_problem(concurrency_key, "concurrency_key")
    if problem:
        raise ValueError(problem)
    return 1 if key_concurrency is None else check_concurrency(key_concurrency, "key_concurrency")


#: Jobs per INSERT in a bulk enqueue: large enough to amortize the round trip, small enough that one
#: statement's arrays stay a few MB.
BULK_CHUNK = 5000


def insert_many(connection: Any, bases: Sequence[JobSpec], jobs: Sequence[str]) -> list[int]:
    """Insert *jobs* (bulk_job() texts, each naming its entry of *bases*; no unique keys) with one
    statement per BULK_CHUNK jobs, inside the caller's transaction; returns the ids in the order of *jobs*.

    Each statement takes two parameters, the jobs and their bases as JSON documents, which PostgreSQL
    takes apart (jsonb_array_elements): a job costs the producer one f-string, where thirteen parallel
    arrays, one per column, cost psycopg's array dumper about 20 us per job, half the time of a bulk
    enqueue of 20,000 jobs (cProfile)."""
    base_json = json.dumps([{
        "i": i, "queue": b.queue, "task_name": b.task_name, "priority": b.priority, "max_attempts": b.max_attempts,
        "retry_backoff": b.retry_backoff, "lease_seconds": b.lease_seconds, "ignore_result": b.ignore_result,
        "eta": None if b.eta is None else b.eta.isoformat(), "countdown": b.countdown,
        "concurrency_key": b.concurrency_key, "key_concurrency": b.key_concurrency,
    } for i, b in enumerate(bases)], ensure_ascii=False)
    ids: list[int] = []
    for start in range(0, len(jobs), BULK_CHUNK):
        chunk = "[" + ",".join(jobs[start:start + BULK_CHUNK]) + "]"
        ids.extend(row[0] for row in execute(connection, sql.ENQUEUE_MANY, {"jobs": chunk, "bases": base_json}))
    metrics.enqueued_many(bases, jobs)
    return ids


def unique_key_problem(key: Any) -> str | None:
    """Why *key* cannot be a unique key, or None if it can."""
    return text_key_problem(key, "unique_key")


def text_key_problem(key: Any, option: str) -> str | None:
    """Why *key* cannot be an indexed key (``unique_key``, ``concurrency_key``), or None if it can."""
    if not isinstance(key, str) or not key:
        return f"{option} must be a non-empty string, got {key!r}"
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        return f"{option} cannot contain lone surrogates (PostgreSQL text is UTF-8)"
    if "\x00" in key:
        return f"{option} cannot contain the NUL character (PostgreSQL text cannot store it)"
    if size > MAX_UNIQUE_KEY_BYTES:
        return (f"{option} is {size} bytes as UTF-8, over the limit of {MAX_UNIQUE_KEY_BYTES}; hash a long key "
                "(e.g. hashlib.sha256(key.encode()).hexdigest())")
    return None


def unique_for_seconds(value: Any) -> float | None:
    """``unique_for`` (a timedelta or a number of seconds >= 0) in seconds; None stays None."""
    if value is None:
        return None
    seconds = value.total_seconds() if isinstance(value, timedelta) else value
    if not _finite_number(seconds) or seconds < 0:
        raise ValueError(f"unique_for must be a timedelta or a number of seconds >= 0, got {value!r}")
    return float(seconds)


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def insert(connection: Any, spec: JobSpec) -> int:
    """Insert *spec* through the caller's connection, inside whatever transaction it has open.
    Nothing is committed here: the job exists only if the caller commits."""
    if spec.unique_key is not None:
        return write(connection, spec)[0]
    job_id = int(execute(connection, sql.ENQUEUE, spec.params())[0][0])
    metrics.enqueued(spec.task_name, spec.queue)
    return job_id


class PreparedEnqueue:
    """sql.ENQUEUE on pgq's own pooled connections, sent straight through libpq as a named prepared
    statement whose parameters are rendered as text here.

    psycopg's ``execute()`` builds a cursor, a transformer, a dumper per parameter, a prepared-statement
    cache entry and a row maker on every call: 81-95 us of the producer thread's CPU per enqueue against
    49-61 us this way, on one connection. In ``delay()`` (A/B in one process, medians of 5 runs of 3,000):
    136 -> 113 us of CPU and 432 -> 419 us of wall time; most of a delay() is the server's, which
    benchmarks/enqueue_anatomy.py takes apart. build() has refused what text parameters cannot carry
    (NUL characters, lone surrogates) before this runs. Used only where every fact is known:
    pgq's own autocommit connections with prepared statements on (not with PGQ_PREPARE=0, pgq's sign of a
    transaction pooler that cannot keep them) and UTF-8. Every other connection, the user's own included,
    goes through psycopg. Errors are psycopg's own exception classes, built from the server's result.
    """

    NAME = ("pgq_enqueue_" + hashlib.sha256(sql.ENQUEUE.encode()).hexdigest()[:12]).encode()

    def __init__(self) -> None:
        names: list[str] = []

        def number(match: re.Match[str]) -> str:
            if match.group(1) not in names:
                names.append(match.group(1))
            return f"${names.index(match.group(1)) + 1}"

        self._query = re.sub(r"%\((\w+)\)s", number, sql.ENQUEUE).encode()
        self._names = tuple(names)
        self._ready: weakref.WeakSet[psycopg.Connection] = weakref.WeakSet()  # connections it is prepared on

    def usable(self, conn: Any) -> bool:
        return (isinstance(conn, psycopg.Connection) and conn.autocommit and conn.prepare_threshold is not None
                and conn.info.encoding == "utf-8")

    def insert(self, conn: Any, spec: JobSpec) -> int:
        """Insert *spec* (no unique key) through *conn*, committed on return (autocommit)."""
        if spec.unique_key is not None or not self.usable(conn):
            return insert(conn, spec)
        params = spec.params()
        values = [_text(params[name]) for name in self._names]
        for attempt in (1, 2):
            with conn.lock:
                if conn not in self._ready:
                    conn.pgconn.send_prepare(self.NAME, self._query)
                    prepared = conn.wait(generators.execute(conn.pgconn))[-1]
                    if prepared.status != pq.ExecStatus.COMMAND_OK and _sqlstate(prepared) != "42P05":
                        raise psycopg.errors.error_from_result(prepared, encoding="utf-8")
                    self._ready.add(conn)  # prepared now, or already (42P05: duplicate_prepared_statement)
                conn.pgconn.send_query_prepared(self.NAME, values)
                result = conn.wait(generators.execute(conn.pgconn))[-1]
            if result.status == pq.ExecStatus.TUPLES_OK:
                metrics.enqueued(spec.task_name, spec.queue)
                return int(result.get_value(0, 0))  # type: ignore[arg-type]
            if attempt == 1 and _sqlstate(result) == "26000":  # invalid_sql_statement_name: DEALLOCATE ran
                self._ready.discard(conn)
                continue
            raise psycopg.errors.error_from_result(result, encoding="utf-8")
        raise AssertionError("unreachable")  # pragma: no cover


def _sqlstate(result: pq.abc.PGresult) -> str | None:
    value = result.error_field(pq.DiagnosticField.SQLSTATE)
    return None if value is None else value.decode()


def _text(value: Any) -> bytes | None:
    """A JobSpec value in PostgreSQL's text format (see PreparedEnqueue)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return b"t" if value else b"f"
    if isinstance(value, float):
        return repr(value).encode()  # the shortest text that reads back as the same double
    if isinstance(value, datetime):
        return value.isoformat().encode()  # build() admits only timezone-aware ones
    return str(value).encode()


def write(connection: Any, spec: JobSpec) -> tuple[int, bool]:
    """Like insert(), and says whether a job was inserted: (job id, True), or (the id of the job that
    holds *spec*'s unique key, False).

    The partial unique index ``jobs_unique_key_idx`` is what guarantees one waiting-or-running job per
    key: ENQUEUE_UNIQUE inserts with ON CONFLICT DO NOTHING, and a concurrent producer's insert of the
    same key waits for ours to commit or roll back. When its snapshot predates the winner's commit it
    finds neither an existing job nor room to insert, and returns nothing; the statement then runs again
    (in READ COMMITTED each run sees what committed before it), at most UNIQUE_TRIES times.

    ``unique_for`` also covers finished jobs, which the index cannot see. So producers that give it first
    take a transaction-scoped advisory lock on the key (UNIQUE_LOCK), released at commit or rollback:
    one at a time per key, each one's lookup runs after the previous one committed, so it sees that
    job whether it is still waiting or already finished. A transaction-scoped lock needs no table or
    cleanup, cannot outlive a rolled-back enqueue, and works through PgBouncer in transaction mode.
    """
    if spec.unique_key is None:
        return insert(connection, spec), True
    if isinstance(connection, psycopg.Connection) and connection.autocommit:
        with connection.transaction():  # the lock must last until the insert commits
            return _write_unique(connection, spec)
    return _write_unique(connection, spec)


def _write_unique(connection: Any, spec: JobSpec) -> tuple[int, bool]:
    params = spec.params()
    if spec.unique_for is not None:
        execute(connection, sql.UNIQUE_LOCK, {"unique_key": spec.unique_key})
    for _ in range(UNIQUE_TRIES):
        rows = execute(connection, sql.ENQUEUE_UNIQUE, params)
        if rows:
            if rows[0][1]:  # inserted, not the existing job's id
                metrics.enqueued(spec.task_name, spec.queue)
            return int(rows[0][0]), bool(rows[0][1])
    raise EnqueueError(f"cannot enqueue {spec.task_name}: the job holding unique key {spec.unique_key!r} kept "
                       f"finishing and being replaced while this enqueue ran ({UNIQUE_TRIES} tries)")


def execute(connection: Any, statement: str, params: Mapping[str, Any]) -> list[tuple]:
    """Run one statement on a psycopg Connection, a SQLAlchemy Connection or a SQLAlchemy Session.

    SQLAlchemy goes through ``exec_driver_sql`` so its own transaction bookkeeping sees the statement
    (autobegin), and the statement reaches the driver untouched: psycopg 3 and psycopg2 both take
    ``%(name)s`` parameters.
    """
    if isinstance(connection, psycopg.Connection):
        return connection.execute(statement, params).fetchall()
    sa_conn = _sqlalchemy_connection(connection)
    if sa_conn is not None:
        return list(sa_conn.exec_driver_sql(statement, dict(params)).fetchall())
    raise TypeError(
        "connection= takes a psycopg Connection, a SQLAlchemy Connection or a SQLAlchemy Session, "
        f"got {type(connection).__name__}"
    )


def _sqlalchemy_connection(obj: Any) -> Any:
    try:
        from sqlalchemy.engine import Connection
        from sqlalchemy.orm import Session
    except ImportError:  # pragma: no cover - sqlalchemy is a dependency
        return None
    if isinstance(obj, Session):
        return obj.connection()
    if isinstance(obj, Connection):
        return obj
    return None
