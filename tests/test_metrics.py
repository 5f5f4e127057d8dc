"""Prometheus metrics: a real ``pgq worker --metrics-port 0`` scraped over HTTP, the database collector
against states put in place with SQL, a database that cannot be read, and the cost of metrics being off
(prometheus_client never imported)."""

from __future__ import annotations

import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator

import psycopg
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import pgq
from pgq import metrics
from pgq.executor import Cancelled, ClaimedJob, ErrorInfo, Failed, RetryLater, Succeeded
from tests import apps, metrics_apps
from tests.helpers import WorkerProcess, scalar, wait_for, wait_registered

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(body: bytes | str) -> Samples:
    """Every sample of a scrape, by (sample name, sorted labels)."""
    text = body.decode() if isinstance(body, bytes) else body
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        return parse(response.read())


def metrics_url(worker: WorkerProcess) -> str:
    """The URL the worker logged when it started serving metrics."""

    def logged() -> str | None:
        if worker.proc.poll() is not None:
            raise AssertionError(f"worker exited with {worker.proc.returncode}:\n{worker.output()}")
        match = re.search(r"metrics at (http://\S+/metrics)", worker.output())
        return match.group(1) if match else None

    return wait_for(logged, what="the worker to log its metrics URL")


@pytest.fixture(autouse=True)
def _close_scrape_connections() -> Iterator[None]:
    """render_database keeps a connection per URL; each test's database is dropped after it."""
    yield
    metrics.close_database_connections()


@pytest.fixture
def mapp(db_url: str) -> Iterator[pgq.App]:
    metrics_apps.app.set_database_url(db_url)
    yield metrics_apps.app
    metrics_apps.app.close()


@pytest.fixture
def spawn(db_url: str) -> Iterator[Callable[..., WorkerProcess]]:
    """``pgq worker -A tests.metrics_apps`` processes, stopped at teardown with their output printed."""
    started: list[WorkerProcess] = []

    def start(*args: str) -> WorkerProcess:
        worker = WorkerProcess(db_url, *args, app="tests.metrics_apps")
        started.append(worker)
        return worker

    yield start
    for worker in started:
        print(f"--- output of worker {worker.pid} ---\n{worker.stop()}")


# --- a real worker process ----------------------------------------------------------------------


def test_worker_serves_counts_of_what_it_ran_and_the_database_state(mapp, conn, spawn):
    worker = spawn("--metrics-port", "0", "-c", "4")
    url = metrics_url(worker)
    assert url.startswith("http://127.0.0.1:")
    wait_registered(conn, worker)

    for _ in range(5):
        metrics_apps.ok.delay()
    for _ in range(3):
        metrics_apps.fail.delay()
    for _ in range(2):
        metrics_apps.flaky.delay()
    metrics_apps.spawn.delay(4, "parked")  # a queue no worker serves: its jobs wait
    loaded = metrics_apps.prometheus_loaded.delay()
    wait_for(lambda: scalar(conn, "SELECT count(*) FROM pgq.jobs WHERE queue = 'default' "
                                  "AND status NOT IN ('succeeded', 'failed')") == 0,
             what="every job of the default queue to finish")
    assert loaded.get(timeout=5) is True

    samples = scrape(url)
    expected = {  # task: (started, succeeded, retried, failed, cancelled)
        "metrics.ok": (5, 5, 0, 0, 0),
        "metrics.fail": (6, 0, 3, 3, 0),
        "metrics.flaky": (6, 2, 4, 0, 0),
        "metrics.spawn": (1, 1, 0, 0, 0),
        "metrics.prometheus_loaded": (1, 1, 0, 0, 0),
    }
    names = ("started", "succeeded", "retried", "failed", "cancelled")
    got = {task: tuple(value(samples, f"pgq_jobs_{name}_total", task=task, queue="default") for name in names)
           for task in expected}
    assert got == expected
    for task, (started, *_) in expected.items():
        count = value(samples, "pgq_job_duration_seconds_count", task=task, queue="default")
        assert count == started, task  # every attempt ran and returned
        assert value(samples, "pgq_job_duration_seconds_bucket", task=task, queue="default", le="+Inf") == count
        assert value(samples, "pgq_job_duration_seconds_bucket", task=task, queue="default", le="600.0") == count
        assert 0 < value(samples, "pgq_job_duration_seconds_sum", task=task, queue="default") < 10
    # The jobs the spawn task enqueued, counted by the process that enqueued them.
    assert value(samples, "pgq_jobs_enqueued_total", task="metrics.ok", queue="parked") == 4
    assert value(samples, "pgq_worker_concurrency") == 4
    assert value(samples, "pgq_worker_jobs_running") == 0
    assert value(samples, "pgq_lease_expiries_total", task="metrics.ok", event="rescued") is None

    # The database's state, from the same endpoint.
    assert value(samples, "pgq_up") == 1
    assert value(samples, "pgq_queue_jobs", queue="parked", state="ready") == 4
    assert value(samples, "pgq_queue_jobs", queue="default", state="ready") == 0
    assert value(samples, "pgq_queue_workers", queue="default") == 1
    assert value(samples, "pgq_queue_workers", queue="parked") == 0
    assert value(samples, "pgq_queue_oldest_ready_age_seconds", queue="parked") > 0
    assert value(samples, "pgq_workers", state="alive") == 1

    output = worker.stop()
    assert worker.proc.returncode == 0, output
    with pytest.raises(urllib.error.URLError):  # the server stopped with the worker
        scrape(url)


