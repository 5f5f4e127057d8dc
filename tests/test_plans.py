"""The session settings of pgq's own connections: plans that keep to the indexes whatever the statistics
say (pgq.db.INDEX_ONLY_ROLES), and claims that wait for the disk."""

from __future__ import annotations

import psycopg
import psycopg.sql
import pytest

from pgq import db, sql


def _plan(conn, statement: str) -> str:
    return "\n".join(row[0] for row in conn.execute(statement).fetchall())


def test_worker_connections_never_scan_the_jobs_table(db_url, conn, monkeypatch):
    """A generic plan made while pgq.jobs was empty is kept after the table grew: with sequential scans
    on, the outcome batch would then read the whole table for every batch."""
    complete = (sql.COMPLETE_MANY.replace("%(ids)s", "$1").replace("%(tokens)s", "$2")
                .replace("%(results)s", "$3"))
    args = "(ARRAY[1, 2]::bigint[], ARRAY[1, 1]::bigint[], ARRAY['null', 'null']::text[])"
    for role, scans in (("worker", False), ("client", True)):
        conn.execute("TRUNCATE pgq.jobs")
        conn.execute("VACUUM ANALYZE pgq.jobs")
        with db.connect(db_url, role=role, autocommit=True) as worker:
            worker.execute("SET plan_cache_mode = force_generic_plan")
            worker.execute(f"PREPARE complete_many AS {complete}")
            worker.execute(f"EXECUTE complete_many {args}")  # planned now, on an empty table
            conn.execute("INSERT INTO pgq.jobs (task_name) SELECT 'x' FROM generate_series(1, 20000)")
            plan = _plan(worker, f"EXPLAIN EXECUTE complete_many {args}")
        assert ("Seq Scan on jobs" in plan) is scans, (role, plan)
        assert ("jobs_pkey" in plan) is not scans, (role, plan)


@pytest.mark.parametrize(("prepare", "role", "setting"), [
    ("1", "worker", "off"), ("1", "pruner", "off"), ("1", "scheduler", "off"), ("1", "listener", "off"),
    ("1", "client", "on"), ("1", "cli", "on"),
    ("0", "worker", "on"),  # --no-prepare (PgBouncer): no session setting that could leak through the pooler
])
def test_which_connections_turn_sequential_scans_off(db_url, monkeypatch, prepare, role, setting):
    monkeypatch.setenv("PGQ_PREPARE", prepare)
    with db.connect(db_url, role=role) as conn:
        assert conn.info.transaction_status.name == "IDLE"  # the SET was committed, no transaction left open
        assert conn.execute("SHOW enable_seqscan").fetchone()[0] == setting


@pytest.mark.parametrize(("prepare", "non_durable", "setting"), [
    ("1", False, "on"), ("0", False, "on"),
    ("1", True, "off"),  # --non-durable-claims
    ("0", True, "on"),  # ... which --no-prepare (PgBouncer) cannot apply
])
def test_claims_wait_for_the_disk_like_every_other_write(app, conn, monkeypatch, prepare, non_durable, setting):
    """A claim that a crash could undo would let two workers run its job at once (tests/test_crash.py)."""
    # The test server does not wait for the disk at all (conftest); this database's sessions do.
    conn.execute(psycopg.sql.SQL("ALTER DATABASE {} SET synchronous_commit = on").format(
        psycopg.sql.Identifier(conn.info.dbname)))
    monkeypatch.setenv("PGQ_PREPARE", prepare)
    worker = app.worker(concurrency=1, non_durable_claims=non_durable)
    try:
        claim = worker._claim_connection()
        assert claim.execute("SHOW synchronous_commit").fetchone()[0] == setting
        with db.connect(app.database_url, role="worker", autocommit=True) as recorder:
            assert recorder.execute("SHOW synchronous_commit").fetchone()[0] == "on"
    finally:
        worker._drop_claim_conn()


def test_claims_are_planned_once_per_connection(app, conn):
    """Left to choose, PostgreSQL planned every claim afresh (its custom plan, seeing one queue, is
    estimated cheaper than the generic one): about 0.3 ms of server CPU per claim, between a job's
    NOTIFY and its start."""
    conn.execute("INSERT INTO pgq.jobs (task_name) SELECT 'x' FROM generate_series(1, 50)")
    worker = app.worker(concurrency=1)
    try:
        for _ in range(12):  # psycopg prepares from the 5th; PostgreSQL compares plans from the 6th EXECUTE
            worker._claim(2)
        plans = worker._claim_connection().execute(
            "SELECT generic_plans, custom_plans FROM pg_prepared_statements WHERE statement LIKE '%WITH picked AS%'"
        ).fetchall()
        assert len(plans) == 1 and plans[0][0] >= 5 and plans[0][1] == 0, plans
        assert conn.execute("SELECT count(*) FROM pgq.jobs WHERE status = 'running'").fetchone()[0] == 24
    finally:
        worker._drop_claim_conn()
