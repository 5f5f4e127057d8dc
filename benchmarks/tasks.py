"""The benchmark's own tasks, run by ``python -m pgq.cli -A benchmarks.tasks worker`` from the repo root.

The app has no URL of its own: the worker gets ``--database-url`` and run.py calls ``set_database_url``.
"""

from __future__ import annotations

import os
import time
from typing import Any

import pgq

app = pgq.App()

#: The wake-up benchmark's table: when each task function was entered, on the database clock.
WAKE_TABLE = "bench_wake"
#: The recovery benchmark's table: each attempt of a `bench.hold` job, when it started and in which process.
RECOVERY_TABLE = "bench_recovery"


@app.task(name="bench.noop")
def noop() -> None:
    """Does nothing; its result (null) is stored in pgq.results."""


@app.task(name="bench.noop_ignore", ignore_result=True)
def noop_ignore() -> None:
    """Does nothing, and no result row is written."""


@app.task(name="bench.wake", bind=True, ignore_result=True)
def wake(self: Any) -> None:
    """Records the moment it was entered, as the database's clock_timestamp(): one statement on pgq's
    autocommit pool, one round trip, like the peers' wake-up tasks (app.connection() opens a transaction:
    psycopg sends BEGIN in a round trip of its own before the INSERT, which was counted as wake-up)."""
    app.run(lambda conn: conn.execute(f"INSERT INTO {WAKE_TABLE} (job_id, entered_at) VALUES (%s, clock_timestamp())",
                                      (self.request.id,)))


@app.task(name="bench.hold", bind=True, ignore_result=True)
def hold(self: Any, seconds: float) -> None:
    """Records its start (job, attempt, pid, the database's clock_timestamp()), then sleeps: a job that keeps
    its worker busy until benchmarks/recovery.py kills it."""
    app.run(lambda conn: conn.execute(
        f"INSERT INTO {RECOVERY_TABLE} (job_id, attempt, pid, started_at) VALUES (%s, %s, %s, clock_timestamp())",
        (self.request.id, self.request.attempt, os.getpid())))
    time.sleep(seconds)
