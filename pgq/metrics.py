"""Prometheus metrics: what each worker did, and what the database holds.

Two sources, because neither alone tells the whole story:

- a worker's own counters (jobs started, succeeded, failed, retried, cancelled; their run times; leases
  it rescued or lost; jobs enqueued by this process), kept in memory by the worker that ran the jobs.
  Summed over every worker they give the rates; they start from 0 when the worker restarts.
- the database's state, read at scrape time (:class:`DatabaseCollector`): jobs per queue and state, how
  long the oldest ready job has waited, stuck jobs, live workers, rows inserted into ``pgq.jobs``. The
  same numbers whichever worker (or dashboard) is scraped: aggregate them with ``max``, not ``sum``.

Costs. With metrics off (no ``--metrics-port``), a worker holds :data:`OFF`, whose hooks do nothing, and
``prometheus_client`` is never imported (about 5 MiB and 35 ms). With metrics on, a job costs two hook
calls, about 0.7 µs together (one lock, two integer increments, a bisect for the histogram bucket):
cheaper than ``prometheus_client``'s own Counter and Histogram, 1.5 µs, whose every child takes a lock
of its own. The counts are turned into metric families only when scraped. The database scrape reads
only unfinished jobs, through the partial indexes the claim uses (0.5 ms with 1,000,000 finished
rows; the ``pgq.queue_stats`` view counts every row, 270 ms), under a statement timeout.

See docs/metrics.md for every metric, a scrape configuration and alert rules.
"""

from __future__ import annotations

import logging
import threading
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import psycopg

from . import db
from .errors import DatabaseUnavailable
from .executor import Cancelled, ClaimedJob, Failed, Outcome, RetryLater, Succeeded
from .humanize import error_line

if TYPE_CHECKING:
    from .enqueue import JobSpec
    from .worker import Worker

log = logging.getLogger("pgq.metrics")

#: Upper bounds of the run-time histogram's buckets, in seconds: 1 ms to 10 minutes.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    120.0, 300.0, 600.0)

#: Seconds the database scrape may take (the statement timeout of its transaction). Too low turns a busy
#: database into ``pgq_up 0``; too high lets a scrape outlast Prometheus' scrape_timeout (10 s by default).
STATEMENT_TIMEOUT = 2.0
#: Seconds to wait for a connection when scraping: an unreachable database gives ``pgq_up 0`` this soon.
CONNECT_TIMEOUT = 3

_OUTCOMES = ("succeeded", "retried", "failed", "cancelled")
_OUTCOME_INDEX = {Succeeded: 0, RetryLater: 1, Failed: 2, Cancelled: 3}


# --- hooks: the no-op object a worker without metrics holds -------------------------------------------


class NoMetrics:
    """The worker's metrics hooks, each a single call on the hot path; this class's do nothing."""

    url: str | None = None  # where the metrics are served, once started

    def start(self) -> None:
        """Serve the metrics (from Worker.run)."""

    def stop(self) -> None:
        """Stop serving them (when the worker has shut down)."""

    def job_started(self, job: ClaimedJob) -> None:
        """A runner starts *job*'s task."""

    def job_finished(self, job: ClaimedJob, outcome: Outcome, seconds: float | None) -> None:
        """*job*'s attempt ended with *outcome* after *seconds* of run time (None: it never ran)."""

    def lease_lost(self, job: ClaimedJob) -> None:
        """The heartbeat found *job* no longer this worker's: its lease expired and it was rescued."""

    def leases_rescued(self, rows: Sequence[tuple]) -> None:
        """This worker's rescue sweep recovered these jobs (maintenance.rescue_expired's rows)."""


OFF = NoMetrics()


def worker_metrics(worker: Worker) -> NoMetrics:
    """The metrics hooks for *worker*: :data:`OFF` unless it was given an address to serve them on."""
    if worker.metrics_address is None:
        return OFF
    return WorkerMetrics(worker)


# --- jobs enqueued by this process ----------------------------------------------------------------------

# Every EnqueueCounter counting this process's enqueues. Empty (the default), enqueue pays a call and an
# empty loop.
_enqueue_counters: list[EnqueueCounter] = []