def test_worker_without_metrics_port_never_imports_prometheus_client(mapp, conn, spawn):
    worker = spawn("-c", "1")
    wait_registered(conn, worker)
    assert metrics_apps.prometheus_loaded.delay().get(timeout=20) is False
    assert "metrics at" not in worker.output()


def test_worker_refuses_to_start_when_its_metrics_port_is_taken(mapp, spawn):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        worker = spawn("--metrics-port", str(port))
        assert worker.wait(timeout=30) == 1
    assert f"Error: cannot serve metrics on 127.0.0.1:{port} (--metrics-port)" in worker.output()


# --- the worker's own counters, driven in-process -------------------------------------------------


def _claimed(job_id: int, task: str = "tests.add", queue: str = "default", attempt: int = 1) -> ClaimedJob:
    return ClaimedJob(id=job_id, queue=queue, task_name=task, args=[1, 2], kwargs={}, priority=0, attempt=attempt,
                      max_attempts=3, retry_backoff=0.0, lease_seconds=30, ignore_result=False)


def _own(worker: pgq.Worker) -> Samples:
    """The worker's own metrics, without the database's."""
    registry = CollectorRegistry()
    registry.register(worker.metrics)
    return parse(generate_latest(registry))


def test_outcomes_and_run_times_are_counted_per_task_and_queue(app):
    worker = app.worker(metrics=("127.0.0.1", 0), prune_interval=None)
    assert isinstance(worker.metrics, metrics.WorkerMetrics)
    error = ErrorInfo("ValueError", "bad", None)
    hooks = worker.metrics
    for job_id, outcome, seconds in [(1, Succeeded("3"), 0.0005), (2, Succeeded("3"), 0.001),
                                     (3, RetryLater(1.0, error), 0.003), (4, Failed(error), 700.0),
                                     (5, Cancelled("stop"), None)]:
        hooks.job_started(_claimed(job_id))
        hooks.job_finished(_claimed(job_id), outcome, seconds)
    hooks.job_started(_claimed(6, queue="other"))

    samples = _own(worker)
    labels = {"task": "tests.add", "queue": "default"}
    assert value(samples, "pgq_jobs_started_total", **labels) == 5
    assert [value(samples, f"pgq_jobs_{name}_total", **labels)
            for name in ("succeeded", "retried", "failed", "cancelled")] == [2, 1, 1, 1]
    # `le` bounds are inclusive: 1 ms falls in the 1 ms bucket. The cancelled attempt never ran: not observed.
    buckets = {le: value(samples, "pgq_job_duration_seconds_bucket", **labels, le=le)
               for le in ("0.001", "0.0025", "0.005", "600.0", "+Inf")}
    assert buckets == {"0.001": 2, "0.0025": 2, "0.005": 3, "600.0": 3, "+Inf": 4}
    assert value(samples, "pgq_job_duration_seconds_sum", **labels) == pytest.approx(700.0045)
    assert value(samples, "pgq_jobs_started_total", task="tests.add", queue="other") == 1
    assert value(samples, "pgq_jobs_succeeded_total", task="tests.add", queue="other") == 0


def test_timeouts_and_cancellations_are_counted(mapp, conn):
    worker = mapp.worker(metrics=("127.0.0.1", 0), prune_interval=None, rescue_interval=0.2, concurrency=2)
    with worker.running():
        slow = metrics_apps.too_slow.delay(30)
        napping = metrics_apps.nap.delay(30)
        wait_for(lambda: scalar(conn, "SELECT status FROM pgq.jobs WHERE id = %s", (napping.id,)) == "running",
                 what="the nap to start")
        mapp.cancel(napping.id)
        with pytest.raises(pgq.TaskFailed):
            slow.get(timeout=20)
        with pytest.raises(pgq.TaskCancelled):
            napping.get(timeout=20)
        samples = scrape(worker.metrics.url)

    too_slow = {"task": "metrics.too_slow", "queue": "default"}
    assert [value(samples, f"pgq_jobs_{name}_total", **too_slow)
            for name in ("started", "succeeded", "retried", "failed", "cancelled")] == [2, 0, 1, 1, 0]
    assert value(samples, "pgq_job_duration_seconds_count", **too_slow) == 2
    assert value(samples, "pgq_job_duration_seconds_sum", **too_slow) == pytest.approx(0.4)  # its timeout, twice
    nap = {"task": "metrics.nap", "queue": "default"}
    assert [value(samples, f"pgq_jobs_{name}_total", **nap)
            for name in ("started", "succeeded", "retried", "failed", "cancelled")] == [1, 0, 0, 0, 1]
    assert value(samples, "pgq_job_duration_seconds_count", **nap) == 1


