"""Tasks for the limit tests (tests/test_limits.py); worker subprocesses load them with
``-A tests.limit_apps``. Each execution records its start and end (database clock) on a connection
cached per thread, like tests/fault_apps.py, so overlaps can be counted afterwards."""

from __future__ import annotations

import os
import threading
import time

import psycopg

import pgq
from pgq.tasks import _current_request

app = pgq.App()

REPORTS_CONCURRENCY = 2
KEY_CONCURRENCY = 2
PING_RATE = 5.0  # per second

app.queue("reports", concurrency=REPORTS_CONCURRENCY)

DDL = """
CREATE TABLE IF NOT EXISTS limit_runs (
    job_id bigint NOT NULL, attempt int NOT NULL, pid int NOT NULL, tenant int,
    started_at timestamptz NOT NULL DEFAULT clock_timestamp(), ended_at timestamptz
)
"""

_local = threading.local()


def _conn() -> psycopg.Connection:
    conn = getattr(_local, "conn", None)
    if conn is None or conn.closed or conn.broken:
        conn = psycopg.connect(app.database_url, autocommit=True)
        _local.conn = conn
    return conn


def _record(seconds: float, tenant: int | None = None) -> int:
    req = _current_request.get()
    conn = _conn()
    conn.execute("INSERT INTO limit_runs (job_id, attempt, pid, tenant) VALUES (%s, %s, %s, %s)",
                 (req.id, req.attempt, os.getpid(), tenant))
    if seconds:
        time.sleep(seconds)
    conn.execute("UPDATE limit_runs SET ended_at = clock_timestamp() WHERE job_id = %s AND attempt = %s",
                 (req.id, req.attempt))
    return req.id or 0


@app.task(name="limits.report", queue="reports")
def report(seconds: float = 0.0) -> int:
    return _record(seconds)


@app.task(name="limits.sync", queue="tenants", concurrency_key=lambda tenant, seconds=0.0: f"tenant:{tenant}",
          key_concurrency=KEY_CONCURRENCY)
def sync(tenant: int, seconds: float = 0.0) -> int:
    return _record(seconds, tenant)


@app.task(name="limits.ping", queue="pings", rate_limit=f"{PING_RATE:g}/s")
def ping() -> int:
    return _record(0.0)


MAIL_RATE = 10.0  # per second, a queue's rate limit

app.queue("mail", rate_limit=f"{MAIL_RATE:g}/s")


@app.task(name="limits.mail", queue="mail")
def mail() -> int:
    return _record(0.0)


@app.task(name="limits.plain", queue="reports_free")
def plain(seconds: float = 0.0) -> int:
    return _record(seconds)