def enqueued(task_name: str, queue: str, jobs: int = 1) -> None:
    """Jobs were written by an enqueue of this process (pgq.enqueue and pgq.periodic call it)."""
    for counter in _enqueue_counters:
        counter.add(task_name, queue, jobs)


def enqueued_many(specs: Sequence[JobSpec]) -> None:
    """A bulk enqueue wrote *specs*."""
    if _enqueue_counters:
        for (task_name, queue), jobs in Counter((s.task_name, s.queue) for s in specs).items():
            enqueued(task_name, queue, jobs)


class EnqueueCounter:
    """``pgq_jobs_enqueued_total``: jobs this process enqueued, per task and queue, as a collector.

    Counted when the INSERT returns, so a job enqueued in a transaction that then rolls back is counted
    too; a unique job that returned an existing job is not. Producers in other processes are counted by
    their own process (:func:`count_enqueues`), and all of them together by ``pgq_jobs_inserted_total``.
    """

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def add(self, task_name: str, queue: str, jobs: int) -> None:
        with self._lock:
            key = (task_name, queue)
            self._counts[key] = self._counts.get(key, 0) + jobs

    def start(self) -> EnqueueCounter:
        if self not in _enqueue_counters:
            _enqueue_counters.append(self)
        return self

    def stop(self) -> None:
        if self in _enqueue_counters:
            _enqueue_counters.remove(self)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily

        family = CounterMetricFamily("pgq_jobs_enqueued_total", "Jobs enqueued by this process (committed or not)",
                                     labels=("task", "queue"))
        with self._lock:
            counts = sorted(self._counts.items())
        for (task_name, queue), jobs in counts:
            family.add_metric((task_name, queue), jobs)
        yield family


def count_enqueues(registry: Any = None) -> EnqueueCounter:
    """Count the jobs this process enqueues as ``pgq_jobs_enqueued_total`` in *registry* (default:
    prometheus_client's global registry), for producers that export metrics of their own (a web app).
    Workers started with metrics count theirs without this."""
    from prometheus_client import REGISTRY

    counter = EnqueueCounter()
    (REGISTRY if registry is None else registry).register(counter)
    return counter.start()


# --- a worker's own metrics ---------------------------------------------------------------------------


class _Tally:
    """What a worker ran of one (task, queue): outcome counts and a run-time histogram."""

    __slots__ = ("buckets", "outcomes", "seconds", "started")

    def __init__(self) -> None:
        self.started = 0
        self.outcomes = [0] * len(_OUTCOMES)
        self.buckets = [0] * (len(DURATION_BUCKETS) + 1)  # not cumulative; the last is +Inf
        self.seconds = 0.0


