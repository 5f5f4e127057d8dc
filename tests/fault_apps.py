"""Tasks for the fault tests (tests/test_faults.py); worker subprocesses load them with
``-A tests.fault_apps``. Each execution is recorded (job, attempt, pid, start, end) on a connection
cached per thread, so thousands of jobs cost no connection each."""

from __future__ import annotations

import os
import threading
import time

import psycopg

import pgq
from pgq.tasks import _current_request

app = pgq.App()

DDL = """
CREATE TABLE IF NOT EXISTS fault_runs (
    job_id bigint NOT NULL, attempt int NOT NULL, pid int NOT NULL,
    started_at timestamptz NOT NULL DEFAULT clock_timestamp(), ended_at timestamptz,
    token bigint, interrupted text
)
"""

_local = threading.local()


def _conn() -> psycopg.Connection:
    conn = getattr(_local, "conn", None)
    if conn is None or conn.closed or conn.broken:
        # PGQ_TEST_RUNS_URL: straight to the database when the worker's own URL goes through PgBouncer.
        conn = psycopg.connect(os.environ.get("PGQ_TEST_RUNS_URL") or app.database_url, autocommit=True)
        # The record of executions must survive a database crash, whatever the server's setting.
        conn.execute("SET synchronous_commit = on")
        _local.conn = conn
    return conn


def _record(seconds: float) -> int:
    req = _current_request.get()
    conn = _conn()
    conn.execute("INSERT INTO fault_runs (job_id, attempt, pid) VALUES (%s, %s, %s)",
                 (req.id, req.attempt, os.getpid()))
    if seconds:
        time.sleep(seconds)
    conn.execute("UPDATE fault_runs SET ended_at = clock_timestamp() WHERE job_id = %s AND attempt = %s AND pid = %s",
                 (req.id, req.attempt, os.getpid()))
    return req.id or 0


@app.task(name="faults.work", lease_seconds=2, max_attempts=25, retry_backoff=0.1)
def work(seconds: float = 0.0) -> int:
    return _record(seconds)


def _insist(statement: str, params: tuple, deadline: float) -> None:
    """Run *statement* until it succeeds: through a database restart, for the crash tests."""
    while True:
        try:
            _conn().execute(statement, params)
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@app.task(name="faults.through_crashes", lease_seconds=6, max_attempts=25, retry_backoff=0.1)
def through_crashes(seconds: float) -> int:
    """Records its execution even across a database crash: its start with the claim token it runs under,
    and its end, with the time the work ended, written as soon as the database is back. Ended early by
    LeaseLost, it records that too."""
    req = _current_request.get()
    deadline = time.monotonic() + 60
    _insist("INSERT INTO fault_runs (job_id, attempt, pid, token) VALUES (%s, %s, %s, %s)",
            (req.id, req.attempt, os.getpid(), req.claim_token), deadline)
    interrupted = None
    try:
        time.sleep(seconds)
    except BaseException as exc:
        interrupted = type(exc).__name__
        raise
    finally:
        _insist("UPDATE fault_runs SET ended_at = to_timestamp(%s), interrupted = %s WHERE job_id = %s AND token = %s",
                (time.time(), interrupted, req.id, req.claim_token), deadline)
    return req.id or 0


@app.task(name="faults.long", lease_seconds=1, max_attempts=3, retry_backoff=0.1)
def long(seconds: float) -> int:
    """Runs for several lease periods: only the heartbeat keeps it from being rescued."""
    return _record(seconds)


@app.task(name="faults.held", lease_seconds=1, max_attempts=10, retry_backoff=2.0)
def held(seconds: float) -> int:
    """Runs long enough to be killed at will. Its failure backoff (2, 4, 8, 16 s after attempts 1-4)
    must not delay it when it is rescued: its worker was lost, the job did nothing wrong."""
    return _record(seconds)


@app.task(name="faults.poison", lease_seconds=1, max_attempts=2, retry_backoff=0)
def poison() -> None:
    """Kills its worker process on every attempt."""
    _record(0)
    os._exit(17)


@app.task(name="faults.when", ignore_result=False)
def when() -> str:
    """Returns the worker's idea of the time, to show it is not what schedules anything."""
    return str(time.time())


INTERRUPTED: list[int] = []


@app.task(name="faults.spin", timeout=0.5, max_attempts=2, retry_backoff=0)
def spin() -> None:
    """Pure Python that never ends: the timeout interrupts it at a bytecode boundary."""
    try:
        while True:
            pass
    finally:
        INTERRUPTED.append(_current_request.get().id or 0)


@app.task(name="faults.block", max_attempts=2, retry_backoff=0)
def block(seconds: float) -> None:
    """Blocks in C (sleep) with no timeout of its own: only the worker's --task-timeout ends the attempt."""
    time.sleep(seconds)


@app.task(name="faults.away", lease_seconds=2, max_attempts=25, retry_backoff=0.1)
def away(seconds: float) -> str:
    """For workers on hosts that the tests cut off from the database: records its execution in a file of
    its own process (``PGQ_TEST_RUNS_DIR``), which needs no network, for the test to load into fault_runs
    afterwards; sleeps in 10 ms slices, so that LeaseLost stops it at once. Returns who ran it."""
    req = _current_request.get()
    path = os.path.join(os.environ["PGQ_TEST_RUNS_DIR"], f"{os.getpid()}.runs")
    with open(path, "a") as runs:
        runs.write(f"start {req.id} {req.attempt} {os.getpid()} {time.time()}\n")
    interrupted = ""
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(0.01)
    except BaseException as exc:
        interrupted = type(exc).__name__
        raise
    finally:
        with open(path, "a") as runs:
            runs.write(f"end {req.id} {req.attempt} {os.getpid()} {time.time()} {interrupted}\n")
    return f"{os.getpid()}:{req.attempt}"
