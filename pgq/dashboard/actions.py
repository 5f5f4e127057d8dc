"""The dashboard's actions (retry, cancel, delete) and signing in and out.

An action is a GET that shows a confirmation page, then a POST that pgq.dashboard.security must let
through (actions enabled, same origin, a signed session, its CSRF token) and that runs in one transaction.
The redirect after it carries only a key of NOTICES, never text of the request's own.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from .. import control, inspection
from ..errors import JobNotFound
from . import data
from .security import COOKIE, SESSION_SECONDS, same_origin

if TYPE_CHECKING:
    from .web import Dashboard

log = logging.getLogger("pgq.dashboard")

ACTIONS = ("retry", "cancel", "delete")
# Which states each action applies to (the buttons shown; the SQL checks again).
ACTION_STATES = {"retry": control.RETRYABLE, "cancel": ("queued", "retrying", "running"), "delete": data.FINISHED}
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
# A path to return to after signing in: this dashboard's own, in plain characters. No backslash, space or
# control character (browsers drop tabs and newlines: "/\t/evil.example" would become "//evil.example").
_SAFE_PATH = re.compile(r"/(?![/\\])[A-Za-z0-9_\-./?=&%+~]*")


def confirm(dash: Dashboard, request: Request) -> Response:
    job_id, action = request.path_params["job_id"], _action(request)
    _enabled(dash)
    if dash.guard.session_id(request.cookies.get(COOKIE)) is None:
        root = _root(request)
        return RedirectResponse(f"{root}/login?{urlencode({'next': f'{root}/jobs/{job_id}/{action}'})}", 303)
    with dash.connection() as conn:
        job = inspection.show_job(conn, job_id)
    return dash.render(request, "confirm.html", job=job, action=action,
                       applies=job["status"] in ACTION_STATES[action])


async def act(dash: Dashboard, request: Request) -> Response:
    job_id, action = request.path_params["job_id"], _action(request)
    form = await request.form()
    sid = check_post(dash, request, form.get("csrf_token"))
    notice = await run_in_threadpool(perform, dash, job_id, action)
    log.info("%s job %s: %s (session %s…, from %s)", action, job_id, notice, sid[:6], _client(request))
    if notice == "deleted":
        return RedirectResponse(f"{_root(request)}/jobs?{urlencode({'notice': notice})}", 303)
    return RedirectResponse(f"{_root(request)}/jobs/{job_id}?{urlencode({'notice': notice})}", 303)


def check_post(dash: Dashboard, request: Request, csrf: Any) -> str:
    """Refuse a POST unless actions are on, it comes from a page of this dashboard, and its session and CSRF
    token are valid; returns the session id."""
    _enabled(dash)
    if not _same_origin(request):
        raise HTTPException(403, "Refused: the request did not come from a page of this dashboard (its Origin "
                                 "header names another site, or it has none). Behind a proxy, pass the Host "
                                 "header through unchanged.")
    sid = dash.guard.session_id(request.cookies.get(COOKIE))
    if sid is None:
        raise HTTPException(403, "Refused: sign in with the dashboard's token first.")
    if not dash.guard.check_csrf(sid, csrf if isinstance(csrf, str) else None):
        raise HTTPException(403, "Refused: the form's CSRF token is missing or wrong. Reload the page and try again.")
    return sid


def perform(dash: Dashboard, job_id: int, action: str) -> str:
    """Run *action* on the job, in one transaction; returns the key of the notice to show."""
    with dash.connection() as conn:
        if action == "retry":
            with conn.transaction():
                status, done = control.requeue(conn, [job_id]).get(job_id, (None, False))
            if status is None:
                raise JobNotFound(f"no job with id {job_id}")
            return "retried" if done else ("retry-unique" if status in control.RETRYABLE else "retry-refused")
        if action == "cancel":
            with conn.transaction():
                after = control.cancel(conn, [job_id]).get(job_id)
            if after is None:
                raise JobNotFound(f"no job with id {job_id}")
            return {"cancelled": "cancelled", "running": "cancel-requested"}.get(after, "cancel-refused")
        deleted = data.delete_finished(conn, [job_id])
        if not deleted and conn.execute("SELECT 1 FROM pgq.jobs WHERE id = %s", (job_id,)).fetchone() is None:
            raise JobNotFound(f"no job with id {job_id}")
        return "deleted" if deleted else "delete-refused"


# --- signing in and out ---------------------------------------------------------------------------------


def login_page(dash: Dashboard, request: Request) -> Response:
    _enabled(dash)
    return dash.render(request, "login.html", next=safe_next(request.query_params.get("next"), _root(request)),
                       error=None)


async def login(dash: Dashboard, request: Request) -> Response:
    _enabled(dash)
    if not _same_origin(request):
        raise HTTPException(403, "Refused: the sign-in did not come from a page of this dashboard.")
    form = await request.form()
    target = safe_next(form.get("next"), _root(request))
    client = _client(request)
    if dash.guard.login_blocked(client):
        return dash.render(request, "login.html", status_code=429, next=target,
                           error="Too many wrong tokens from this address: wait a few minutes.")
    candidate = form.get("token")
    if not isinstance(candidate, str) or not dash.guard.check_token(candidate):
        dash.guard.login_failed(client)
        log.warning("wrong dashboard token from %s", client)
        return dash.render(request, "login.html", status_code=403, next=target, error="Wrong token.")
    log.info("signed in from %s", client)
    response = RedirectResponse(target, 303)
    response.set_cookie(COOKIE, dash.guard.new_session(), max_age=SESSION_SECONDS, httponly=True,
                        samesite="strict", secure=request.url.scheme == "https", path=_root(request) or "/")
    return response


async def logout(dash: Dashboard, request: Request) -> Response:
    form = await request.form()
    check_post(dash, request, form.get("csrf_token"))
    response = RedirectResponse(f"{_root(request)}/?notice=signed-out", 303)
    response.delete_cookie(COOKIE, path=_root(request) or "/", httponly=True, samesite="strict")
    return response


def safe_next(value: Any, root: str) -> str:
    """Where to go after signing in: a path of this dashboard only (never another site: no open redirect)."""
    if isinstance(value, str) and value.startswith(f"{root}/") and _SAFE_PATH.fullmatch(value[len(root):]):
        return value
    return f"{root}/"


def _enabled(dash: Dashboard) -> None:
    if not dash.guard.actions_enabled:
        raise HTTPException(403, dash.guard.why_read_only or "actions are disabled")


def _action(request: Request) -> str:
    action = request.path_params["action"]
    if action not in ACTIONS:
        raise HTTPException(404, f"no action {action!r}")
    return str(action)


def _same_origin(request: Request) -> bool:
    return same_origin(request.headers.get("origin"), request.headers.get("referer"), request.headers.get("host"))


def _root(request: Request) -> str:
    return str(request.scope.get("root_path", "")).rstrip("/")


def _client(request: Request) -> str:
    return request.client.host if request.client else "?"
