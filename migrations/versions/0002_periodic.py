"""Periodic tasks: the tick table whose primary key makes each tick enqueued exactly once.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

S = "pgq"


def upgrade() -> None:
    op.create_table(
        "periodic_ticks",
        sa.Column("schedule", sa.Text, primary_key=True),
        sa.Column("tick_at", sa.DateTime(timezone=True), primary_key=True),
        sa.Column("task_name", sa.Text, nullable=False),
        sa.Column("job_id", sa.BigInteger),
        sa.Column("enqueued_by", sa.Text),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
        sa.CheckConstraint("schedule <> ''", name="periodic_ticks_schedule_check"),
        schema=S,
    )
    op.create_index("periodic_ticks_created_idx", "periodic_ticks", ["created_at"], schema=S)


def downgrade() -> None:
    op.drop_table("periodic_ticks", schema=S)
