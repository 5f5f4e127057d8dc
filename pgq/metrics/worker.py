"""A worker's own metrics: the hooks its threads call, and the collector that turns them into metric
families when scraped (see :mod:`pgq.metrics`)."""

from __future__ import annotations

import logging
import threading
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import ConfigurationError
from ..executor import Cancelled, ClaimedJob, Failed, Outcome, RetryLater, Succeeded
from .database import DatabaseCollector
from .enqueues import EnqueueCounter

if TYPE_CHECKING:
    from ..worker import Worker

log = logging.getLogger("pgq.metrics")

#: Upper bounds of the run-time histogram's buckets, in seconds: 1 ms to 10 minutes.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    120.0, 300.0, 600.0)

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
        except OSError as exc:  # the port is taken, the address is not this machine's: say so, do not run blind
            raise ConfigurationError(f"cannot serve metrics on {host}:{port} (--metrics-port): {exc}") from exc
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
