"""The dashboard's web application: the routes (pages in pgq.dashboard.pages, actions in
pgq.dashboard.actions), Jinja2 templates with autoescaping, the database pool, error pages and the security
headers.

Pages read through a small pool of autocommit connections, each statement bounded by statement_timeout,
so a slow search cannot hold a connection for long. Actions run in one transaction each.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import jinja2
import psycopg
import psycopg.errors
from psycopg_pool import ConnectionPool
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import db
from ..errors import JobNotFound
from ..humanize import duration
from . import actions, data, pages
from .pages import first_line
from .security import COOKIE, Guard

log = logging.getLogger("pgq.dashboard")

HERE = Path(__file__).parent
#: Seconds any one statement of the dashboard may run. Too low: searches over a big table fail; too high:
#: a careless search holds a connection (and a snapshot, holding back vacuum) that long.
STATEMENT_TIMEOUT = 15
#: Seconds between refreshes of the overview.
REFRESH_SECONDS = 5
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


def create_app(database_url: str, *, token: str | None = None, read_only: bool = False,
               app: Any = None, pool_size: int = 4, refresh_seconds: float = REFRESH_SECONDS) -> Starlette:
    """The dashboard as an ASGI application. *app* (a pgq.App) adds its tasks' queues and its periodic
    schedules to the pages; the database alone is enough for everything else."""
    dash = Dashboard(database_url, Guard(token, read_only=read_only), app=app, pool_size=pool_size,
                     refresh_seconds=refresh_seconds)
    return dash.asgi


class Dashboard:
    """One dashboard: its database pool, its guard (token and sessions), its templates and routes."""

    def __init__(self, database_url: str, guard: Guard, *, app: Any = None, pool_size: int = 4,
                 refresh_seconds: float = REFRESH_SECONDS):
        self.database_url = database_url
        self.guard = guard
        self.pgq_app = app
        self.throughput = data.Throughput()
        self.pool_size = pool_size
        self._pool: ConnectionPool | None = None
        self._pool_lock = threading.Lock()
        env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                                 undefined=jinja2.StrictUndefined)
        env.filters.update(duration=duration, ts=_ts, pretty=_pretty, number=_number, history_ts=_history_ts)
        env.globals.update(refresh_seconds=f"{refresh_seconds:g}", states=data.STATES,
                           action_states=actions.ACTION_STATES)
        self.templates = Jinja2Templates(env=env)

        def page(fn: Callable[..., Any]) -> Callable[..., Any]:
            return functools.partial(fn, self)

        routes = [
            Route("/", page(pages.overview), name="overview"),
            Route("/partials/overview", page(pages.overview_partial), name="overview_partial"),
            Route("/jobs", page(pages.jobs), name="jobs"),
            Route("/jobs/{job_id:int}", page(pages.job), name="job"),
            Route("/jobs/{job_id:int}/{action:str}", page(actions.confirm), name="confirm", methods=["GET"]),
            Route("/jobs/{job_id:int}/{action:str}", page(actions.act), name="act", methods=["POST"]),
            Route("/workers", page(pages.workers), name="workers"),
            Route("/schedules", page(pages.schedules), name="schedules"),
            Route("/login", page(actions.login_page), name="login", methods=["GET"]),
            Route("/login", page(actions.login), name="login_post", methods=["POST"]),
            Route("/logout", page(actions.logout), name="logout", methods=["POST"]),
            Route("/metrics", page(pages.metrics), name="metrics"),
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
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection]:
        """A pooled autocommit connection (the pool opens on first use, and again after close())."""
        with self._pool_lock:
            if self._pool is None:
                self._pool = ConnectionPool(
                    self.database_url, min_size=1, max_size=self.pool_size, open=True, name="pgq-dashboard",
                    timeout=10, configure=_configure, check=ConnectionPool.check_connection,
                    kwargs={"autocommit": True, "application_name": "pgq-dashboard",
                            "prepare_threshold": db.prepare_threshold(), "connect_timeout": db.CONNECT_TIMEOUT})
            pool = self._pool
        with pool.connection() as conn:
            yield conn

    # --- rendering --------------------------------------------------------------------------------

    def render(self, request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
        sid = self.guard.session_id(request.cookies.get(COOKIE))
        notice = actions.NOTICES.get(request.query_params.get("notice", ""))
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
                           f"The dashboard's database role may not do this: {first_line(exc)}. See docs/dashboard.md, "
                           "“Least-privilege roles”: grant it `pgq grants --kind monitor` to read, and "
                           "`--kind control` too for actions.")

    def _too_slow(self, request: Request, exc: Exception) -> Response:
        return self._error(request, 503, "Too slow",
                           f"The query ran longer than {STATEMENT_TIMEOUT} s and was cancelled. Narrow the search "
                           "with a queue, task or state.")

    def _unavailable(self, request: Request, exc: Exception) -> Response:
        log.warning("database error: %s", first_line(exc))
        return self._error(request, 503, "Database unavailable", first_line(exc))


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
