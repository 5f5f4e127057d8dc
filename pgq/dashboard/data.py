"""What the dashboard's pages show, read from the database, and the one action pgq.control lacks (delete).

Functions take a psycopg connection and return plain dicts and lists, so the web layer only renders, and
tests call them directly. Times come from the database clock.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg.rows import dict_row

from ..states import ALL, TERMINAL
from . import queries

STATES = tuple(str(s) for s in ALL)
FINISHED = tuple(str(s) for s in TERMINAL)
#: Minutes the throughput chart covers.
CHART_MINUTES = 60
#: Jobs per page of the job list.
PAGE_SIZE = 50
_FRACTION = re.compile(r"\.(\d{1,6})(?=\d*(?:[+-]\d\d:?\d\d|Z)?$)")
#: Longest search text; a search is an ILIKE over the arguments of every job it passes.
MAX_SEARCH = 200


@dataclass
class Overview:
    now: datetime
    queues: list[dict[str, Any]]  # one per queue: waiting/running counts, finished in the last hour
    chart: dict[str, list[float]]  # x (unix seconds of each minute), succeeded, failed, cancelled
    estimates: dict[str, int] | None  # rows per state, the planner's estimate (None: never analyzed)
    estimated_total: int
    failures: list[dict[str, Any]]  # the latest jobs that failed for good, last 24 h
    workers_alive: int
    workers_total: int

    @property
    def last_hour(self) -> dict[str, int]:
        return {state: sum(q[state] for q in self.queues) for state in FINISHED}


class Throughput:
    """Jobs finished per minute, queue and state over the last CHART_MINUTES minutes, read incrementally.

    A minute's count is final once the minute is over (a job's finished_at is the time of its recording
    transaction, which lasts milliseconds), so the counts of minutes older than the previous one are kept
    here and only the last two minutes are read again on each refresh. The first read covers the whole
    hour: 3 ms at 100 jobs/minute, 900 ms at 1,000,000 jobs in the hour; later reads cost two minutes' worth.
    Jobs deleted afterwards (pruned, deleted by hand) stay counted: the chart shows what happened.
    """

    REREAD = 2  # minutes read again on every refresh: the current one and the one before

    def __init__(self, minutes: int = CHART_MINUTES):
        self.minutes = minutes
        self._final: dict[datetime, list[tuple[str, str, int]]] = {}
        self._lock = threading.Lock()

    def read(self, conn: psycopg.Connection, minute: datetime) -> dict[datetime, list[tuple[str, str, int]]]:
        """Rows (queue, state, jobs) for each minute of the window ending with *minute* (the current minute,
        from the database's clock), oldest first."""
        start = minute - timedelta(minutes=self.minutes - 1)
        window = [start + timedelta(minutes=i) for i in range(self.minutes)]
        with self._lock:
            known = {m: rows for m, rows in self._final.items() if m >= start}
        since = start
        while since in known and since < minute - timedelta(minutes=self.REREAD - 1):
            since += timedelta(minutes=1)
        fresh: dict[datetime, list[tuple[str, str, int]]] = {m: [] for m in window if m >= since}
        # `since` comes from the database's clock (STATE_ESTIMATES' date_trunc of now()), not Python's.
        for at, queue, status, jobs in conn.execute(queries.FINISHED_SINCE, {"since": since}).fetchall():
            if at in fresh:
                fresh[at].append((queue, status, jobs))
        final_before = minute - timedelta(minutes=self.REREAD - 1)
        with self._lock:
            self._final = {**known, **{m: rows for m, rows in fresh.items() if m < final_before}}
        return {m: fresh[m] if m in fresh else known.get(m, []) for m in window}


def overview(conn: psycopg.Connection, known_queues: Iterable[str] = (),
             throughput: Throughput | None = None) -> Overview:
    """Queues (exact counts of waiting and running jobs; finished ones over the last hour), the per-minute
    throughput chart, estimated totals per state, the latest failures and the live workers. None of it
    reads more than the last hour of finished jobs (with *throughput* kept between calls: the last two
    minutes)."""
    now, minute, reltuples, values, freqs = conn.execute(queries.STATE_ESTIMATES).fetchone()  # type: ignore[misc]
    queues: dict[str, dict[str, Any]] = {name: _queue_row(name) for name in known_queues}
    with conn.cursor(row_factory=dict_row) as cur:
        for row in cur.execute(queries.QUEUE_DEPTHS).fetchall():
            queues.setdefault(row["queue"], _queue_row(row["queue"])).update(row)
        failures = cur.execute(queries.LATEST_FAILURES, {"limit": 10}).fetchall()
    chart: dict[str, list[float]] = {"x": [], **{state: [] for state in FINISHED}}
    for at, rows in (throughput or Throughput()).read(conn, minute).items():
        counts = dict.fromkeys(FINISHED, 0)
        for queue, status, jobs in rows:
            counts[status] += jobs
            queues.setdefault(queue, _queue_row(queue))[status] += jobs
        chart["x"].append(at.timestamp())
        for state in FINISHED:
            chart[state].append(float(counts[state]))
    estimates = None
    if values is not None and freqs is not None:
        estimates = dict.fromkeys(STATES, 0)
        for value, freq in zip(values, freqs, strict=True):
            if value in estimates:
                estimates[value] = round(reltuples * freq)
    alive, total = conn.execute(queries.WORKER_COUNTS).fetchone()  # type: ignore[misc]
    return Overview(now=now, queues=sorted(queues.values(), key=lambda q: q["queue"]), chart=chart,
                    estimates=estimates, estimated_total=reltuples or 0, failures=failures,
                    workers_alive=alive, workers_total=total)


def _queue_row(name: str) -> dict[str, Any]:
    return {"queue": name, "ready": 0, "scheduled": 0, "retrying": 0, "running": 0, "stuck": 0,
            "oldest_due": None, **dict.fromkeys(FINISHED, 0)}


@dataclass
class JobFilter:
    queue: str | None = None
    task: str | None = None
    state: str | None = None
    search: str | None = None
    before: int | None = None

    @classmethod
    def parse(cls, params: Any) -> JobFilter:
        """From query parameters (anything with .get); empty values are no filter, nonsense is refused."""
        def text(name: str, limit: int = 200) -> str | None:
            value = (params.get(name) or "").strip()
            if len(value) > limit:
                raise ValueError(f"{name} is longer than {limit} characters")
            return value or None

        state = text("state")
        if state is not None and state not in STATES:
            raise ValueError(f"unknown state {state!r}")
        before = text("before", 20)
        if before is not None and not before.isdigit():
            raise ValueError("before must be a job id")
        return cls(queue=text("queue"), task=text("task"), state=state, search=text("q", MAX_SEARCH),
                   before=None if before is None else int(before))

    def query(self, **override: Any) -> dict[str, str]:
        """The query parameters of this filter (with *override*), for links."""
        values = {"queue": self.queue, "task": self.task, "state": self.state, "q": self.search,
                  "before": self.before, **override}
        return {k: str(v) for k, v in values.items() if v not in (None, "")}


def list_jobs(conn: psycopg.Connection, f: JobFilter, limit: int = PAGE_SIZE) -> tuple[list[dict[str, Any]], bool]:
    """A page of jobs, newest first, and whether there are older ones."""
    search_id = int(f.search.lstrip("#")) if f.search and f.search.lstrip("#").isdigit() else None
    pattern = None
    if f.search and search_id is None:
        escaped = f.search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        pattern = f"%{escaped}%"
    params = {"queue": f.queue, "task": f.task, "statuses": [f.state] if f.state else None, "before": f.before,
              "search_id": search_id, "pattern": pattern, "limit": limit + 1}
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(queries.JOBS_PAGE, params).fetchall()
    return rows[:limit], len(rows) > limit


def timeline(job: dict[str, Any]) -> list[dict[str, Any]]:
    """The events of a job's life (from pgq.inspection.show_job), oldest first: enqueued, due, each failed
    attempt and retry by hand from its error history, the latest start, and its end."""
    events = [{"at": job["created_at"], "what": "enqueued", "detail": f"queue {job['queue']}"}]
    if job["run_at"] > job["created_at"] and (job["started_at"] is None or job["run_at"] <= job["started_at"]):
        events.append({"at": job["run_at"], "what": "due", "detail": ""})
    for entry in job["errors"] or []:
        at = parse_time(entry.get("at"))
        kind = entry.get("type", "?")
        if kind == "ManualRetry":
            events.append({"at": at, "what": "retried by hand", "detail": entry.get("message", "")})
        else:
            events.append({"at": at, "what": f"attempt {entry.get('attempt', '?')} failed",
                           "detail": f"{kind}: {entry.get('message', '')}"})
    if job["started_at"] is not None:
        events.append({"at": job["started_at"], "what": f"attempt {job['attempts']} started",
                       "detail": job["worker_id"] or ""})
    if job["cancel_requested_at"] is not None:
        events.append({"at": job["cancel_requested_at"], "what": "cancellation requested", "detail": ""})
    if job["finished_at"] is not None:
        events.append({"at": job["finished_at"], "what": job["status"], "detail": ""})
    epoch = job["created_at"]
    return sorted(events, key=lambda e: e["at"] or epoch)


def parse_time(value: Any) -> datetime | None:
    """A timestamp of the error history (JSON text written by PostgreSQL); None when it is not one."""
    if not isinstance(value, str):
        return None
    # PostgreSQL trims trailing zeros of the fraction ("…:24.20217+00:00"); Python 3.10 wants 3 or 6 digits.
    value = _FRACTION.sub(lambda m: "." + m.group(1).ljust(6, "0"), value, count=1)
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def delete_finished(conn: psycopg.Connection, ids: Sequence[int]) -> list[int]:
    """Delete the finished jobs (succeeded, failed, cancelled) among *ids*, and their stored outcomes, in one
    transaction; returns the ids deleted. Waiting and running jobs are never deleted (cancel them first)."""
    job_ids = list(dict.fromkeys(int(i) for i in ids))
    if not job_ids:
        raise ValueError("no job ids given")
    with conn.transaction():
        return [row[0] for row in conn.execute(queries.DELETE_FINISHED, {"ids": job_ids}).fetchall()]
