"""Job control: unique jobs (a key per job, unique while the job waits or runs) and cancellation requests.

Both columns are nullable without a default, so adding them does not rewrite pgq.jobs. The two indexes
are partial over rows with a key, so they stay small, but building them reads the table once while
holding a lock that blocks writes: on a very large jobs table, prune finished jobs first.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

S = "pgq"
UNFINISHED = "status IN ('queued', 'retrying', 'running')"
KEEP_KEY = "status IN ('succeeded', 'failed')"


def upgrade() -> None:
    op.add_column("jobs", sa.Column("unique_key", sa.Text), schema=S)
    op.add_column("jobs", sa.Column("cancel_requested_at", sa.DateTime(timezone=True)), schema=S)
    op.create_index("jobs_unique_key_idx", "jobs", ["unique_key"], unique=True, schema=S,
                    postgresql_where=sa.text(f"unique_key IS NOT NULL AND {UNFINISHED}"))
    op.create_index("jobs_unique_finished_idx", "jobs", ["unique_key", "finished_at"], schema=S,
                    postgresql_where=sa.text(f"unique_key IS NOT NULL AND {KEEP_KEY}"))


def downgrade() -> None:
    op.drop_index("jobs_unique_finished_idx", table_name="jobs", schema=S)
    op.drop_index("jobs_unique_key_idx", table_name="jobs", schema=S)
    op.drop_column("jobs", "cancel_requested_at", schema=S)
    op.drop_column("jobs", "unique_key", schema=S)
