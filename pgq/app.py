"""The public facade: an App holds the database location and the task registry."""

from __future__ import annotations

import atexit
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar, overload

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool

from . import control, db, embedded, enqueue, limits, migrate
from .errors import EnqueueError, JobNotFound
from .result import AsyncResult
from .tasks import Signature, Task

if TYPE_CHECKING:
    from .periodic import Schedule, Scheduler
    from .worker import Worker

T = TypeVar("T")


class App:
    """A pgq application.

    The database is found, in order: the *database_url* argument, ``PGQ_DATABASE_URL``,
    ``DATABASE_URL``, and else the embedded PostgreSQL (started on first use, announced on stderr).
    Nothing connects until the first enqueue, ``get()``, migration or worker.
    """

    def __init__(self, database_url: str | None = None, *, pool_size: int = 4):
        self._configured_url = database_url
        self._url: str | None = None
        self._pool: ConnectionPool | None = None
        self._pool_size = pool_size
        self._lock = threading.RLock()
        self._enqueue_statement = enqueue.PreparedEnqueue()  # delay()'s INSERT on the pool's connections
        self.tasks: dict[str, Task] = {}
        self.schedules: dict[str, Schedule] = {}  # periodic schedules by name (see add_periodic)
        self.queues: dict[str, limits.Limit] = {}  # queue limits by queue name (see queue())

    def __repr__(self) -> str:
        return f"<pgq.App tasks={len(self.tasks)}>"

    # --- the database --------------------------------------------------------------------------

    @property
    def database_url(self) -> str:
        if self._url is None:
            with self._lock:
                if self._url is None:
                    self._url = db.configured_url(self._configured_url) or embedded.start()
        return self._url

    def set_database_url(self, database_url: str) -> None:
        """Point the app at another database (the CLI's --database-url wins over the app's own)."""
        self.close()
        with self._lock:
            self._configured_url = database_url
            self._url = None

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection]:
        """A connection from pgq's own small pool; its transaction commits when the block exits."""
        with self._pooled() as conn:
            conn.autocommit = False
            try:
                yield conn
                if not conn.closed and conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                    conn.commit()
            finally:
                if not conn.closed:
                    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                        conn.rollback()
                    conn.autocommit = True  # how pgq's own statements use the pool

    @contextmanager
    def _pooled(self) -> Iterator[psycopg.Connection]:
        """A connection of pgq's pool of autocommit connections (opened on first use), returned after the
        block. getconn/putconn, not the pool's connection(): that one also enters the connection's own
        context, whose commit on exit is a no-op in autocommit mode. run() around one INSERT added 25 us of
        wall time with it and 11 us without (medians of 5 runs of 3,000)."""
        pool = self._pool
        if pool is None:
            with self._lock:
                if self._pool is None:
                    self._pool = self._open_pool()
                pool = self._pool
        conn = pool.getconn()
        try:
            yield conn
        finally:
            pool.putconn(conn)  # the pool rolls back a transaction left open, and drops a broken connection

    def run(self, work: Callable[[psycopg.Connection], T], *, transaction: bool = False,
            idempotent: bool = False) -> T:
        """Run *work* on pgq's own pool and commit it before returning.

        By default the connection is in autocommit mode: a single statement (an enqueue) costs one
        round trip instead of three (BEGIN, INSERT, COMMIT: 1,500 enqueues/s from one thread here,
        against about 2,400 in autocommit). ``transaction=True`` wraps several statements in one.

        Pooled connections can be dead without the pool knowing (the server restarted, backends were
        terminated); checking each one before use would cost a round trip per enqueue. So when *work*
        fails on a dead connection, the pool drops its dead connections and *work* runs once more —
        but only when it cannot have taken effect: *idempotent* work (a read) always; a transaction
        that failed before its COMMIT; a single autocommit statement only when the server said it
        was shutting the session down (SQLSTATE class 57P) or the connection was closed before the
        statement was sent. Anything else is raised: the statement may have been executed.
        """
        for attempt in (1, 2):
            with self._pooled() as conn:
                retry_safe = False
                try:
                    if not transaction:
                        return work(conn)
                    with conn.transaction():
                        try:
                            return work(conn)
                        except psycopg.OperationalError:
                            retry_safe = True  # failed before COMMIT was sent
                            raise
                except psycopg.OperationalError as exc:
                    retry_safe = retry_safe or idempotent or _not_executed(exc)
                    if attempt == 2 or not conn.broken or not retry_safe:
                        raise

            if self._pool is not None:
                self._pool.check()
        raise AssertionError("unreachable")  # pragma: no cover

    def _open_pool(self) -> ConnectionPool:
        url = self.database_url
        # Fail fast with a readable message when the database is unreachable, instead of the pool's
        # 30 s wait for a connection that never comes.
        db.connect(url, role="client").close()
        pool = ConnectionPool(
            url,
            min_size=1,
            max_size=self._pool_size,
            kwargs={"application_name": "pgq-client", "prepare_threshold": db.prepare_threshold(),
                    "autocommit": True, **db.tcp_timeouts(conninfo_to_dict(url))},
            open=True,
            name="pgq-client",
        )
        atexit.register(pool.close)
        return pool

    def close(self) -> None:
        """Close pgq's own connections (the caller's are never touched)."""
        with self._lock:
            if self._pool is not None:
                self._pool.close()
                self._pool = None

    def migrate(self) -> None:
        """Create or upgrade pgq's schema. Idempotent, and safe to run from several processes at once."""
        migrate.upgrade(self.database_url)

    # --- tasks ---------------------------------------------------------------------------------

    @overload
    def task(self, fn: Callable[..., Any], /) -> Task: ...

    @overload
    def task(self, fn: None = None, /, **options: Any) -> Callable[[Callable[..., Any]], Task]: ...

    def task(self, fn: Callable[..., Any] | None = None, /, **options: Any) -> Any:
        """Register a function as a task: ``@app.task`` or ``@app.task(name=…, queue=…, …)``.

        Options: ``name`` (default ``"<module>.<function>"``), ``queue``, ``max_attempts``,
        ``retry_backoff`` (base of the exponential backoff, seconds), ``lease_seconds``, ``priority``
        (higher runs first), ``bind`` (pass the task as ``self``), ``ignore_result``, ``timeout`` (seconds
        an attempt may run; see :meth:`pgq.Worker.enforce_timeouts`); unique jobs: ``unique=True`` (key from
        the arguments), ``unique_key`` (a string, or a function of the arguments), ``unique_for``; retry
        policy: ``retry_on``, ``discard_on``, ``autoretry_for`` (see :class:`pgq.retry.RetryPolicy`); limits
        (docs/limits.md): ``rate_limit`` (``"100/m"``; global across workers), ``rate_burst``,
        ``concurrency_key`` (a string, or a function of the arguments) and ``key_concurrency`` (at most that
        many running jobs per key; default 1).
        """

        def register(func: Callable[..., Any]) -> Task:
            name = options.pop("name", None) or f"{func.__module__}.{func.__qualname__}"
            if name in self.tasks and self.tasks[name].fn is not func:
                raise ValueError(f"a different task is already registered as {name!r}")
            task = Task(self, func, name=name, **options)
            self.tasks[name] = task
            return task

        return register(fn) if fn is not None else register

    def queue(self, name: str, *, concurrency: int | None = None, rate_limit: str | float | None = None,
              rate_burst: float | None = None) -> limits.Limit:
        """Limit a queue, across every worker on every machine: ``concurrency`` (at most that many of its
        jobs running at once), ``rate_limit`` (``"10/s"``, ``"100/m"``, ``"1000/h"``: claims per unit of
        time, a token bucket of ``rate_burst`` tokens, default 1). Workers write the app's limits to the
        database when they start (:meth:`declare_limits` does it by hand). See docs/limits.md."""
        limit = limits.queue_limit(name, concurrency, rate_limit, rate_burst)
        if name in self.queues and self.queues[name] != limit:
            raise ValueError(f"queue {name!r} is already declared with other limits ({self.queues[name].describe()})")
        self.queues[name] = limit
        return limit

    def declare_limits(self) -> list[str]:
        """Write this app's queue and task limits to the database now (workers do it when they start).
        Do it before enqueueing jobs of a newly limited task (deploy scripts): the jobs already waiting
        are marked then, but a job enqueued in that very instant may escape a new task limit once.
        Returns the limits written (unchanged ones are left alone)."""
        wanted = limits.declared(self)
        return self.run(lambda conn: limits.declare(conn, wanted))

    def send_task(
        self,
        name: str,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> AsyncResult:
        """Enqueue a task by name, without importing its function. Takes apply_async's options; the
        defaults are the registered task's when this process knows it, else pgq's."""
        task = self.tasks.get(name)
        if task is not None:
            return task.apply_async(args=args, kwargs=kwargs, **options)
        connection = options.pop("connection", None)
        spec = enqueue.build(name, args=() if args is None else args, kwargs=kwargs,
                             **{k: v for k, v in options.items() if v is not None})
        return self._enqueue(spec, connection)

    def _enqueue(self, spec: enqueue.JobSpec, connection: Any) -> AsyncResult:
        if connection is not None:
            job_id, inserted = enqueue.write(connection, spec)
        elif spec.unique_key is None:
            job_id, inserted = self.run(lambda conn: self._enqueue_statement.insert(conn, spec)), True
        else:
            job_id, inserted = self.run(lambda conn: enqueue.write(conn, spec), transaction=True)
        handle = AsyncResult(self, job_id)
        handle.deduplicated = not inserted
        return handle

    def enqueue_many(self, jobs: Iterable[Signature], *, connection: Any = None) -> list[AsyncResult]:
        """Enqueue many jobs at once: ``app.enqueue_many(add.s(i, i) for i in range(10_000))``.

        One INSERT per 5,000 jobs instead of one round trip each, in one transaction (the caller's with
        ``connection=``): all of them exist, or none. Every job is validated before anything is
        written. Options (``add.s(1, 2).set(queue="x", countdown=5)``) are validated once per distinct
        set. Unique jobs are refused here: their deduplication needs a statement per job, so use
        apply_async for them. Returns the handles in the order given.
        """
        index: dict[tuple[str, tuple[tuple[str, Any], ...]], int] = {}
        bases: list[enqueue.JobSpec] = []
        rows: list[str] = []
        limit = enqueue.max_payload_bytes()
        for sig in jobs:
            key = (sig.task.name, tuple(sorted(sig.options.items())))
            i = index.get(key)
            if i is None:
                task = sig.task
                if task.unique or task.unique_key is not None or "unique_key" in sig.options:
                    raise EnqueueError(f"cannot enqueue {task.name} in bulk: it is a unique job; use apply_async")
                options = dict(sig.options)
                if callable(task.concurrency_key) and options.get("concurrency_key") is None:
                    options.pop("key_concurrency", None)  # goes with the key each job computes, below
                i = index[key] = len(bases)
                bases.append(task._spec(**options))
            row = enqueue.bulk_job(i, bases[i], sig.args, sig.kwargs, limit)
            if callable(sig.task.concurrency_key) and sig.options.get("concurrency_key") is None:
                key_value = sig.task.concurrency_key_for(sig.args, sig.kwargs)
                if key_value is not None:
                    row = enqueue.with_concurrency_key(row, bases[i], key_value, sig.options.get("key_concurrency")
                                                       or sig.task.key_concurrency)
            rows.append(row)
        if not rows:
            return []
        if connection is not None:
            ids = enqueue.insert_many(connection, bases, rows)
        else:
            ids = self.run(lambda conn: enqueue.insert_many(conn, bases, rows), transaction=True)
        return [AsyncResult(self, job_id) for job_id in ids]

    def result(self, job_id: int) -> AsyncResult:
        """A handle for a job whose id you know (Celery's ``AsyncResult(id)``)."""
        return AsyncResult(self, job_id)

    AsyncResult = result

    # --- job control (see docs/job-control.md) ---------------------------------------------------

    def cancel(self, job_id: int) -> str:
        """Cancel a job. Returns its status afterwards: ``cancelled`` if it was waiting (it never runs);
        ``running`` if it is running: its worker learns of the request on its next heartbeat, records
        the job ``cancelled`` and interrupts the task (unless the task finished first: then its own
        outcome stands); or its final status, unchanged, if it had finished. Raises JobNotFound."""
        status = self.run(lambda conn: control.cancel(conn, [job_id]), transaction=True)[int(job_id)]
        if status is None:
            raise JobNotFound(f"no job with id {job_id}")
        return status

    def retry(self, job_id: int) -> str:
        """Run a failed or cancelled job again: back to ``queued``, due now, with its attempts reset (it
        gets its max_attempts again), its stored outcome deleted, its error history kept. Returns its
        status afterwards: ``queued``, or its status unchanged when it was not failed or cancelled (or
        another job holds its unique key). Raises JobNotFound."""
        status, _ = self.run(lambda conn: control.requeue(conn, [job_id]), transaction=True)[int(job_id)]
        if status is None:
            raise JobNotFound(f"no job with id {job_id}")
        return status

    # --- periodic tasks ------------------------------------------------------------------------

    def periodic(self, **when: Any) -> Callable[[Task], Task]:
        """Enqueue a task periodically: ``@app.periodic(cron="*/5 * * * *", tz="Europe/Paris")`` or
        ``@app.periodic(every=timedelta(seconds=30))`` above ``@app.task``. Takes add_periodic's options."""
        from . import periodic

        return periodic.decorator(self, **when)

    def add_periodic(self, task: Task | str, **when: Any) -> Schedule:
        """Enqueue *task* (a Task or a task name) periodically. Each tick is enqueued exactly once, however
        many schedulers run (``pgq beat``, ``pgq worker -B``).

        Options: ``cron`` (5 fields, or 6 with seconds first) or ``every`` (timedelta or seconds, >= 1 s),
        ``tz`` (the cron expression's time zone, default UTC), ``args``, ``kwargs``, ``name`` (unique;
        default the task name), ``catch_up`` (missed ticks to enqueue after downtime besides the latest
        one; default 0), ``options`` (the jobs' queue, priority, max_attempts, lease_seconds, …).
        """
        from . import periodic

        return periodic.add(self, task, **when)

    def add_beat_schedule(self, entries: Mapping[str, Mapping[str, Any]]) -> list[Schedule]:
        """Celery's ``beat_schedule`` dict: ``{"name": {"task": "tasks.add", "schedule": timedelta or
        cron string, "args": (…), "kwargs": {…}, "options": {…}}}``, plus pgq's ``tz`` and ``catch_up``."""
        from . import periodic

        return periodic.add_beat_schedule(self, entries)

    def scheduler(self, **settings: Any) -> Scheduler:
        """The periodic scheduler of this app's schedules; see :class:`pgq.periodic.Scheduler`."""
        from .periodic import Scheduler

        return Scheduler(self, **settings)

    # --- workers -------------------------------------------------------------------------------

    def worker(self, **settings: Any) -> Worker:
        """A worker for this app's tasks; see :class:`pgq.worker.Worker` for the settings."""
        from .worker import Worker

        return Worker(self, **settings)


def _not_executed(exc: psycopg.OperationalError) -> bool:
    """The server refused the statement because the session was being shut down (an administrator
    terminated it, or the server is restarting), or psycopg never sent it."""
    sqlstate = getattr(exc, "sqlstate", None) or ""
    return sqlstate.startswith("57P") or "the connection is closed" in str(exc)
