"""A claim token that never repeats: the fence of every write for one attempt.

Until now the fence was the attempt number. A claim that a PostgreSQL crash undoes (committed without
waiting for the disk, then lost in recovery) gives its job back with the attempt not counted, and the
next claim takes the same attempt number again: the worker of the lost claim, still running the job,
then passed the fence of the new one. Each claim now draws a random 52-bit token, stored in the row by
the claim and required by every write of that attempt (complete, retry, fail, heartbeat, cancel,
release); see the comment above CLAIM in pgq/sql.py for why random and not a sequence.

Adding a nullable column without a default only touches the catalog: no rewrite, a brief lock. Jobs
running when this revision is applied keep a NULL token; the workers that claimed them are of the
previous version and fence by the attempt number, as before.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07
"""

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

S = "pgq"


def upgrade() -> None:
    op.execute(f"ALTER TABLE {S}.jobs ADD COLUMN claim_token bigint")


def downgrade() -> None:
    op.execute(f"ALTER TABLE {S}.jobs DROP COLUMN claim_token")
