"""NOTIFY tells limited jobs apart: the payload is the queue, or 'limited <queue>' for limited jobs.

A worker woken by a NOTIFY ran the limited claim's probe (LIMITED_DUE) before its ordinary claim, on
every wake, because it could not know whether the new job was limited: one more round trip between an
enqueue's commit and its task starting. With the payload saying so, an ordinary job wakes only the
ordinary claim. A space cannot appear in a queue name, so the two payloads never collide.

Workers of an older pgq hear 'limited <queue>' as a queue they do not have: their limited jobs start at
the next poll instead (1 s by default) until they are upgraded.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-21
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

S = "pgq"


def _notify_function(payload: str) -> str:
    return f"""
        CREATE OR REPLACE FUNCTION {S}.notify_jobs() RETURNS trigger LANGUAGE plpgsql AS $fn$
        BEGIN
            PERFORM pg_notify('pgq_jobs', {payload})
            FROM (SELECT DISTINCT queue, limited FROM new_jobs WHERE run_at <= now()) AS q;
            RETURN NULL;
        END
        $fn$
        """


def upgrade() -> None:
    op.execute(_notify_function("CASE WHEN q.limited THEN 'limited ' || q.queue ELSE q.queue END"))


def downgrade() -> None:
    op.execute(_notify_function("q.queue"))
