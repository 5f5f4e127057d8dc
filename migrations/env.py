"""Alembic environment for pgq's own schema.

pgq keeps its version table inside its own schema (``pgq.alembic_version``), so it never collides with
the application's Alembic history. ``pgq.migrate.upgrade`` hands this environment an open connection.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

from pgq.schema import SCHEMA, metadata

config = context.config
connection = config.attributes["connection"]

# Two `pgq migrate` started at once (two deploys, two pods) wait for each other here instead of both
# trying CREATE TABLE. The lock is transaction-scoped: migrations are not run through PgBouncer.
connection.execute(text("SELECT pg_advisory_xact_lock(hashtext('pgq.migrate'))"))
connection.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{SCHEMA}"'))

context.configure(
    connection=connection,
    target_metadata=metadata,
    version_table="alembic_version",
    version_table_schema=SCHEMA,
    include_schemas=False,
    transaction_per_migration=False,
)

with context.begin_transaction():
    context.run_migrations()
