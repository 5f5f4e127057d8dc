"""Operations: the maintenance round table (pruning, one worker at a time) and the public views.

The views are pgq's stable SQL interface for dashboards and alerts (docs/sql.md, "Views"): within a major
version of pgq their columns keep their names, types and meaning, and new columns are only added at the
end (CREATE OR REPLACE VIEW allows nothing else). They run with their owner's privileges, so a role
granted SELECT on them (``pgq grants --kind monitor``) needs nothing on the tables.

Creating a small table and four views takes no lock on pgq.jobs beyond a moment's share lock.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

S = "pgq"

# name -> (comment, definition). The comments carry the interface version.
VIEWS = {
    "queue_stats": (
        "pgq public view v1: jobs per queue and status; oldest_due_for: how long the oldest due waiting "
        "job has waited (NULL when none is due). Counts every row: cost grows with the table.",
        f"""
        SELECT queue, status, count(*) AS jobs,
               max(now() - run_at) FILTER (WHERE status IN ('queued', 'retrying') AND run_at <= now())
                   AS oldest_due_for
        FROM {S}.jobs
        GROUP BY queue, status
        """,
    ),
    "stuck_jobs": (
        "pgq public view v1: jobs running past their lease (their worker stopped heartbeating); live workers "
        "rescue them within --rescue-interval.",
        f"""
        SELECT j.id, j.queue, j.task_name, j.attempts, j.max_attempts, j.worker_id, j.started_at,
               j.lease_expires_at, now() - j.lease_expires_at AS lease_expired_for,
               w.last_heartbeat_at AS worker_last_heartbeat_at
        FROM {S}.jobs AS j
        LEFT JOIN {S}.workers AS w ON w.id = j.worker_id
        WHERE j.status = 'running' AND j.lease_expires_at < now()
        """,
    ),
    "recent_failures": (
        "pgq public view v1: jobs that failed for good in the last 24 hours, with their final error "
        "(error_type, error_message, traceback) and every attempt's (errors).",
        f"""
        SELECT j.id, j.queue, j.task_name, j.attempts, j.max_attempts, j.created_at, j.finished_at,
               r.error_type, r.error_message, r.traceback, j.last_error, j.errors
        FROM {S}.jobs AS j
        LEFT JOIN {S}.results AS r ON r.job_id = j.id
        WHERE j.status = 'failed' AND j.finished_at > now() - interval '24 hours'
        """,
    ),
    "live_workers": (
        "pgq public view v1: workers that heartbeated in the last 30 seconds, with the jobs each is running.",
        f"""
        SELECT w.id, w.hostname, w.pid, w.queues, w.concurrency, w.started_at, w.last_heartbeat_at,
               now() - w.last_heartbeat_at AS since_heartbeat,
               (SELECT count(*) FROM {S}.jobs AS j
                WHERE j.status = 'running' AND j.worker_id = w.id) AS running_jobs
        FROM {S}.workers AS w
        WHERE w.last_heartbeat_at > now() - interval '30 seconds'
        """,
    ),
}


def upgrade() -> None:
    op.create_table(
        "maintenance_runs",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("next_run_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
        sa.Column("last_started_at", sa.DateTime(timezone=True)),
        sa.Column("last_finished_at", sa.DateTime(timezone=True)),
        sa.Column("last_run_by", sa.Text),
        sa.Column("last_deleted", sa.BigInteger, nullable=False, server_default="0"),
        schema=S,
    )
    for name, (comment, definition) in VIEWS.items():
        op.execute(f"CREATE VIEW {S}.{name} AS {definition.strip()}")
        quoted = comment.replace("'", "''")  # a constant of this file; COMMENT takes no bound parameters
        op.execute(f"COMMENT ON VIEW {S}.{name} IS '{quoted}'")


def downgrade() -> None:
    for name in reversed(VIEWS):
        op.execute(f"DROP VIEW IF EXISTS {S}.{name}")
    op.drop_table("maintenance_runs", schema=S)