class WorkerMetrics(NoMetrics):
    """One worker's metrics, in a registry of its own (several workers in one process do not clash), served
    with the database's (:class:`DatabaseCollector`) and this process's enqueues on the worker's
    ``metrics_address`` by a daemon thread."""

    def __init__(self, worker: Worker):
        from prometheus_client import CollectorRegistry

        self.worker = worker
        self._tallies: dict[tuple[str, str], _Tally] = {}
        self._expiries: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()
        self.enqueues = EnqueueCounter()
        self.database = DatabaseCollector(worker.app.database_url)
        self.registry = CollectorRegistry()
        for collector in (self, self.enqueues, self.database):
            self.registry.register(collector)
        self._server: Any = None
        self._thread: threading.Thread | None = None

    # --- serving

    def start(self) -> None:
        from prometheus_client import start_http_server

        assert self.worker.metrics_address is not None
        host, port = self.worker.metrics_address
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise OSError(f"cannot serve metrics on {host}:{port}: {exc}") from exc
        self._thread.name = "pgq-metrics"
        self.enqueues.start()
        bound_host, bound_port = self._server.server_address[:2]
        self.url = f"http://{f'[{bound_host}]' if ':' in bound_host else bound_host}:{bound_port}/metrics"
        log.info("metrics at %s", self.url)

    def stop(self) -> None:
        self.enqueues.stop()
        if self._server is not None:
            self._server.shutdown()  # serve_forever returns within its 0.5 s poll
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None
        self.database.close()

    # --- hooks (runner threads, the keeper)

    def _tally(self, job: ClaimedJob) -> _Tally:
        tally = self._tallies.get((job.task_name, job.queue))
        if tally is None:
            with self._lock:
                tally = self._tallies.setdefault((job.task_name, job.queue), _Tally())
        return tally

    def job_started(self, job: ClaimedJob) -> None:
        tally = self._tally(job)
        with self._lock:
            tally.started += 1

    def job_finished(self, job: ClaimedJob, outcome: Outcome, seconds: float | None) -> None:
        tally = self._tally(job)
        index = _OUTCOME_INDEX[type(outcome)]
        if seconds is None:
            with self._lock:
                tally.outcomes[index] += 1
            return
        bucket = bisect_left(DURATION_BUCKETS, seconds)  # the first bound >= seconds: Prometheus' `le`
        with self._lock:
            tally.outcomes[index] += 1
            tally.buckets[bucket] += 1
            tally.seconds += seconds

    def lease_lost(self, job: ClaimedJob) -> None:
        self._expired(job.task_name, "lost")

    def leases_rescued(self, rows: Sequence[tuple]) -> None:
        for row in rows:
            self._expired(row[2], "rescued")

    def _expired(self, task_name: str, event: str) -> None:
        with self._lock:
            self._expiries[(task_name, event)] = self._expiries.get((task_name, event), 0) + 1

    # --- scrape

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        with self._lock:
            tallies = sorted((key, t.started, list(t.outcomes), list(t.buckets), t.seconds)
                             for key, t in self._tallies.items())
            expiries = sorted(self._expiries.items())
        started = CounterMetricFamily("pgq_jobs_started_total", "Attempts this worker started",
                                      labels=("task", "queue"))
        ended = [CounterMetricFamily(f"pgq_jobs_{name}_total", help_text, labels=("task", "queue"))
                 for name, help_text in zip(_OUTCOMES, (
                     "Attempts that succeeded",
                     "Attempts that failed (or timed out) and were scheduled to run again",
                     "Attempts that failed for good: no attempts left, or an error that cannot succeed",
                     "Attempts ended by a cancellation"), strict=True)]
        duration = HistogramMetricFamily("pgq_job_duration_seconds", "Run time of attempts, from the task's start "
                                         "to its return or timeout", labels=("task", "queue"))
        for labels, started_count, outcomes, buckets, seconds in tallies:
            started.add_metric(labels, started_count)
            for family, count in zip(ended, outcomes, strict=True):
                family.add_metric(labels, count)
            cumulative, points = 0, []
            for bound, count in zip((*map(str, DURATION_BUCKETS), "+Inf"), buckets, strict=True):
                cumulative += count
                points.append((bound, cumulative))
            duration.add_metric(labels, points, seconds)
        yield started
        yield from ended
        yield duration

        lease = CounterMetricFamily("pgq_lease_expiries_total", "Jobs whose lease expired: rescued by this worker's "
                                    "sweep (event=rescued), or lost by this worker (event=lost)",
                                    labels=("task", "event"))
        for labels, count in expiries:
            lease.add_metric(labels, count)
        yield lease

        w = self.worker
        with w._held_lock:
            running = sum(1 for h in w._held.values() if h.started is not None and not h.finished)
            held = len(w._held)
        yield GaugeMetricFamily("pgq_worker_concurrency", "Runners of this worker", value=w.concurrency)
        yield GaugeMetricFamily("pgq_worker_jobs_running", "Tasks running in this worker now", value=running)
        yield GaugeMetricFamily("pgq_worker_jobs_held", "Jobs this worker holds a lease on: running, claimed ahead "
                                "(prefetch), or waiting for their outcome to be recorded", value=held)
        info = GaugeMetricFamily("pgq_worker_info", "This worker's id (as in pgq.workers) and queues",
                                 labels=("worker_id", "queues"))
        info.add_metric((w.id, ",".join(w.queues)), 1)
        yield info


