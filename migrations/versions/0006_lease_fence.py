"""A lease exists exactly while a job runs, so attempt writes are fenced on the lease.

Every write for one attempt (completion, retry, failure, cancellation, heartbeat, release) is fenced by
``id = … AND attempts = … AND lease_expires_at IS NOT NULL`` (see the comment above COMPLETE_MANY in
pgq/sql.py for why not ``status = 'running'``). jobs_running_lease_check already says a running job has a
lease; this constraint says the converse, so the lease spelling of the fence means what the status
spelling meant. Every statement that moves a job out of `running` already clears the lease.

Added NOT VALID, then validated: the validation scans pgq.jobs under SHARE UPDATE EXCLUSIVE, which lets
producers and workers go on; only the brief ADD takes an exclusive lock.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-21
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

S = "pgq"


def upgrade() -> None:
    op.execute(f"ALTER TABLE {S}.jobs ADD CONSTRAINT jobs_lease_running_check "
               "CHECK (lease_expires_at IS NULL OR status = 'running') NOT VALID")
    op.execute(f"ALTER TABLE {S}.jobs VALIDATE CONSTRAINT jobs_lease_running_check")


def downgrade() -> None:
    op.drop_constraint("jobs_lease_running_check", "jobs", schema=S)
