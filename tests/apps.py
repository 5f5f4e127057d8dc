"""Tasks the tests enqueue; worker subprocesses load them with ``-A tests.apps``.

Tasks that must leave evidence (executions, markers) write it to the test's own database through
``app.database_url``, so a test can wait on a condition instead of sleeping.
"""

from __future__ import annotations

import os
import time

import psycopg

import pgq

app = pgq.App()

EXECUTIONS_DDL = """
CREATE TABLE IF NOT EXISTS test_executions (
    job_id bigint NOT NULL, attempt int NOT NULL, worker_pid int NOT NULL,
    started_at timestamptz NOT NULL DEFAULT clock_timestamp(), ended_at timestamptz
)
"""


def _conn() -> psycopg.Connection:
    return psycopg.connect(app.database_url, autocommit=True)


@app.task(name="tests.add")
def add(x, y):
    return x + y


@app.task(name="tests.noop", ignore_result=True)
def noop():
    return None


@app.task(name="tests.echo")
def echo(*args, **kwargs):
    return {"args": list(args), "kwargs": kwargs}


@app.task(name="tests.fail", max_attempts=2, retry_backoff=0)
def fail(message="boom"):
    raise ValueError(message)


@app.task(name="tests.flaky", bind=True, max_attempts=5, retry_backoff=0.1)
def flaky(self, failures):
    """Fails on its first *failures* attempts, then returns the attempt number it succeeded on."""
    if self.request.attempt <= failures:
        raise RuntimeError(f"flaky failure on attempt {self.request.attempt}")
    return self.request.attempt


@app.task(name="tests.retry_me", bind=True, max_attempts=3)
def retry_me(self):
    if self.request.attempt < 3:
        raise self.retry(countdown=0.05, exc=KeyError("not yet"))
    return "third time"


@app.task(name="tests.record", lease_seconds=2)
def record(seconds=0.0):
    """Records its execution (start and end) in test_executions, for overlap checks."""
    from pgq.tasks import _current_request

    req = _current_request.get()
    with _conn() as c:
        c.execute(EXECUTIONS_DDL)
        c.execute("INSERT INTO test_executions (job_id, attempt, worker_pid) VALUES (%s, %s, %s)",
                  (req.id, req.attempt, os.getpid()))
        if seconds:
            time.sleep(seconds)
        c.execute("UPDATE test_executions SET ended_at = clock_timestamp() "
                  "WHERE job_id = %s AND attempt = %s AND worker_pid = %s", (req.id, req.attempt, os.getpid()))
    return req.id


@app.task(name="tests.sleep", lease_seconds=2, max_attempts=3)
def sleep(seconds):
    """Marks that it started (test_executions), then sleeps."""
    from pgq.tasks import _current_request

    req = _current_request.get()
    with _conn() as c:
        c.execute(EXECUTIONS_DDL)
        c.execute("INSERT INTO test_executions (job_id, attempt, worker_pid) VALUES (%s, %s, %s)",
                  (req.id, req.attempt, os.getpid()))
    time.sleep(seconds)
    return seconds


@app.task(name="tests.unserializable_result")
def unserializable_result():
    return object()


@app.task(name="emails.send", queue="emails")
def send_email(to):
    return f"sent to {to}"


@app.task(name="tests.whoami", bind=True)
def whoami(self, retry_first=False):
    """Returns what ``self.request`` says about the running job (and the thread it runs in)."""
    import threading

    req = self.request
    if retry_first and req.attempt == 1:
        raise self.retry(countdown=0)
    return {
        "id": req.id, "task_name": req.task_name, "attempt": req.attempt, "max_attempts": req.max_attempts,
        "retries": req.retries, "queue": req.queue, "args": list(req.args), "kwargs": dict(req.kwargs),
        "worker_id": req.worker_id, "thread": threading.current_thread().name,
    }


UNSTORABLE = {"nul": "a\x00b", "surrogate": "a\ud800b"}


@app.task(name="tests.unstorable_result")
def unstorable_result(kind):
    """A str Python serializes to JSON, but PostgreSQL cannot store (NUL in jsonb, a lone surrogate)."""
    return UNSTORABLE[kind]


@app.task(name="tests.unstorable_error", max_attempts=2, retry_backoff=0)
def unstorable_error(kind):
    """Fails with a message PostgreSQL text cannot hold."""
    raise ValueError(f"bad {UNSTORABLE[kind]} message")
