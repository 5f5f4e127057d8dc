"""Least-privilege roles: the exact GRANTs a producer and a worker need, nothing more.

The migration role owns the ``pgq`` schema and is the only one that runs DDL; producers and workers
should not be able to. The role name comes from the user, so it is quoted with ``sql.Identifier``.
"""

from __future__ import annotations

from psycopg import sql

from .sql import SCHEMA

KINDS = ("producer", "worker", "scheduler", "control", "monitor")

# (privileges, table) per kind. Why each one:
_PRIVILEGES: dict[str, list[tuple[str, str]]] = {
    "producer": [
        # INSERT the job; SELECT because the insert says RETURNING id and get() reads the job's status.
        ("SELECT, INSERT", "jobs"),
        # get() reads the outcome.
        ("SELECT", "results"),
        # The enqueue looks up whether the job's queue or task is limited (see pgq.limits).
        ("SELECT", "limits"),
    ],
    "worker": [
        # Claim (SELECT … FOR UPDATE, UPDATE), heartbeat, complete, retry, fail, rescue, release; prune
        # finished jobs past their retention (DELETE).
        ("SELECT, UPDATE, DELETE", "jobs"),
        # Record outcomes (INSERT … ON CONFLICT DO UPDATE needs SELECT and UPDATE too); prune them (DELETE).
        ("SELECT, INSERT, UPDATE, DELETE", "results"),
        # Register, heartbeat and deregister the worker; forget dead workers.
        ("SELECT, INSERT, UPDATE, DELETE", "workers"),
        # Declare the app's limits at start, lock them and take tokens in the limited claim, create the
        # rows of concurrency keys and forget unused ones.
        ("SELECT, INSERT, UPDATE, DELETE", "limits"),
        # Take a pruning round (INSERT … ON CONFLICT DO UPDATE … RETURNING) and note what it did.
        ("SELECT, INSERT, UPDATE", "maintenance_runs"),
        # Check at start that the schema is migrated to the version the code expects.
        ("SELECT", "alembic_version"),
    ],
    "scheduler": [
        # Read the latest ticks, claim new ones (INSERT … ON CONFLICT DO NOTHING), note their job, prune.
        ("SELECT, INSERT, UPDATE, DELETE", "periodic_ticks"),
        # Enqueue each tick's job (RETURNING id needs SELECT); `pgq periodic list` reads the job's status.
        ("SELECT, INSERT", "jobs"),
        # The enqueue looks up whether the job's queue or task is limited (see pgq.limits).
        ("SELECT", "limits"),
        # Check at start that the schema is migrated to the version the code expects.
        ("SELECT", "alembic_version"),
    ],
    "control": [
        # Cancel and retry by hand (cancel(), app.retry(), `pgq cancel`, `pgq retry`): UPDATE the jobs;
        # delete finished ones (the dashboard's delete action).
        ("SELECT, UPDATE, DELETE", "jobs"),
        # Store a cancelled job's outcome (INSERT … ON CONFLICT DO UPDATE); delete it on a retry by hand.
        ("SELECT, INSERT, UPDATE, DELETE", "results"),
        # The commands check that the schema is migrated to the version the code expects.
        ("SELECT", "alembic_version"),
    ],
    "monitor": [
        # Read-only: dashboards and alerts need only the views (they run with their owner's privileges);
        # `pgq status`, `pgq jobs`, `pgq workers`, `pgq limits`, `pgq doctor` read the tables too. Nothing is writable.
        ("SELECT", "queue_stats"),
        ("SELECT", "stuck_jobs"),
        ("SELECT", "recent_failures"),
        ("SELECT", "live_workers"),
        ("SELECT", "jobs"),
        ("SELECT", "results"),
        ("SELECT", "workers"),
        ("SELECT", "maintenance_runs"),
        ("SELECT", "limits"),
        ("SELECT", "periodic_ticks"),
        ("SELECT", "alembic_version"),
    ],
}


def statements(role: str, kind: str) -> list[sql.Composed]:
    """The GRANT statements that let *role* act as a *kind* (``producer`` or ``worker``)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if not role:
        raise ValueError("role must be a non-empty name")
    ident = sql.Identifier(role)
    schema = sql.Identifier(SCHEMA)
    out = [sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(schema, ident)]
    for privileges, table in _PRIVILEGES[kind]:
        out.append(sql.SQL("GRANT {} ON {}.{} TO {}").format(
            sql.SQL(privileges), schema, sql.Identifier(table), ident))
    return out


def script(role: str, kind: str) -> str:
    """The statements as text, one per line, ready for psql."""
    return "\n".join(stmt.as_string(None) + ";" for stmt in statements(role, kind))
