"""Limits: global concurrency per queue and per key, rate limits per queue and per task (see pgq.limits).

The three new columns of pgq.jobs are nullable or have a constant default, so adding them does not
rewrite the table. jobs_claim_idx is rebuilt with `NOT limited` in its predicate (limited jobs get an
index of their own), and that build reads the waiting rows while holding a lock that blocks writes to
pgq.jobs: on a very large jobs table, prune finished jobs first.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

S = "pgq"
WAITING = "status IN ('queued', 'retrying')"


def upgrade() -> None:
    op.create_table(
        "limits",
        sa.Column("key", sa.Text, primary_key=True),
        sa.Column("concurrency", sa.Integer),
        sa.Column("rate", sa.Float),
        sa.Column("burst", sa.Float, nullable=False, server_default="1"),
        sa.Column("tokens", sa.Float, nullable=False, server_default="0"),
        sa.Column("refilled_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
        sa.CheckConstraint("key <> ''", name="limits_key_check"),
        sa.CheckConstraint("concurrency IS NULL OR concurrency >= 1", name="limits_concurrency_check"),
        sa.CheckConstraint("rate IS NULL OR rate > 0", name="limits_rate_check"),
        sa.CheckConstraint("burst >= 1", name="limits_burst_check"),
        schema=S,
    )
    op.add_column("jobs", sa.Column("concurrency_key", sa.Text), schema=S)
    op.add_column("jobs", sa.Column("key_concurrency", sa.Integer), schema=S)
    op.add_column("jobs", sa.Column("limited", sa.Boolean, nullable=False, server_default=sa.text("false")),
                  schema=S)
    op.create_check_constraint("jobs_concurrency_key_check", "jobs",
                               "concurrency_key IS NULL OR (limited AND key_concurrency >= 1)", schema=S)
    op.drop_index("jobs_claim_idx", table_name="jobs", schema=S)
    op.create_index("jobs_claim_idx", "jobs", ["queue", sa.text("priority DESC"), "run_at", "id"], schema=S,
                    postgresql_where=sa.text(f"{WAITING} AND NOT limited"))
    op.create_index("jobs_limited_claim_idx", "jobs", ["queue", sa.text("priority DESC"), "run_at", "id"], schema=S,
                    postgresql_where=sa.text(f"{WAITING} AND limited"))
    op.create_index("jobs_limited_running_idx", "jobs", ["queue"], schema=S,
                    postgresql_where=sa.text("status = 'running' AND limited"))
    op.create_index("jobs_key_running_idx", "jobs", ["concurrency_key"], schema=S,
                    postgresql_where=sa.text("status = 'running' AND concurrency_key IS NOT NULL"))


def downgrade() -> None:
    op.drop_index("jobs_key_running_idx", table_name="jobs", schema=S)
    op.drop_index("jobs_limited_running_idx", table_name="jobs", schema=S)
    op.drop_index("jobs_limited_claim_idx", table_name="jobs", schema=S)
    op.drop_index("jobs_claim_idx", table_name="jobs", schema=S)
    op.create_index("jobs_claim_idx", "jobs", ["queue", sa.text("priority DESC"), "run_at", "id"], schema=S,
                    postgresql_where=sa.text(WAITING))
    op.drop_constraint("jobs_concurrency_key_check", "jobs", schema=S)
    op.drop_column("jobs", "limited", schema=S)
    op.drop_column("jobs", "key_concurrency", schema=S)
    op.drop_column("jobs", "concurrency_key", schema=S)
    op.drop_table("limits", schema=S)
