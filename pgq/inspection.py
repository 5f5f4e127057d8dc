"""Reading jobs and workers for people: ``pgq status``, ``pgq jobs list``, ``pgq jobs show`` and ``pgq workers``.

Each function returns plain dicts (JSON-ready apart from datetimes and timedeltas), so the CLI only
formats. Times come from the database clock, ages are computed against its ``now()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import psycopg
from psycopg.rows import dict_row

from . import sql
from .errors import JobNotFound
from .states import ALL, TERMINAL

STATES = tuple(str(s) for s in ALL)
FINISHED = tuple(str(s) for s in TERMINAL)
#: A worker heartbeats at least every 10 s; one silent for longer than this is dead or stuck.
STALE_WORKER = timedelta(seconds=30)
#: The windows ``pgq status`` counts finished jobs over, like a load average: (label, minutes).
WINDOWS = (("1m", 1), ("5m", 5), ("15m", 15))

# `pgq status`: the jobs of each queue that finished (for good) in the last 1, 5 and 15 minutes, by state.
# The `status IN (…)` condition matches jobs_finished_idx's predicate, so this reads the index range of the
# last 15 minutes only: 3 ms for the 8,500 jobs of that window in a table of 1,000,000 finished jobs. (Adding
# these counts to STATUS_COUNTS's pass over the whole table would cost 50 ms there.)
FINISHED_RECENTLY = """
SELECT queue, status,
       count(*) FILTER (WHERE finished_at > now() - interval '1 minute') AS last_1m,
       count(*) FILTER (WHERE finished_at > now() - interval '5 minutes') AS last_5m,
       count(*) AS last_15m
FROM pgq.jobs
WHERE status IN ('succeeded', 'failed', 'cancelled') AND finished_at > now() - interval '15 minutes'
GROUP BY queue, status
"""


def status(conn: psycopg.Connection) -> dict[str, Any]:
    """What ``pgq status`` shows: for each queue, its jobs per state (``counts``; every row of pgq.jobs is
    counted, so this grows with the table), how long its oldest due job has waited (``oldest_due``, None
    when none is due), and the jobs that finished in each of :data:`WINDOWS` (``finished``, by label, then
    state); the workers (:func:`list_workers`); and the database's ``now``."""
    row = conn.execute("SELECT now()").fetchone()
    now = row[0] if row else None
    queues: dict[str, dict[str, Any]] = {}

    def entry(queue: str) -> dict[str, Any]:
        return queues.setdefault(queue, {
            "counts": dict.fromkeys(STATES, 0), "oldest_due": None,
            "finished": {label: dict.fromkeys(FINISHED, 0) for label, _ in WINDOWS},
        })

    for queue, state, count, oldest in conn.execute(sql.STATUS_COUNTS).fetchall():
        e = entry(queue)
        e["counts"][state] = count
        if oldest is not None:
            e["oldest_due"] = max(e["oldest_due"] or timedelta(0), oldest)
    for queue, state, *counts in conn.execute(FINISHED_RECENTLY).fetchall():
        finished = entry(queue)["finished"]
        for (label, _), count in zip(WINDOWS, counts, strict=True):
            finished[label][state] = count
    return {"now": now, "queues": dict(sorted(queues.items())), "workers": list_workers(conn)}


def list_jobs(
    conn: psycopg.Connection,
    *,
    queue: str | None = None,
    task: str | None = None,
    states: Sequence[str] | None = None,
    older_than: timedelta | None = None,
    newer_than: timedelta | None = None,
    limit: int = 50,
    page: int = 1,
) -> list[dict[str, Any]]:
    """Jobs newest first (by id), filtered; *older_than*/*newer_than* compare the job's age (since it was
    enqueued) on the database clock. Page *page* (from 1) of *limit* jobs."""
    bad = sorted(set(states or ()) - set(STATES))
    if bad:
        raise ValueError(f"unknown state {', '.join(bad)} (states: {', '.join(STATES)})")
    if limit < 1 or page < 1:
        raise ValueError("limit and page start at 1")
    params = {
        "queue": queue, "task": task, "statuses": list(states) if states else None,
        "older": None if older_than is None else older_than.total_seconds(),
        "newer": None if newer_than is None else newer_than.total_seconds(),
        "limit": limit, "offset": (page - 1) * limit,
    }
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(sql.JOBS_LIST, params).fetchall()
    for row in rows:
        now = row.pop("now")
        row["age"] = now - row["created_at"]
        row["ran_for"] = _span(row["started_at"], row["finished_at"] or (now if row["status"] == "running" else None))
    return rows


def show_job(conn: psycopg.Connection, job_id: int) -> dict[str, Any]:
    """Everything pgq knows about one job: its row, its stored outcome, every failed attempt (``errors``,
    each with its traceback when the task raised) and its timings. Raises JobNotFound."""
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(sql.JOB_SHOW, {"id": job_id}).fetchone()
    if row is None:
        raise JobNotFound(f"no job with id {job_id}")
    now = row.pop("now")
    outcome = None
    if row["result_status"] is not None:
        outcome = {"status": row["result_status"], "result": row["result"], "error_type": row["error_type"],
                   "error_message": row["error_message"], "traceback": row["traceback"],
                   "recorded_at": row["result_at"]}
    for key in ("result_status", "result", "error_type", "error_message", "traceback", "result_at"):
        row.pop(key)
    row["outcome"] = outcome
    running_until = now if row["status"] == "running" else None
    row["timings"] = {
        "age": now - row["created_at"],
        # How long the latest attempt waited once it was due, ran, and the job's whole life.
        "waited": _span(row["run_at"], row["started_at"]) if row["started_at"] else None,
        "ran": _span(row["started_at"], row["finished_at"] or running_until),
        "total": _span(row["created_at"], row["finished_at"]),
        "due_in": row["run_at"] - now if row["status"] in ("queued", "retrying") and row["run_at"] > now else None,
        "lease_left": (row["lease_expires_at"] - now) if row["lease_expires_at"] is not None else None,
    }
    return row


def list_workers(conn: psycopg.Connection) -> list[dict[str, Any]]:
    """Every row of pgq.workers, oldest first, each with ``alive`` (heartbeat within 30 s) and the jobs it
    is running. A killed worker's row stays until a worker that shuts down cleanly forgets it."""
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(sql.WORKERS_LIST).fetchall()
    for row in rows:
        row["alive"] = row["since_heartbeat"] < STALE_WORKER
    return rows


def _span(start: Any, end: Any) -> timedelta | None:
    return end - start if start is not None and end is not None else None
