"""Who may act: the token, the signed session cookie, CSRF tokens and the same-origin check.

Reading pages needs nothing (keep the dashboard on loopback or behind a proxy that authenticates). Every
action (retry, cancel, delete) needs all of: actions enabled (a token given, no --read-only), a session
cookie signed with a key derived from the token (set by the login form), the CSRF token of that session in
the form, and an Origin (or Referer) header naming this host. Pure code: no database, no web framework.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections import deque
from urllib.parse import urlsplit

COOKIE = "pgq_dashboard_session"
#: How long a login lasts. Too long: a cookie left in a shared browser acts for days; too short: people
#: type the token over and over.
SESSION_SECONDS = 12 * 3600
#: Failed logins allowed per client address in LOGIN_WINDOW seconds before logins are refused for a while.
LOGIN_FAILURES = 10
LOGIN_WINDOW = 300.0


class Guard:
    """Signs and checks sessions and CSRF tokens. *token* None (or *read_only*) disables every action."""

    def __init__(self, token: str | None, *, read_only: bool = False):
        self.read_only = read_only
        self.token = token or None
        # Derived from the token, so sessions survive a restart and hold across replicas, and changing the
        # token signs everybody out. Without a token nothing is ever signed; the key is a throwaway.
        seed = self.token.encode() if self.token else secrets.token_bytes(32)
        self._key = hashlib.sha256(b"pgq-dashboard-session-key\0" + seed).digest()
        self._failures: dict[str, deque[float]] = {}

    @property
    def actions_enabled(self) -> bool:
        return self.token is not None and not self.read_only

    @property
    def why_read_only(self) -> str | None:
        """Why actions are off, in words for the page; None when they are on."""
        if self.read_only:
            return "read-only mode (--read-only): actions are disabled"
        if self.token is None:
            return ("read-only: no token configured, so actions are disabled (start it with --token or "
                    "PGQ_DASHBOARD_TOKEN to enable retry, cancel and delete)")
        return None

    def check_token(self, candidate: str) -> bool:
        if not self.actions_enabled or self.token is None:
            return False
        return hmac.compare_digest(candidate.encode(), self.token.encode())

    # --- sessions ---------------------------------------------------------------------------------

    def new_session(self, now: float | None = None) -> str:
        """A cookie value: random session id, expiry, and their signature."""
        sid = secrets.token_urlsafe(18)
        expires = int((now if now is not None else time.time()) + SESSION_SECONDS)
        payload = f"{sid}.{expires}"
        return f"{payload}.{self._sign('session', payload)}"

    def session_id(self, cookie: str | None, now: float | None = None) -> str | None:
        """The session id of a valid, unexpired cookie; None for anything else."""
        if not cookie or not self.actions_enabled:
            return None
        parts = cookie.split(".")
        if len(parts) != 3 or not parts[1].isdigit():
            return None
        sid, expires, signature = parts
        if not hmac.compare_digest(signature, self._sign("session", f"{sid}.{expires}")):
            return None
        if int(expires) < (now if now is not None else time.time()):
            return None
        return sid

    def csrf_token(self, sid: str) -> str:
        """The CSRF token of session *sid*: it goes in every form, and only this server can compute it."""
        return self._sign("csrf", sid)

    def check_csrf(self, sid: str | None, candidate: str | None) -> bool:
        if sid is None or not candidate:
            return False
        return hmac.compare_digest(candidate.encode(), self.csrf_token(sid).encode())

    def _sign(self, purpose: str, value: str) -> str:
        mac = hmac.new(self._key, f"{purpose}:{value}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()

    # --- login throttling -------------------------------------------------------------------------

    def login_blocked(self, client: str, now: float | None = None) -> bool:
        """Too many failed logins from *client* lately (a guessing script, not a typo)."""
        failures = self._failures.get(client)
        if not failures:
            return False
        now = now if now is not None else time.monotonic()
        while failures and failures[0] < now - LOGIN_WINDOW:
            failures.popleft()
        return len(failures) >= LOGIN_FAILURES

    def login_failed(self, client: str, now: float | None = None) -> None:
        if len(self._failures) > 10_000:  # a flood of addresses: forget, rather than grow without bound
            self._failures.clear()
        self._failures.setdefault(client, deque(maxlen=LOGIN_FAILURES)).append(
            now if now is not None else time.monotonic())


def same_origin(origin: str | None, referer: str | None, host: str | None) -> bool:
    """Does the request come from a page of this dashboard? The Origin header (or, when a browser sends
    none, the Referer) must name the host the request was sent to. The scheme is not compared: behind a
    TLS-terminating proxy the page is https and the request arrives as http. A missing host, a ``null``
    origin and a request with neither header are refused: browsers send Origin with every POST."""
    if not host:
        return False
    source = origin if origin is not None else referer
    if not source or source == "null":
        return False
    try:
        netloc = urlsplit(source).netloc
    except ValueError:
        return False
    return bool(netloc) and netloc.lower() == host.strip().lower()
