"""pgq's tables, declared once. The Alembic revisions in ``migrations/`` follow these declarations,
and a test compares the migrated database against them.

Storage choices, and why:
- ``jobs`` keeps every job, finished or not; the claim only ever walks ``jobs_claim_idx``, a partial
  index over the waiting rows, so finished rows piling up do not slow claiming down.
- ``results`` is separate: ``get()`` polls one narrow primary-key row, and the hot ``jobs`` rows stay
  small. There is no foreign key so that pruning either table never waits on the other.
- ``claim_token`` is the fencing token: each claim draws a new random one, and every later write for
  that attempt says ``WHERE id = … AND claim_token = … AND lease_expires_at IS NOT NULL`` (a lease
  exists exactly while the job runs: jobs_running_lease_check and jobs_lease_running_check). Unlike
  ``attempts``, which each claim increments and which is kept for people, it cannot repeat when a
  database crash undoes a claim (migration 0009).
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Float,
    Identity,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    Table,
    Text,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

from .sql import SCHEMA
from .states import ALL, TERMINAL, WAITING, JobStatus

metadata = MetaData(schema=SCHEMA)

UNFINISHED = (*WAITING, JobStatus.RUNNING)
KEEP_KEY = (JobStatus.SUCCEEDED, JobStatus.FAILED)


def _in(column: str, states: tuple) -> str:
    return f"{column} IN ({', '.join(repr(str(s)) for s in states)})"


jobs = Table(
    "jobs",
    metadata,
    Column("id", BigInteger, Identity(always=True), primary_key=True),
    Column("queue", Text, nullable=False, server_default="default"),
    Column("task_name", Text, nullable=False),
    Column("args", JSONB, nullable=False, server_default=text("'[]'::jsonb")),
    Column("kwargs", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("status", Text, nullable=False, server_default="queued"),
    Column("priority", SmallInteger, nullable=False, server_default="0"),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("max_attempts", Integer, nullable=False, server_default="3"),
    Column("retry_backoff", Float, nullable=False, server_default="2"),
    Column("lease_seconds", Integer, nullable=False, server_default="30"),
    Column("ignore_result", Boolean, nullable=False, server_default=text("false")),
    Column("run_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    Column("lease_expires_at", DateTime(timezone=True)),
    Column("worker_id", Text),
    Column("last_error", Text),
    Column("errors", JSONB, nullable=False, server_default=text("'[]'::jsonb")),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    Column("started_at", DateTime(timezone=True)),
    Column("finished_at", DateTime(timezone=True)),
    Column("unique_key", Text),  # see jobs_unique_key_idx
    Column("cancel_requested_at", DateTime(timezone=True)),  # set by cancel(); a running job's worker stops it
    # Limits (see pgq.limits): at most key_concurrency running jobs per concurrency_key; `limited` jobs are
    # claimed only by the limited claim (a key, or a limit on their queue or task when enqueued).
    Column("concurrency_key", Text),
    Column("key_concurrency", Integer),
    Column("limited", Boolean, nullable=False, server_default=text("false")),
    # The fencing token of the current (or last) claim: see the module docstring and sql.CLAIM.
    Column("claim_token", BigInteger),
    CheckConstraint(_in("status", ALL), name="jobs_status_check"),
    CheckConstraint("max_attempts >= 1", name="jobs_max_attempts_check"),
    CheckConstraint("lease_seconds >= 1", name="jobs_lease_seconds_check"),
    CheckConstraint("task_name <> '' AND queue <> ''", name="jobs_names_check"),
    CheckConstraint(
        "status <> 'running' OR (lease_expires_at IS NOT NULL AND worker_id IS NOT NULL)",
        name="jobs_running_lease_check",
    ),
    # The converse: only a running job has a lease. Attempt writes are fenced on the lease (pgq/sql.py).
    CheckConstraint("lease_expires_at IS NULL OR status = 'running'", name="jobs_lease_running_check"),
    CheckConstraint(
        "concurrency_key IS NULL OR (limited AND key_concurrency >= 1)",
        name="jobs_concurrency_key_check",
    ),
)

# What the claim walks: waiting rows only, in claim order. Finished rows are not in it at all, nor are
# limited jobs, which only the limited claim takes.
Index(
    "jobs_claim_idx",
    jobs.c.queue,
    jobs.c.priority.desc(),
    jobs.c.run_at,
    jobs.c.id,
    postgresql_where=text(f"{_in('status', WAITING)} AND NOT limited"),
)
# What the limited claim walks: the waiting limited jobs, in claim order.
Index(
    "jobs_limited_claim_idx",
    jobs.c.queue,
    jobs.c.priority.desc(),
    jobs.c.run_at,
    jobs.c.id,
    postgresql_where=text(f"{_in('status', WAITING)} AND limited"),
)
# What the limited claim counts: running limited jobs per queue, and running jobs per concurrency key.
# Only limited jobs are in them, so the ordinary claim pays nothing for them.
Index(
    "jobs_limited_running_idx",
    jobs.c.queue,
    postgresql_where=text("status = 'running' AND limited"),
)
Index(
    "jobs_key_running_idx",
    jobs.c.concurrency_key,
    postgresql_where=text("status = 'running' AND concurrency_key IS NOT NULL"),
)
# What the rescuer walks: running rows by lease expiry.
Index(
    "jobs_lease_idx",
    jobs.c.lease_expires_at,
    postgresql_where=text("status = 'running'"),
)
# Inspection and pruning: finished rows by age.
Index(
    "jobs_finished_idx",
    jobs.c.finished_at,
    postgresql_where=text(_in("status", TERMINAL)),
)
# Unique jobs: at most one waiting or running job per key. Enqueue inserts with ON CONFLICT DO NOTHING on
# this index, so concurrent producers of a key get one job. Jobs without a key are not in it.
Index(
    "jobs_unique_key_idx",
    jobs.c.unique_key,
    unique=True,
    postgresql_where=text(f"unique_key IS NOT NULL AND {_in('status', UNFINISHED)}"),
)
# unique_for: the latest finished job of a key (cancelled jobs let go of their key).
Index(
    "jobs_unique_finished_idx",
    jobs.c.unique_key,
    jobs.c.finished_at,
    postgresql_where=text(f"unique_key IS NOT NULL AND {_in('status', KEEP_KEY)}"),
)

results = Table(
    "results",
    metadata,
    Column("job_id", BigInteger, primary_key=True, autoincrement=False),
    Column("status", Text, nullable=False),
    Column("result", JSONB),
    Column("error_type", Text),
    Column("error_message", Text),
    Column("traceback", Text),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    CheckConstraint(_in("status", TERMINAL), name="results_status_check"),
)

workers = Table(
    "workers",
    metadata,
    Column("id", Text, primary_key=True),
    Column("hostname", Text, nullable=False),
    Column("pid", Integer, nullable=False),
    Column("queues", JSONB, nullable=False),
    Column("concurrency", Integer, nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    Column("last_heartbeat_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
)

# One row per tick of a periodic schedule that was enqueued. The primary key is what makes each tick
# enqueued exactly once however many schedulers run: their inserts race, one wins, and only the winner
# inserts the job, in the same transaction (see pgq.periodic). job_id is set in that transaction.
periodic_ticks = Table(
    "periodic_ticks",
    metadata,
    Column("schedule", Text, primary_key=True),
    Column("tick_at", DateTime(timezone=True), primary_key=True),
    Column("task_name", Text, nullable=False),
    Column("job_id", BigInteger),
    Column("enqueued_by", Text),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    CheckConstraint("schedule <> ''", name="periodic_ticks_schedule_check"),
)
# Pruning walks the ticks of every schedule by age.
Index("periodic_ticks_created_idx", periodic_ticks.c.created_at)

# Declared limits and their state, one row per limit (see pgq.limits): 'queue:<name>' and 'task:<name>'
# rows are declared by the app (workers write them at start); 'key:<key>' rows are created by the
# limited claim, which locks each row it depends on (FOR UPDATE via an upsert) while it counts and
# claims. A rate limit is a token bucket: `tokens` at `refilled_at`, refilled at `rate` per second up
# to `burst`, taken one per claim. Running counts are not stored: they come from the jobs' status.
limits = Table(
    "limits",
    metadata,
    Column("key", Text, primary_key=True),
    Column("concurrency", Integer),
    Column("rate", Float),  # claims per second
    Column("burst", Float, nullable=False, server_default="1"),
    Column("tokens", Float, nullable=False, server_default="0"),
    Column("refilled_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    CheckConstraint("key <> ''", name="limits_key_check"),
    CheckConstraint("concurrency IS NULL OR concurrency >= 1", name="limits_concurrency_check"),
    CheckConstraint("rate IS NULL OR rate > 0", name="limits_rate_check"),
    CheckConstraint("burst >= 1", name="limits_burst_check"),
)

# One row per maintenance round (``prune``): whoever's upsert finds ``next_run_at`` passed runs the round
# and moves it on, so one worker at a time prunes, without a leader or an advisory lock (see pgq.pruner).
# The other columns say when the last round ran, on which worker, and what it deleted.
maintenance_runs = Table(
    "maintenance_runs",
    metadata,
    Column("name", Text, primary_key=True),
    Column("next_run_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    Column("last_started_at", DateTime(timezone=True)),
    Column("last_finished_at", DateTime(timezone=True)),
    Column("last_run_by", Text),
    Column("last_deleted", BigInteger, nullable=False, server_default="0"),
)
