"""The dashboard's web application: Starlette routes rendering Jinja2 templates (autoescaped), htmx for the
overview's refresh and the job list's filters, and the actions behind pgq.dashboard.security.

Pages read through a small pool of autocommit connections, each statement bounded by statement_timeout,
so a slow search cannot hold a connection for long. Actions run in one transaction each.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jinja2
import psycopg
import psycopg.errors
from psycopg_pool import ConnectionPool
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import control, db, inspection, periodic
from ..errors import JobNotFound
from ..humanize import duration
from . import data
from .security import COOKIE, SESSION_SECONDS, Guard, same_origin

log = logging.getLogger("pgq.dashboard")

HERE = Path(__file__).parent
#: Seconds any one statement of the dashboard may run. Too low: searches over a big table fail; too high:
#: a careless search holds a connection (and a snapshot, holding back vacuum) that long.
STATEMENT_TIMEOUT = 15
#: Seconds between refreshes of the overview.
REFRESH_SECONDS = 5
ACTIONS = ("retry", "cancel", "delete")
# Which states each action applies to (the buttons shown; the SQL checks again).
ACTION_STATES = {"retry": control.RETRYABLE, "cancel": ("queued", "retrying", "running"),
                 "delete": data.FINISHED}
# Content-Security-Policy: scripts and styles only from the dashboard's own files, so even a payload that
# escaped the templates could not run. htmx is told not to inject its indicator <style> and not to eval.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
]
# What the page says after an action (the redirect carries only the key).
NOTICES = {
    "retried": "Retried: the job is queued again, due now.",
    "retry-unique": "Not retried: another job with the same unique key is waiting or running.",
    "retry-refused": "Not retried: only failed or cancelled jobs can be retried.",
    "cancelled": "Cancelled: the job will not run.",
    "cancel-requested": "Cancellation requested: its worker stops it at its next heartbeat.",
    "cancel-refused": "Not cancelled: the job had already finished.",
    "deleted": "The job and its result were deleted.",
    "delete-refused": "Not deleted: only finished jobs (succeeded, failed, cancelled) can be deleted, and none "
                      "that another session holds locked.",
    "signed-out": "Signed out.",
}


def create_app(database_url: str, *, token: str | None = None, read_only: bool = False,
               app: Any = None, pool_size: int = 4, refresh_seconds: float = REFRESH_SECONDS) -> Starlette:
    """The dashboard as an ASGI application. *app* (a pgq.App) adds its tasks' queues and its periodic
    schedules to the pages; the database alone is enough for everything else."""
    dash = Dashboard(database_url, Guard(token, read_only=read_only), app=app, pool_size=pool_size,
                     refresh_seconds=refresh_seconds)
    return dash.asgi


class Dashboard:
    def __init__(self, database_url: str, guard: Guard, *, app: Any = None, pool_size: int = 4,
                 refresh_seconds: float = REFRESH_SECONDS):
        self.database_url = database_url
        self.guard = guard
        self.pgq_app = app
        self.throughput = data.Throughput()
        self.pool = ConnectionPool(
            database_url, min_size=1, max_size=pool_size, open=False, name="pgq-dashboard", timeout=10,
            kwargs={"autocommit": True, "application_name": "pgq-dashboard",
                    "prepare_threshold": db.prepare_threshold(), "connect_timeout": db.CONNECT_TIMEOUT},
            configure=_configure, check=ConnectionPool.check_connection)
        env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                                 undefined=jinja2.StrictUndefined)
        env.filters.update(duration=duration, ts=_ts, pretty=_pretty, number=_number, history_ts=_history_ts)
        env.globals.update(refresh_seconds=f"{refresh_seconds:g}", states=data.STATES, action_states=ACTION_STATES)
        self.templates = Jinja2Templates(env=env)
        routes = [
            Route("/", self.overview_page, name="overview"),
            Route("/partials/overview", self.overview_partial, name="overview_partial"),
            Route("/jobs", self.jobs_page, name="jobs"),
            Route("/jobs/{job_id:int}", self.job_page, name="job"),
            Route("/jobs/{job_id:int}/{action:str}", self.confirm_page, name="confirm", methods=["GET"]),
            Route("/jobs/{job_id:int}/{action:str}", self.act, name="act", methods=["POST"]),
            Route("/workers", self.workers_page, name="workers"),
            Route("/schedules", self.schedules_page, name="schedules"),
            Route("/login", self.login_page, name="login", methods=["GET"]),
            Route("/login", self.login, methods=["POST"]),
            Route("/logout", self.logout, name="logout", methods=["POST"]),
            Route("/metrics", self.metrics, name="metrics"),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ]
        handlers: dict[Any, Callable[..., Any]] = {
            HTTPException: self._http_error,
            JobNotFound: self._not_found,
            psycopg.errors.InsufficientPrivilege: self._no_privilege,
            psycopg.errors.QueryCanceled: self._too_slow,
            psycopg.OperationalError: self._unavailable,
        }
        self.asgi = Starlette(routes=routes, exception_handlers=handlers, lifespan=self._lifespan,
                              middleware=[Middleware(SecurityHeaders)])
        self.asgi.state.dashboard = self

    @asynccontextmanager
    async def _lifespan(self, _: Starlette) -> Any:
        yield
        await run_in_threadpool(self.close)

    def close(self) -> None:
        self.pool.close()

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection]:
        if self.pool.closed:
            self.pool.open(wait=False)
        with self.pool.connection() as conn:
            yield conn

    # --- rendering --------------------------------------------------------------------------------

    def render(self, request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
        sid = self.guard.session_id(request.cookies.get(COOKIE))
        notice = NOTICES.get(request.query_params.get("notice", ""))
        base = {
            "root": request.scope.get("root_path", "").rstrip("/"),
            "actions_enabled": self.guard.actions_enabled,
            "why_read_only": self.guard.why_read_only,
            "signed_in": sid is not None,
            "csrf": self.guard.csrf_token(sid) if sid is not None else "",
            "notice": notice,
            "path": request.url.path,
        }
        return self.templates.TemplateResponse(request, template, {**base, **context}, status_code=status_code)

    def _error(self, request: Request, status: int, title: str, message: str) -> HTMLResponse:
        return self.render(request, "error.html", status_code=status, title=title, message=message)

    def _http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return self._error(request, exc.status_code, str(exc.status_code), exc.detail)

    def _not_found(self, request: Request, exc: Exception) -> Response:
        return self._error(request, 404, "Not found", str(exc))

    def _no_privilege(self, request: Request, exc: Exception) -> Response:
        return self._error(request, 403, "Permission denied",
                           f"The dashboard's database role may not do this: {_first_line(exc)}. See docs/dashboard.md, "
                           "“Least-privilege roles”: grant it `pgq grants --kind monitor` to read, and "
                           "`--kind control` too for actions.")

    def _too_slow(self, request: Request, exc: Exception) -> Response:
        return self._error(request, 503, "Too slow",
                           f"The query ran longer than {STATEMENT_TIMEOUT} s and was cancelled. Narrow the search "
                           "with a queue, task or state.")

    def _unavailable(self, request: Request, exc: Exception) -> Response:
        log.warning("database error: %s", _first_line(exc))
        return self._error(request, 503, "Database unavailable", _first_line(exc))

    # --- pages ------------------------------------------------------------------------------------

    def _known_queues(self) -> list[str]:
        tasks = getattr(self.pgq_app, "tasks", None) or {}
        return sorted({t.queue for t in tasks.values()})

    def _overview_context(self) -> dict[str, Any]:
        with self.connection() as conn:
            ov = data.overview(conn, self._known_queues(), self.throughput)
        return {"ov": ov, "chart_json": json.dumps(ov.chart)}

    def overview_page(self, request: Request) -> Response:
        return self.render(request, "overview.html", **self._overview_context())

    def overview_partial(self, request: Request) -> Response:
        return self.render(request, "_overview.html", **self._overview_context())

    def jobs_page(self, request: Request) -> Response:
        try:
            f = data.JobFilter.parse(request.query_params)
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None
        with self.connection() as conn:
            jobs, more = data.list_jobs(conn, f)
        tasks = sorted(getattr(self.pgq_app, "tasks", None) or {})
        context = {"jobs": jobs, "more": more, "f": f, "queues": self._known_queues(), "tasks": tasks,
                   "older": urlencode(f.query(before=jobs[-1]["id"])) if more and jobs else None,
                   "newest": urlencode(f.query(before=None)) if f.before else None}
        if request.headers.get("hx-request") and request.headers.get("hx-target") == "jobs-table":
            return self.render(request, "_jobs_table.html", **context)
        return self.render(request, "jobs.html", **context)

    def job_page(self, request: Request) -> Response:
        job_id = request.path_params["job_id"]
        with self.connection() as conn:
            job = inspection.show_job(conn, job_id)
        return self.render(request, "job.html", job=job, timeline=data.timeline(job))

    def workers_page(self, request: Request) -> Response:
        with self.connection() as conn:
            workers = inspection.list_workers(conn)
        return self.render(request, "workers.html", workers=workers)

    def schedules_page(self, request: Request) -> Response:
        schedules = list((getattr(self.pgq_app, "schedules", None) or {}).values())
        problem = None
        with self.connection() as conn:
            try:
                now, statuses = periodic.overview(conn, schedules)
            except psycopg.errors.InsufficientPrivilege as exc:
                # The monitor grants do not cover the tick table: show the app's schedules without their ticks.
                problem = _first_line(exc)
                now = conn.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
                statuses = [periodic.ScheduleStatus(s.name, s.task_name, s.describe(), s.zone, s.next_after(now),
                                                    None, None, None, None) for s in schedules]
        return self.render(request, "schedules.html", now=now, schedules=statuses, problem=problem,
                           app_known=self.pgq_app is not None)

    # --- actions ----------------------------------------------------------------------------------

    def confirm_page(self, request: Request) -> Response:
        job_id, action = request.path_params["job_id"], request.path_params["action"]
        if action not in ACTIONS:
            raise HTTPException(404, f"no action {action!r}")
        if not self.guard.actions_enabled:
            raise HTTPException(403, self.guard.why_read_only or "actions are disabled")
        if self.guard.session_id(request.cookies.get(COOKIE)) is None:
            target = f"{request.scope.get('root_path', '')}/jobs/{job_id}/{action}"
            return RedirectResponse(f"{request.scope.get('root_path', '')}/login?{urlencode({'next': target})}", 303)
        with self.connection() as conn:
            job = inspection.show_job(conn, job_id)
        return self.render(request, "confirm.html", job=job, action=action,
                           applies=job["status"] in ACTION_STATES[action])

    async def act(self, request: Request) -> Response:
        job_id, action = request.path_params["job_id"], request.path_params["action"]
        if action not in ACTIONS:
            raise HTTPException(404, f"no action {action!r}")
        form = await request.form()
        sid = self._check_post(request, form.get("csrf_token"))
        assert sid is not None
        notice = await run_in_threadpool(self._perform, job_id, action)
        log.info("%s job %s: %s (session %s…, from %s)", action, job_id, notice, sid[:6], _client(request))
        root = request.scope.get("root_path", "")
        if notice == "deleted":
            return RedirectResponse(f"{root}/jobs?{urlencode({'notice': notice})}", 303)
        return RedirectResponse(f"{root}/jobs/{job_id}?{urlencode({'notice': notice})}", 303)

    def _check_post(self, request: Request, csrf: Any) -> str | None:
        """Refuse a POST unless actions are on, it comes from this site, and its session and CSRF token are
        valid; returns the session id."""
        if not self.guard.actions_enabled:
            raise HTTPException(403, self.guard.why_read_only or "actions are disabled")
        if not same_origin(request.headers.get("origin"), request.headers.get("referer"), request.headers.get("host")):
            raise HTTPException(403, "Refused: the request did not come from a page of this dashboard (its Origin "
                                     "header names another site, or it has none). Behind a proxy, pass the Host "
                                     "header through unchanged.")
        sid = self.guard.session_id(request.cookies.get(COOKIE))
        if sid is None:
            raise HTTPException(403, "Refused: sign in with the dashboard's token first.")
        if not self.guard.check_csrf(sid, csrf if isinstance(csrf, str) else None):
            raise HTTPException(403, "Refused: the form's CSRF token is missing or wrong. Reload the page and try "
                                     "again.")
        return sid

    def _perform(self, job_id: int, action: str) -> str:
        with self.connection() as conn:
            if action == "retry":
                with conn.transaction():
                    status, done = control.requeue(conn, [job_id]).get(job_id, (None, False))
                if status is None:
                    raise JobNotFound(f"no job with id {job_id}")
                return "retried" if done else ("retry-unique" if status in control.RETRYABLE else "retry-refused")
            if action == "cancel":
                with conn.transaction():
                    status = control.cancel(conn, [job_id]).get(job_id)
                if status is None:
                    raise JobNotFound(f"no job with id {job_id}")
                return {"cancelled": "cancelled", "running": "cancel-requested"}.get(status, "cancel-refused")
            deleted = data.delete_finished(conn, [job_id])
            if not deleted and conn.execute("SELECT 1 FROM pgq.jobs WHERE id = %s", (job_id,)).fetchone() is None:
                raise JobNotFound(f"no job with id {job_id}")
            return "deleted" if deleted else "delete-refused"

    # --- signing in and out -------------------------------------------------------------------------

    def login_page(self, request: Request) -> Response:
        if not self.guard.actions_enabled:
            raise HTTPException(403, self.guard.why_read_only or "actions are disabled")
        return self.render(request, "login.html", next=_safe_next(request.query_params.get("next"), request),
                           error=None)

    async def login(self, request: Request) -> Response:
        if not self.guard.actions_enabled:
            raise HTTPException(403, self.guard.why_read_only or "actions are disabled")
        if not same_origin(request.headers.get("origin"), request.headers.get("referer"), request.headers.get("host")):
            raise HTTPException(403, "Refused: the login did not come from a page of this dashboard.")
        form = await request.form()
        target = _safe_next(form.get("next"), request)
        client = _client(request)
        if self.guard.login_blocked(client):
            return self.render(request, "login.html", status_code=429, next=target,
                               error="Too many wrong tokens from this address: wait a few minutes.")
        candidate = form.get("token")
        if not isinstance(candidate, str) or not self.guard.check_token(candidate):
            self.guard.login_failed(client)
            log.warning("wrong dashboard token from %s", client)
            return self.render(request, "login.html", status_code=403, next=target, error="Wrong token.")
        response = RedirectResponse(target, 303)
        response.set_cookie(COOKIE, self.guard.new_session(), max_age=SESSION_SECONDS, httponly=True,
                            samesite="strict", secure=request.url.scheme == "https",
                            path=request.scope.get("root_path", "") or "/")
        return response

    async def logout(self, request: Request) -> Response:
        form = await request.form()
        self._check_post(request, form.get("csrf_token"))
        root = request.scope.get("root_path", "")
        response = RedirectResponse(f"{root}/?notice=signed-out", 303)
        response.delete_cookie(COOKIE, path=root or "/", httponly=True, samesite="strict")
        return response

    # --- Prometheus -------------------------------------------------------------------------------

    def metrics(self, request: Request) -> Response:
        try:
            from ..metrics import render_database
        except ImportError as exc:
            raise HTTPException(501, f"metrics are not available in this pgq ({exc})") from None
        body, content_type = render_database(self.database_url)
        return Response(body, headers={"content-type": content_type})


class SecurityHeaders:
    """Adds the security headers to every response (pure ASGI, so streaming and static files keep working)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(n, v) for n, v in SECURITY_HEADERS
                         if n not in names and not (n == b"cache-control" and "/static/" in scope["path"])]
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _configure(conn: psycopg.Connection) -> None:
    conn.execute(f"SET statement_timeout = '{STATEMENT_TIMEOUT}s'")
    # Minutes of the chart are UTC minutes, whatever the server's TimeZone (no DST jumps in the buckets).
    conn.execute("SET TimeZone = 'UTC'")


def _safe_next(value: Any, request: Request) -> str:
    """Where to go after signing in: a path of this dashboard only (never another site: no open redirect)."""
    root = request.scope.get("root_path", "")
    if isinstance(value, str) and value.startswith(f"{root}/") and not value.startswith("//") and "\\" not in value \
            and "\n" not in value and "\r" not in value:
        return value
    return f"{root}/"


def _client(request: Request) -> str:
    return request.client.host if request.client else "?"


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _ts(value: datetime | None) -> str:
    if value is None:
        return "-"
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _history_ts(value: Any) -> str:
    """A time from the error history (ISO text), shown like the others; anything else as it is."""
    parsed = data.parse_time(value)
    return _ts(parsed) if parsed is not None else str(value)


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=False)


def _number(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else str(value)