def test_rescued_and_lost_leases_are_counted(app, conn):
    worker = app.worker(metrics=("127.0.0.1", 0), prune_interval=None)
    rescued = apps.add.delay(1, 2)
    conn.execute("UPDATE pgq.jobs SET status = 'running', attempts = 1, worker_id = 'dead', started_at = now(), "
                 "lease_expires_at = now() - interval '1 second' WHERE id = %s", (rescued.id,))
    # A job this worker thinks it holds on attempt 1, which the database has given to another worker's attempt 2.
    lost = apps.echo.delay()
    conn.execute("UPDATE pgq.jobs SET status = 'running', attempts = 2, worker_id = 'other', started_at = now(), "
                 "lease_expires_at = now() + interval '30 seconds' WHERE id = %s", (lost.id,))
    worker._hold([_claimed(lost.id, task="tests.echo")])
    try:
        worker.keeper.run_once()
    finally:
        worker.keeper._close()

    samples = _own(worker)
    assert value(samples, "pgq_lease_expiries_total", task="tests.add", event="rescued") == 1
    assert value(samples, "pgq_lease_expiries_total", task="tests.echo", event="lost") == 1
    assert value(samples, "pgq_worker_jobs_held") == 0


def test_workers_in_one_process_serve_their_own_registries_and_stop_serving(app):
    first = app.worker(metrics=("127.0.0.1", 0), prune_interval=None, concurrency=1)
    second = app.worker(metrics=("127.0.0.1", 0), prune_interval=None, concurrency=3)
    with first.running(), second.running():
        wait_for(lambda: first.metrics.url and second.metrics.url, what="both workers to serve metrics")
        assert first.metrics.url != second.metrics.url
        assert value(scrape(first.metrics.url), "pgq_worker_concurrency") == 1
        assert value(scrape(second.metrics.url), "pgq_worker_concurrency") == 3
        assert apps.add.delay(2, 3).get(timeout=10) == 5
    for url in (first.metrics.url, second.metrics.url):
        with pytest.raises(urllib.error.URLError):
            scrape(url)


def test_enqueues_of_this_process_are_counted(app):
    registry = CollectorRegistry()
    counter = metrics.count_enqueues(registry)
    try:
        apps.add.delay(1, 2)
        app.enqueue_many([apps.add.s(1, 1), apps.add.s(2, 2), apps.send_email.s("a@example.com")])
        apps.add.apply_async(args=(0, 0), unique_key="once")
        assert apps.add.apply_async(args=(0, 0), unique_key="once").deduplicated  # not a new job: not counted
    finally:
        counter.stop()
    apps.add.delay(9, 9)  # counting stopped

    samples = parse(generate_latest(registry))
    assert value(samples, "pgq_jobs_enqueued_total", task="tests.add", queue="default") == 4
    assert value(samples, "pgq_jobs_enqueued_total", task="emails.send", queue="emails") == 1


# --- the database collector ---------------------------------------------------------------------