# --- the database's state, read at scrape time ------------------------------------------------------------

# Jobs not finished, per queue: ready (due now), scheduled (queued for later), backing off (retrying
# later), running, and running past their lease; and how long the oldest ready job has waited since it
# was due. Finished jobs are never read: the three branches are exactly the predicates of the partial
# indexes jobs_claim_idx, jobs_limited_claim_idx and jobs_lease_idx (with `status IN (…)` alone the
# planner can use neither claim index and scans the table: 100 ms with 1,000,000 finished rows; this,
# 0.5 ms). Its cost grows with the jobs waiting and running, not with the table.
QUEUE_STATE = """
SELECT queue,
       count(*) FILTER (WHERE status <> 'running' AND run_at <= now()) AS ready,
       count(*) FILTER (WHERE status = 'queued' AND run_at > now()) AS scheduled,
       count(*) FILTER (WHERE status = 'retrying' AND run_at > now()) AS backing_off,
       count(*) FILTER (WHERE status = 'running') AS running,
       count(*) FILTER (WHERE status = 'running' AND lease_expires_at < now()) AS stuck,
       coalesce(extract(epoch FROM max(now() - run_at) FILTER (WHERE status <> 'running' AND run_at <= now())),
                0)::float8 AS oldest_ready
FROM (
    SELECT queue, status, run_at, NULL::timestamptz AS lease_expires_at
    FROM pgq.jobs WHERE status IN ('queued', 'retrying') AND NOT limited
    UNION ALL
    SELECT queue, status, run_at, NULL FROM pgq.jobs WHERE status IN ('queued', 'retrying') AND limited
    UNION ALL
    SELECT queue, status, run_at, lease_expires_at FROM pgq.jobs WHERE status = 'running'
) AS unfinished
GROUP BY queue
"""

# Worker rows: alive when heard from in the last 30 seconds (as the pgq.live_workers view says).
WORKER_ROWS = """
SELECT queues, last_heartbeat_at > now() - interval '30 seconds' FROM pgq.workers
"""

# Rows ever inserted into pgq.jobs, by every producer, from PostgreSQL's statistics: no row is read. It
# counts inserts that rolled back too, and it restarts from 0 when the statistics are reset (after a
# crash, pg_stat_reset()), which Prometheus' rate() takes as a counter reset.
JOBS_INSERTED = "SELECT n_tup_ins FROM pg_stat_user_tables WHERE relid = to_regclass('pgq.jobs')"

QUEUE_STATES = ("ready", "scheduled", "backing_off", "running")

