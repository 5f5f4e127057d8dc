"""The database's state as metrics, read at scrape time, for a worker's metrics port and the dashboard's
``/metrics`` (:func:`render_database`)."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import psycopg

from .. import db
from ..errors import DatabaseUnavailable
from ..humanize import error_line

log = logging.getLogger("pgq.metrics")

#: Seconds each statement of the database scrape may take (its statement_timeout; the one that reads
#: pgq.jobs is all but the whole scrape). Too low turns a busy database into ``pgq_up 0``; too high lets a
#: scrape outlast Prometheus' scrape_timeout (10 s by default), which loses the worker's own metrics too.
STATEMENT_TIMEOUT = 2.0
#: Seconds to wait for a connection when scraping: an unreachable database gives ``pgq_up 0`` this soon.
CONNECT_TIMEOUT = 3

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
                    # A kept connection the server dropped (a restart, an idle timeout): once more on a new
                    # one. Not after a statement timeout: that connection is fine, and the database slow.
                    if self._fresh or self._conn is None or not self._conn.closed:
                        raise
                    self.close()
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
