"""pgq's initial schema: jobs, results, workers, and the NOTIFY trigger.

Revision ID: 0001
Revises:
Create Date: 2026-11-21
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

S = "pgq"
WAITING = "status IN ('queued', 'retrying')"
TERMINAL = "status IN ('succeeded', 'failed', 'cancelled')"
ALL = "status IN ('queued', 'retrying', 'running', 'succeeded', 'failed', 'cancelled')"


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.BigInteger, sa.Identity(always=True), primary_key=True),
        sa.Column("queue", sa.Text, nullable=False, server_default="default"),
        sa.Column("task_name", sa.Text, nullable=False),
        sa.Column("args", JSONB, nullable=False, server_default=sa.text("'[]'::jsonb")),
        sa.Column("kwargs", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("status", sa.Text, nullable=False, server_default="queued"),
        sa.Column("priority", sa.SmallInteger, nullable=False, server_default="0"),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("max_attempts", sa.Integer, nullable=False, server_default="3"),
        sa.Column("retry_backoff", sa.Float, nullable=False, server_default="2"),
        sa.Column("lease_seconds", sa.Integer, nullable=False, server_default="30"),
        sa.Column("ignore_result", sa.Boolean, nullable=False, server_default=sa.text("false")),
        sa.Column("run_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True)),
        sa.Column("worker_id", sa.Text),
        sa.Column("last_error", sa.Text),
        sa.Column("errors", JSONB, nullable=False, server_default=sa.text("'[]'::jsonb")),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
        sa.Column("started_at", sa.DateTime(timezone=True)),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        sa.CheckConstraint(ALL, name="jobs_status_check"),
        sa.CheckConstraint("max_attempts >= 1", name="jobs_max_attempts_check"),
        sa.CheckConstraint("lease_seconds >= 1", name="jobs_lease_seconds_check"),
        sa.CheckConstraint("task_name <> '' AND queue <> ''", name="jobs_names_check"),
        sa.CheckConstraint(
            "status <> 'running' OR (lease_expires_at IS NOT NULL AND worker_id IS NOT NULL)",
            name="jobs_running_lease_check",
        ),
        schema=S,
    )
    op.create_index(
        "jobs_claim_idx",
        "jobs",
        ["queue", sa.text("priority DESC"), "run_at", "id"],
        schema=S,
        postgresql_where=sa.text(WAITING),
    )
    op.create_index(
        "jobs_lease_idx", "jobs", ["lease_expires_at"], schema=S, postgresql_where=sa.text("status = 'running'")
    )
    op.create_index("jobs_finished_idx", "jobs", ["finished_at"], schema=S, postgresql_where=sa.text(TERMINAL))

    op.create_table(
        "results",
        sa.Column("job_id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("result", JSONB),
        sa.Column("error_type", sa.Text),
        sa.Column("error_message", sa.Text),
        sa.Column("traceback", sa.Text),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
        sa.CheckConstraint(TERMINAL, name="results_status_check"),
        schema=S,
    )

    op.create_table(
        "workers",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("hostname", sa.Text, nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("queues", JSONB, nullable=False),
        sa.Column("concurrency", sa.Integer, nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
        sa.Column(
            "last_heartbeat_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")
        ),
        schema=S,
    )

    # One NOTIFY per inserting statement and queue, not per row: a bulk insert of 10,000 jobs into one
    # queue wakes workers once. PostgreSQL delivers it only when the inserting transaction commits, so a
    # rolled-back enqueue never wakes anybody. Jobs scheduled for later are left to the poll.
    op.execute(
        f"""
        CREATE FUNCTION {S}.notify_jobs() RETURNS trigger LANGUAGE plpgsql AS $fn$
        BEGIN
            PERFORM pg_notify('pgq_jobs', q.queue)
            FROM (SELECT DISTINCT queue FROM new_jobs WHERE run_at <= now()) AS q;
            RETURN NULL;
        END
        $fn$
        """
    )
    op.execute(
        f"""
        CREATE TRIGGER jobs_notify AFTER INSERT ON {S}.jobs
        REFERENCING NEW TABLE AS new_jobs
        FOR EACH STATEMENT EXECUTE FUNCTION {S}.notify_jobs()
        """
    )
    # Claim-heavy tables: leave room on each page for HOT updates (status/lease changes stay on the page)
    # and vacuum early, so dead row versions from claims and completions do not pile up.
    op.execute(
        f"ALTER TABLE {S}.jobs SET (fillfactor = 80, autovacuum_vacuum_scale_factor = 0.02, "
        "autovacuum_analyze_scale_factor = 0.02)"
    )


def downgrade() -> None:
    op.execute(f"DROP TRIGGER IF EXISTS jobs_notify ON {S}.jobs")
    op.execute(f"DROP FUNCTION IF EXISTS {S}.notify_jobs()")
    op.drop_table("workers", schema=S)
    op.drop_table("results", schema=S)
    op.drop_table("jobs", schema=S)
