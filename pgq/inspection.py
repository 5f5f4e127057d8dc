"""Reading jobs and workers for people: ``pgq jobs list``, ``pgq jobs show`` and ``pgq workers``.

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
from .states import ALL

STATES = tuple(str(s) for s in ALL)
#: A worker heartbeats at least every 10 s; one silent for longer than this is dead or stuck.
STALE_WORKER = timedelta(seconds=30)


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
