"""The dashboard's read-only pages: overview, jobs, one job, workers, schedules, and /metrics.

Each is a function of the Dashboard and the request, run in Starlette's thread pool (psycopg is used
synchronously); each reads through one pooled connection and renders one template.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlencode

import psycopg.errors
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from .. import inspection, periodic
from . import data

if TYPE_CHECKING:
    from .web import Dashboard


def known_queues(dash: Dashboard) -> list[str]:
    """The queues of the app's tasks: listed on the overview even while empty."""
    tasks = getattr(dash.pgq_app, "tasks", None) or {}
    return sorted({t.queue for t in tasks.values()})


def _overview(dash: Dashboard) -> data.Overview:
    with dash.connection() as conn:
        return data.overview(conn, known_queues(dash), dash.throughput)


def overview(dash: Dashboard, request: Request) -> Response:
    return dash.render(request, "overview.html", ov=_overview(dash))


def overview_partial(dash: Dashboard, request: Request) -> Response:
    """The overview's numbers, which htmx swaps in every few seconds."""
    return dash.render(request, "_overview.html", ov=_overview(dash))


def jobs(dash: Dashboard, request: Request) -> Response:
    try:
        f = data.JobFilter.parse(request.query_params)
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from None
    with dash.connection() as conn:
        rows, more = data.list_jobs(conn, f)
    tasks = sorted(getattr(dash.pgq_app, "tasks", None) or {})
    context = {"jobs": rows, "more": more, "f": f, "queues": known_queues(dash), "tasks": tasks,
               "older": urlencode(f.query(before=rows[-1]["id"])) if more and rows else None,
               "newest": urlencode(f.query(before=None)) if f.before else None}
    if request.headers.get("hx-request") and request.headers.get("hx-target") == "jobs-table":
        return dash.render(request, "_jobs_table.html", **context)  # the filters changed: the table only
    return dash.render(request, "jobs.html", **context)


def job(dash: Dashboard, request: Request) -> Response:
    with dash.connection() as conn:
        row = inspection.show_job(conn, request.path_params["job_id"])
    return dash.render(request, "job.html", job=row, timeline=data.timeline(row))


def workers(dash: Dashboard, request: Request) -> Response:
    with dash.connection() as conn:
        rows = inspection.list_workers(conn)
    return dash.render(request, "workers.html", workers=rows)


def schedules(dash: Dashboard, request: Request) -> Response:
    known = list((getattr(dash.pgq_app, "schedules", None) or {}).values())
    problem = None
    with dash.connection() as conn:
        try:
            now, statuses = periodic.overview(conn, known)
        except psycopg.errors.InsufficientPrivilege as exc:
            # The monitor grants do not cover the tick table: show the app's schedules without their ticks.
            problem = first_line(exc)
            now = conn.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
            statuses = [periodic.ScheduleStatus(s.name, s.task_name, s.describe(), s.zone, s.next_after(now),
                                                None, None, None, None) for s in known]
    return dash.render(request, "schedules.html", now=now, schedules=statuses, problem=problem,
                       app_known=dash.pgq_app is not None)


def metrics(dash: Dashboard, request: Request) -> Response:
    """The database's state for Prometheus (pgq.metrics.render_database; it reports pgq_up 0 itself when the
    database is unreachable)."""
    try:
        from ..metrics import render_database
    except ImportError as exc:
        raise HTTPException(501, f"metrics are not available in this pgq ({exc})") from None
    body, content_type = render_database(dash.database_url)
    return Response(body, headers={"content-type": content_type})


def first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


