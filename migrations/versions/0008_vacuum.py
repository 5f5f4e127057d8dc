"""Vacuum pgq's tables without the cost delay, and pgq.results as early as pgq.jobs.

Under a backlog, the entries of jobs already claimed stay at the head of jobs_claim_idx until a vacuum
of pgq.jobs removes them, and every claim walks over them (benchmarks/sustained.py: 1,000-3,500 buffers,
3-13 ms per claim at 14,000 jobs/s). Autovacuum's default cost delay (2 ms per 200 pages of work)
stretched each vacuum of pgq.jobs over most of a minute; without it, at the same rate, autovacuum
visited pgq.jobs 6-7 times a minute instead of once, dead rows stayed at 17,000-107,000 instead of
0.5-1.9 million, and a claim touched 300-400 buffers. A queue table's vacuum is the work that keeps
the queue fast, so it is not throttled. Storage parameters only: no rewrite, a brief lock.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-21
"""

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

S = "pgq"


def upgrade() -> None:
    op.execute(f"ALTER TABLE {S}.jobs SET (autovacuum_vacuum_cost_delay = 0)")
    op.execute(f"ALTER TABLE {S}.results SET (autovacuum_vacuum_cost_delay = 0, "
               "autovacuum_vacuum_scale_factor = 0.02, autovacuum_analyze_scale_factor = 0.02)")


def downgrade() -> None:
    op.execute(f"ALTER TABLE {S}.results RESET (autovacuum_vacuum_cost_delay, autovacuum_vacuum_scale_factor, "
               "autovacuum_analyze_scale_factor)")
    op.execute(f"ALTER TABLE {S}.jobs RESET (autovacuum_vacuum_cost_delay)")
