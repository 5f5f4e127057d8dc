"""Producers and workers through a real PgBouncer in transaction mode: no LISTEN, no prepared
statements, and nothing lost."""

from __future__ import annotations

import random
import threading
import time

import psutil
import psycopg
import pytest

from tests import apps
from tests.helpers import WorkerProcess, scalar, wait_for
from tests.pgbouncer import MISSING, pgbouncer
from tests.test_faults import Fleet, _assert_exactly_once, _enqueue, _succeeded

pytestmark = pytest.mark.skipif(bool(MISSING), reason=MISSING or "")


@pytest.fixture
def pgbouncer_url(db_url):
    """A PgBouncer in transaction mode in front of this test's database: its URL and log."""
    with pgbouncer(db_url) as (url, log, _):
        yield url, log


def test_producers_and_workers_through_pgbouncer_lose_nothing(app, conn, pgbouncer_url, monkeypatch):
    pgbouncer_url, log = pgbouncer_url
    monkeypatch.setenv("PGQ_PREPARE", "0")
    app.set_database_url(pgbouncer_url)
    total, threads = 200, 4
    handles: list = []
    lock = threading.Lock()

    def produce(n):
        mine = [apps.record.delay() for _ in range(n)]
        with lock:
            handles.extend(mine)

    producers = [threading.Thread(target=produce, args=(total // threads,)) for _ in range(threads)]
    for t in producers:
        t.start()
    workers = [WorkerProcess(pgbouncer_url, "-c", "4", "--no-listen", "--no-prepare", "--poll-interval", "0.1")
               for _ in range(2)]
    try:
        for t in producers:
            t.join(timeout=60)
        assert len(handles) == total
        wait_for(lambda: scalar(conn, "SELECT count(*) FROM pgq.jobs WHERE status = 'succeeded'") == total,
                 timeout=60, what="every job to succeed through pgbouncer")
        assert sorted(h.get(timeout=5) for h in handles) == sorted(h.id for h in handles)
    finally:
        started = time.monotonic()
        outputs = [w.stop() for w in workers]
        stop_seconds = time.monotonic() - started
    runs = conn.execute("SELECT job_id, count(*) FROM test_executions GROUP BY job_id HAVING count(*) > 1").fetchall()
    assert runs == [], f"jobs run more than once: {runs}"
    assert scalar(conn, "SELECT count(*) FROM pgq.results WHERE status = 'succeeded'") == total
    for output in outputs:
        assert "prepared statement" not in output and "Traceback" not in output, output
    assert stop_seconds < 10, f"workers took {stop_seconds:.1f} s to stop through pgbouncer"
    # It really went through the pooler: the producer's pool and both workers logged in there.
    assert log.read_text().count("login attempt") >= 3


# --- the fault tests of tests/test_faults.py, through PgBouncer -------------------------------------

def _bounced_fleet(db_url: str, url: str, size: int, *args: str) -> Fleet:
    """Workers through PgBouncer; their tasks note their executions straight in the database."""
    return Fleet(url, size, "--no-listen", "--no-prepare", *args, env={"PGQ_TEST_RUNS_URL": db_url})


@pytest.mark.slow
def test_sigkill_through_pgbouncer_loses_nothing(fapp, conn, db_url, pgbouncer_url):
    url, _ = pgbouncer_url
    random.seed(20261207)
    ids = _enqueue(fapp, 1000, seconds=0.02)  # long enough a drain for 5 kills or more, even on a quiet machine
    fleet = _bounced_fleet(db_url, url, 3, "-c", "4")
    try:
        deadline = time.monotonic() + 30
        while fleet.kills < 10 and time.monotonic() < deadline and _succeeded(conn) < len(ids) * 0.9:
            time.sleep(random.uniform(0.3, 0.9))  # a random moment: claiming, running or recording
            fleet.kill_one()
        wait_for(lambda: _succeeded(conn) == len(ids), timeout=90, interval=0.2, what="every job to succeed")
    finally:
        outputs = fleet.stop()
    counts = _assert_exactly_once(conn, ids, fleet.killed_at)
    print(f"\nSIGKILL through pgbouncer: {counts}, kills={fleet.kills}")
    assert fleet.kills >= 5
    assert not any("prepared statement" in o for o in outputs)


@pytest.mark.slow
def test_postgres_restart_behind_pgbouncer_loses_nothing(fapp, conn, db_url, pgbouncer_url, restart_postgres):
    url, _ = pgbouncer_url
    ids = _enqueue(fapp, 400, seconds=0.01)
    fleet = _bounced_fleet(db_url, url, 2, "-c", "4")
    try:
        wait_for(lambda: _succeeded(conn) >= 80, timeout=30, what="work under way")
        procs = [psutil.Process(w.pid) for w in fleet.workers]
        before = [sum(p.cpu_times()[:2]) for p in procs]
        started = time.monotonic()
        conn.close()
        restart_postgres(2.0)
        outage = time.monotonic() - started
        cpu = [sum(p.cpu_times()[:2]) - b for p, b in zip(procs, before, strict=True)]
        with psycopg.connect(db_url, autocommit=True) as conn2:
            restarted = time.monotonic()
            wait_for(lambda: _succeeded(conn2) == len(ids), timeout=90, interval=0.2, what="all jobs after restart")
            drained = time.monotonic() - restarted
            counts = _assert_exactly_once(conn2, ids)
            assert all(w.proc.poll() is None for w in fleet.workers), "a worker exited during the outage"
            assert all(c < 0.5 * outage for c in cpu), f"cpu seconds during a {outage:.1f} s outage: {cpu}"
    finally:
        outputs = fleet.stop()
    print(f"\nrestart behind pgbouncer: {counts}, the rest done {drained:.1f} s after the restart")
    assert not any("prepared statement" in o or "Traceback" in o for o in outputs)


@pytest.mark.slow
def test_terminated_server_connections_behind_pgbouncer_lose_nothing(fapp, conn, db_url, pgbouncer_url):
    url, _ = pgbouncer_url
    ids = _enqueue(fapp, 300, seconds=0.01)
    fleet = _bounced_fleet(db_url, url, 1, "-c", "4")
    try:
        for share in (0.2, 0.5):
            wait_for(lambda s=share: _succeeded(conn) >= s * len(ids), timeout=30, what="work under way")
            killed = conn.execute("""
                SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'
            """).fetchone()[0]
            assert killed >= 2  # PgBouncer's server connections, and the tasks' own
        wait_for(lambda: _succeeded(conn) == len(ids), timeout=60, what="every job to succeed after the drops")
        counts = _assert_exactly_once(conn, ids)
        assert fleet.workers[0].proc.poll() is None
    finally:
        outputs = fleet.stop()
    print(f"\nterminated behind pgbouncer: {counts}")
    assert not any("prepared statement" in o or "Traceback" in o for o in outputs)
