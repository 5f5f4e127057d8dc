"""``pgq dashboard``: check the schema, bind the socket, and serve the web application with uvicorn."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from typing import Any

from .. import db, migrate
from ..errors import ConfigurationError
from .web import create_app

log = logging.getLogger("pgq.dashboard")


def serve(app: Any, *, host: str = "127.0.0.1", port: int = 5555, token: str | None = None,
          read_only: bool = False, root_path: str = "", log_level: str = "info") -> None:
    """Serve the dashboard of *app* (a pgq.App) until SIGINT/SIGTERM. Port 0 picks a free port; the URL is
    printed on stderr either way."""
    import uvicorn

    url = app.database_url
    with db.connect(url, role="dashboard", autocommit=True) as conn:
        migrate.check(conn)  # a clear message now rather than an error page per request
    sock = bind(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    mode = "actions enabled (token set)" if token and not read_only else (
        "read-only (--read-only)" if read_only else "read-only (no token)")
    print(f"pgq dashboard: http://{shown}:{bound_port}{root_path}/ - {mode}", file=sys.stderr, flush=True)
    if not _loopback(host):
        log.warning("the dashboard listens on %s: anyone who can reach it can read every job's arguments; put "
                    "it behind a proxy with TLS and authentication (docs/dashboard.md)", host)
    asgi = create_app(url, token=token, read_only=read_only, app=app)
    config = uvicorn.Config(asgi, log_level=log_level, root_path=root_path, proxy_headers=True,
                            server_header=False, access_log=log_level == "debug")
    server = _server_class()(config)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()


def _server_class() -> Any:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, except that SIGTERM/SIGINT end it with exit code 0, like `pgq worker`: uvicorn
        raises the signal again once it has shut down, so the process would die of it."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return Server


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on *host*:*port* (0: a free port chosen by the system)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigurationError(f"the dashboard cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