def test_database_metrics_reflect_the_jobs_waiting(app, conn, db_url):
    ready = [apps.add.delay(i, i).id for i in range(3)]
    conn.execute("UPDATE pgq.jobs SET run_at = now() - interval '120 seconds' WHERE id = %s", (ready[0],))
    conn.execute("UPDATE pgq.jobs SET limited = true WHERE id = %s", (ready[1],))  # read through the other index
    for _ in range(2):
        apps.add.apply_async(args=(1, 1), countdown=3600)
    backing_off = apps.add.delay(0, 0).id
    conn.execute("UPDATE pgq.jobs SET status = 'retrying', attempts = 1, run_at = now() + interval '1 hour' "
                 "WHERE id = %s", (backing_off,))
    stuck = apps.add.delay(0, 0).id
    conn.execute("UPDATE pgq.jobs SET status = 'running', attempts = 1, worker_id = 'dead', started_at = now(), "
                 "lease_expires_at = now() - interval '5 seconds' WHERE id = %s", (stuck,))
    apps.add(1, 1)  # called directly: runs here, enqueues nothing
    apps.send_email.delay("a@example.com")
    finished = apps.add.delay(5, 5).id
    conn.execute("UPDATE pgq.jobs SET status = 'succeeded', attempts = 1, finished_at = now() WHERE id = %s",
                 (finished,))
    conn.execute("INSERT INTO pgq.workers (id, hostname, pid, queues, concurrency) "
                 "VALUES ('alive', 'h', 1, '[\"reports\", \"default\"]', 2)")
    conn.execute("INSERT INTO pgq.workers (id, hostname, pid, queues, concurrency, last_heartbeat_at) "
                 "VALUES ('gone', 'h', 2, '[\"default\"]', 2, now() - interval '1 minute')")

    body, content_type = metrics.render_database(db_url)
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    samples = parse(body)
    assert value(samples, "pgq_up") == 1
    states = ("ready", "scheduled", "backing_off", "running")
    depth = {q: [value(samples, "pgq_queue_jobs", queue=q, state=s) for s in states]
             for q in ("default", "emails", "reports")}
    assert depth == {"default": [3, 2, 1, 1], "emails": [1, 0, 0, 0], "reports": [0, 0, 0, 0]}
    assert 120 <= value(samples, "pgq_queue_oldest_ready_age_seconds", queue="default") < 180
    assert 0 <= value(samples, "pgq_queue_oldest_ready_age_seconds", queue="emails") < 60
    assert value(samples, "pgq_queue_oldest_ready_age_seconds", queue="reports") == 0
    assert value(samples, "pgq_queue_stuck_jobs", queue="default") == 1
    assert value(samples, "pgq_queue_stuck_jobs", queue="emails") == 0
    assert [value(samples, "pgq_queue_workers", queue=q) for q in ("default", "emails", "reports")] == [1, 0, 1]
    assert (value(samples, "pgq_workers", state="alive"), value(samples, "pgq_workers", state="stale")) == (1, 1)
    assert 0 <= value(samples, "pgq_scrape_duration_seconds") < metrics.STATEMENT_TIMEOUT


def test_rows_inserted_by_every_producer_are_counted_from_the_statistics(app, conn, db_url):
    before = value(parse(metrics.render_database(db_url)[0]), "pgq_jobs_inserted_total")
    conn.execute("INSERT INTO pgq.jobs (task_name) SELECT 'elsewhere.task' FROM generate_series(1, 7)")
    if conn.info.server_version >= 150000:  # else the statistics arrive within about 10 s
        conn.execute("SELECT pg_stat_force_next_flush()")
    wait_for(lambda: value(parse(metrics.render_database(db_url)[0]), "pgq_jobs_inserted_total") >= before + 7,
             timeout=30, interval=0.2, what="the insert to reach the statistics")


def test_unreachable_database_gives_up_0_not_an_error():
    started = time.monotonic()
    body, _ = metrics.render_database("postgresql://nobody@127.0.0.1:1/nothing")
    samples = parse(body)
    assert value(samples, "pgq_up") == 0
    assert not [name for name, _ in samples if name.startswith("pgq_queue_")]
    assert time.monotonic() - started < metrics.CONNECT_TIMEOUT + 1


def test_scrape_is_bounded_by_its_statement_timeout_and_recovers(app, db_url):
    collector = metrics.DatabaseCollector(db_url, timeout=1.0)
    registry = CollectorRegistry()
    registry.register(collector)
    try:
        assert value(parse(generate_latest(registry)), "pgq_up") == 1
        with psycopg.connect(db_url) as locker:  # holds a lock every read of pgq.jobs waits for
            locker.execute("LOCK TABLE pgq.jobs IN ACCESS EXCLUSIVE MODE")
            started = time.monotonic()
            samples = parse(generate_latest(registry))
            elapsed = time.monotonic() - started
            locker.rollback()
        assert value(samples, "pgq_up") == 0
        # One statement timeout, not two: a timed-out statement is not tried again.
        assert 1.0 <= elapsed < 1.8, f"the scrape took {elapsed:.2f} s with a 1 s statement timeout"
        assert value(parse(generate_latest(registry)), "pgq_up") == 1  # reconnects at the next scrape
    finally:
        collector.close()


def test_scrape_reconnects_when_the_server_dropped_its_connection(app, conn, db_url):
    assert value(parse(metrics.render_database(db_url)[0]), "pgq_up") == 1
    dropped = scalar(conn, "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                           "WHERE application_name = 'pgq-metrics' AND datname = current_database()")
    assert dropped == 1
    assert value(parse(metrics.render_database(db_url)[0]), "pgq_up") == 1


def test_unmigrated_database_gives_up_0(empty_db_url):
    body, _ = metrics.render_database(empty_db_url)
    assert value(parse(body), "pgq_up") == 0
