"""Create or upgrade pgq's schema with Alembic, from a source checkout or an installed wheel."""

from __future__ import annotations

import re
import threading
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg

from . import sql
from .errors import ConfigurationError

if TYPE_CHECKING:
    import sqlalchemy as sa
    from alembic.config import Config

# SQLAlchemy and Alembic are imported only to migrate: a worker, which only checks the revision, would
# otherwise carry them, 27 MB of its resident memory (64 MB at start instead of 37).

# Alembic's environment runs through module-level proxies (alembic.context): one migration at a time per
# process. Across processes, env.py's advisory lock serializes them.
_in_process = threading.Lock()


def migrations_dir() -> Path:
    """The wheel carries the migrations inside the package; a source checkout keeps them at the top."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "migrations", here.parent / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise ConfigurationError(f"pgq's migrations are missing (looked in {here / 'migrations'})")


def alembic_config() -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    return cfg


@cache
def head_revision() -> str:
    """The newest revision in migrations/versions, read from the files' ``revision``/``down_revision``
    lines rather than through Alembic (tests/test_schema.py checks the two agree)."""
    revisions: set[str] = set()
    parents: set[str] = set()
    for path in (migrations_dir() / "versions").glob("*.py"):
        text = path.read_text(encoding="utf-8")
        found = re.search(r'^revision = "([^"]+)"', text, re.MULTILINE)
        if found is None:
            continue
        revisions.add(found.group(1))
        parent = re.search(r'^down_revision = "([^"]+)"', text, re.MULTILINE)
        if parent is not None:
            parents.add(parent.group(1))
    heads = revisions - parents
    if len(heads) != 1:
        raise ConfigurationError(f"pgq's migrations have {len(heads)} heads ({sorted(heads)}), expected one")
    return heads.pop()


def _engine(url: str) -> sa.Engine:
    import sqlalchemy as sa

    # The URL may be a libpq URL or a conninfo string; psycopg parses both, SQLAlchemy only the first.
    return sa.create_engine(
        "postgresql+psycopg://", creator=lambda: psycopg.connect(url, application_name="pgq-migrate"),
        poolclass=sa.pool.NullPool,
    )


def upgrade(url: str, revision: str = "head") -> None:
    """Bring pgq's schema to *revision*. Idempotent; concurrent callers wait for each other."""
    from alembic import command

    _run(url, command.upgrade, revision)


def downgrade(url: str, revision: str) -> None:
    from alembic import command

    _run(url, command.downgrade, revision)


def _run(url: str, action: Any, revision: str) -> None:
    cfg = alembic_config()
    engine = _engine(url)
    try:
        with _in_process, engine.begin() as connection:
            cfg.attributes["connection"] = connection
            action(cfg, revision)
    finally:
        engine.dispose()


def current_revision(conn: psycopg.Connection) -> str | None:
    """The revision the database is at, or None when pgq's schema is not there."""
    row = conn.execute(sql.SCHEMA_EXISTS).fetchone()
    if not row or not row[0]:
        return None
    row = conn.execute(sql.SCHEMA_VERSION).fetchone()
    return row[0] if row else None


def check(conn: psycopg.Connection) -> None:
    """Raise a ConfigurationError that tells the user what to run when the schema is missing or old."""
    current = current_revision(conn)
    if current is None:
        raise ConfigurationError("pgq's schema is not in this database: run `pgq migrate` first")
    head = head_revision()
    if current != head:
        raise ConfigurationError(
            f"pgq's schema is at revision {current} but this pgq needs {head}: run `pgq migrate`"
        )
