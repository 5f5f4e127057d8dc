"""Tasks for the job-control tests (unique jobs, cancellation, retry policies, manual retry); worker
subprocesses load them with ``-A tests.control_apps``. What a task does is recorded in ``control_runs``
in the test's own database, so a test waits on a condition instead of sleeping."""

from __future__ import annotations

import time
from datetime import timedelta

import psycopg

import pgq
from pgq.tasks import _current_request

app = pgq.App()

DDL = """
CREATE TABLE IF NOT EXISTS control_runs (
    job_id bigint NOT NULL, attempt int NOT NULL, event text NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE TABLE IF NOT EXISTS control_switches (name text PRIMARY KEY)
"""


def note(event: str) -> None:
    req = _current_request.get()
    with psycopg.connect(app.database_url, autocommit=True) as conn:
        conn.execute("INSERT INTO control_runs (job_id, attempt, event) VALUES (%s, %s, %s)",
                     (req.id, req.attempt, event))


def switched_on(name: str) -> bool:
    with psycopg.connect(app.database_url, autocommit=True) as conn:
        return conn.execute("SELECT 1 FROM control_switches WHERE name = %s", (name,)).fetchone() is not None


# --- unique jobs -----------------------------------------------------------------------------------

@app.task(name="control.add", unique=True)
def add(x, y=0):
    return x + y


@app.task(name="control.welcome", unique_key=lambda user_id, **_: f"welcome:{user_id}",
          unique_for=timedelta(hours=1))
def welcome(user_id, note=None):
    return f"welcome {user_id}"


@app.task(name="control.plain")
def plain(value=None):
    return value


# --- cancellation --------------------------------------------------------------------------------

@app.task(name="control.spin", bind=True, lease_seconds=2, max_attempts=3)
def spin(self, seconds=60.0):
    """Python that keeps running (short sleeps) until it is interrupted; records how it ended."""
    note("started")
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            time.sleep(0.01)
    except pgq.CancelRequested:
        note("interrupted")
        raise
    finally:
        if self.is_cancelled():
            note("saw is_cancelled")
    note("finished")
    return "not cancelled"


@app.task(name="control.block", lease_seconds=2, max_attempts=1)
def block(seconds):
    """One blocking C call: an interruption cannot reach it until it returns."""
    note("started")
    time.sleep(seconds)
    note("returned")


# --- retry policies and manual retry -------------------------------------------------------------

EXCEPTIONS = {"TimeoutError": TimeoutError, "ValueError": ValueError, "KeyError": KeyError,
              "ConnectionError": ConnectionError, "ConnectionRefusedError": ConnectionRefusedError,
              "OSError": OSError}


@app.task(name="control.policy", bind=True, max_attempts=4, retry_backoff=0,
          retry_on={TimeoutError: pgq.Backoff(base=0.01, cap=0.05, jitter=False)},
          discard_on=(ValueError,))
def policy(self, raises):
    """Raises ``raises[attempt - 1]`` (an exception class name), or returns the attempt number."""
    note("run")
    if self.request.attempt <= len(raises):
        raise EXCEPTIONS[raises[self.request.attempt - 1]](f"attempt {self.request.attempt}")
    return self.request.attempt


@app.task(name="control.autoretry", bind=True, max_attempts=3, retry_backoff=0,
          autoretry_for=(ConnectionError,), discard_on=(ConnectionRefusedError,))
def autoretry(self, raises):
    note("run")
    raise EXCEPTIONS[raises](f"attempt {self.request.attempt}")


@app.task(name="control.until_switched", max_attempts=2, retry_backoff=0)
def until_switched(name):
    """Fails until the switch *name* is on."""
    note("run")
    if not switched_on(name):
        raise RuntimeError(f"switch {name} is off")
    return f"{name} is on"