#: What render_database's body is: the text format every Prometheus reads (prometheus_client's own HTTP
#: handler answers a plain scrape with it too; its CONTENT_TYPE_LATEST says 1.0.0 in recent versions).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class DatabaseCollector:
    """Metrics read from the database at each scrape, in one short transaction under a statement
    timeout. A failure (no connection, a timeout, no schema) gives ``pgq_up 0`` and no other sample
    rather than an error: the scrape itself succeeds, and alerts see the database is not readable.
    One connection, kept between scrapes; concurrent scrapes take turns."""

    def __init__(self, database_url: str, *, timeout: float = STATEMENT_TIMEOUT):
        self.database_url = database_url
        self.timeout = timeout
        self._conn: psycopg.Connection | None = None
        self._fresh = True  # the connection was opened by this scrape
        self._lock = threading.Lock()

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        started = time.monotonic()
        with self._lock:
            try:
                try:
                    queues, workers, inserted = self._read()
                except psycopg.OperationalError:
                    if self._fresh:
                        raise
                    self.close()  # the kept connection died (a database restart): one more try on a new one
                    queues, workers, inserted = self._read()
            except (psycopg.Error, DatabaseUnavailable) as exc:
                self.close()
                log.warning("metrics: cannot read the database (pgq_up 0): %s", error_line(exc))
                queues = None
        yield GaugeMetricFamily("pgq_up", "1 if pgq's tables could be read at this scrape, else 0",
                                value=0 if queues is None else 1)
        yield GaugeMetricFamily("pgq_scrape_duration_seconds", "Seconds spent reading the database for this scrape",
                                value=time.monotonic() - started)
        if queues is None:
            return
        alive = [queue_list for queue_list, is_alive in workers if is_alive]
        served = Counter(q for queue_list in alive for q in queue_list)
        for queue in served:
            queues.setdefault(queue, None)
        jobs = GaugeMetricFamily("pgq_queue_jobs", "Unfinished jobs per queue: ready (due now), scheduled (for "
                                 "later), backing_off (retrying later), running", labels=("queue", "state"))
        oldest = GaugeMetricFamily("pgq_queue_oldest_ready_age_seconds", "How long the oldest ready job of the "
                                   "queue has waited since it was due (0: none is ready)", labels=("queue",))
        stuck = GaugeMetricFamily("pgq_queue_stuck_jobs", "Jobs running past their lease: their worker stopped "
                                  "heartbeating; a live worker rescues them", labels=("queue",))
        serving = GaugeMetricFamily("pgq_queue_workers", "Live workers serving the queue", labels=("queue",))
        for queue, row in sorted(queues.items()):
            ready, scheduled, backing_off, running, stuck_count, oldest_ready = row or (0, 0, 0, 0, 0, 0.0)
            for state, count in zip(QUEUE_STATES, (ready, scheduled, backing_off, running), strict=True):
                jobs.add_metric((queue, state), count)
            oldest.add_metric((queue,), oldest_ready)
            stuck.add_metric((queue,), stuck_count)
            serving.add_metric((queue,), served.get(queue, 0))
        yield from (jobs, oldest, stuck, serving)
        rows = GaugeMetricFamily("pgq_workers", "Rows in pgq.workers: alive (heard from in the last 30 s), or "
                                 "stale (killed or cut off; forgotten after 10 minutes)", labels=("state",))
        rows.add_metric(("alive",), len(alive))
        rows.add_metric(("stale",), len(workers) - len(alive))
        yield rows
        if inserted is not None:
            yield CounterMetricFamily("pgq_jobs_inserted_total", "Rows inserted into pgq.jobs by every producer, "
                                      "per PostgreSQL's statistics (rolled-back inserts included)", value=inserted)

    def _read(self) -> tuple[dict[str, tuple | None], list[tuple[list[str], bool]], int | None]:
        self._fresh = self._conn is None or self._conn.closed
        if self._conn is None or self._conn.closed:
            self._conn = db.connect(self.database_url, role="metrics", autocommit=True,
                                    connect_timeout=CONNECT_TIMEOUT)
        conn = self._conn
        with conn.transaction():
            conn.execute("SELECT set_config('statement_timeout', %s, true)", (f"{int(self.timeout * 1000)}ms",))
            queues: dict[str, tuple | None] = {row[0]: row[1:] for row in conn.execute(QUEUE_STATE)}
            workers = [(list(q or []), bool(alive)) for q, alive in conn.execute(WORKER_ROWS)]
            row = conn.execute(JOBS_INSERTED).fetchone()
        return queues, workers, None if row is None else int(row[0])

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


_collectors: dict[str, tuple[Any, DatabaseCollector]] = {}  # database URL -> (registry, its collector)
_collectors_lock = threading.Lock()


def render_database(database_url: str) -> tuple[bytes, str]:
    """The database's metrics in Prometheus' text format: (body, content type), for a ``/metrics`` route
    (the dashboard's). Never raises for a database problem: it reports ``pgq_up 0``. One connection per
    URL is kept between calls."""
    from prometheus_client import CollectorRegistry, generate_latest

    with _collectors_lock:
        if database_url not in _collectors:
            collector = DatabaseCollector(database_url)
            registry = CollectorRegistry()
            registry.register(collector)
            _collectors[database_url] = (registry, collector)
        registry = _collectors[database_url][0]
    return generate_latest(registry), CONTENT_TYPE


def close_database_connections() -> None:
    """Close the connections render_database keeps (a dashboard's shutdown; tests)."""
    with _collectors_lock:
        for _, collector in _collectors.values():
            with collector._lock:
                collector.close()
        _collectors.clear()

