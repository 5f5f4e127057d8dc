"""The plans of pgq's hot statements, on each server of conftest.SERVERS, after ANALYZE saw a backlog;
the session settings of pgq's own connections (pgq.db); claims that wait for the disk."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from typing import Any

import psycopg
import psycopg.sql
import pytest
from psycopg.conninfo import make_conninfo

from pgq import db, enqueue, migrate, sql

WAITING = 20_000  # waiting jobs when ANALYZE runs (none running: every lease_expires_at is NULL)
LIMITED = 1_000  # waiting jobs of a limited queue among them
KEYS = 2_000  # concurrency keys' rows in pgq.limits
CLAIMED = 300  # jobs claimed after the ANALYZE: the outcome batch and the heartbeat of a busy worker


@pytest.fixture(scope="module")
def backlog(postgres_server: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """A database of pgq's schema with a backlog as autovacuum's ANALYZE sees one during a drain, and
    the parameters of each statement: WAITING jobs waiting and nothing running when pgq's tables were
    analyzed, then CLAIMED of them claimed."""
    name = f"pgq_plans_{os.getpid()}"
    with psycopg.connect(postgres_server, autocommit=True) as admin:
        admin.execute(psycopg.sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(psycopg.sql.Identifier(name)))
        admin.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(name)))
    url = make_conninfo(postgres_server, dbname=name)
    try:
        migrate.upgrade(url)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("INSERT INTO pgq.jobs (task_name) SELECT 'plans.noop' FROM generate_series(1, %s)",
                         (WAITING - LIMITED,))
            conn.execute("INSERT INTO pgq.limits (key, concurrency) VALUES ('queue:limited', 4)")
            conn.execute("INSERT INTO pgq.limits (key) SELECT 'key:k' || i FROM generate_series(1, %s) AS i", (KEYS,))
            limited = [row[0] for row in conn.execute(
                "INSERT INTO pgq.jobs (task_name, queue, limited) SELECT 'plans.noop', 'limited', true "
                "FROM generate_series(1, %s) RETURNING id", (LIMITED,))]
            conn.execute("ANALYZE pgq.jobs, pgq.results, pgq.limits")
            claimed = conn.execute(sql.CLAIM, {"queues": ["default"], "limit": CLAIMED,
                                               "worker_id": "plans"}).fetchall()
        ids, tokens = [row[0] for row in claimed], [row[-1] for row in claimed]
        one = {"id": ids[0], "token": tokens[0], "entry": '{"attempt": 1}', "error": "E: e", "message": "m"}
        params = {
            "ENQUEUE": enqueue.build("plans.noop").params(),
            "ENQUEUE_MANY": {"jobs": "[[0,[],{}],[0,[],{}]]", "bases": json.dumps([{
                "i": 0, "queue": "default", "task_name": "plans.noop", "priority": 0, "max_attempts": 3,
                "retry_backoff": 2.0, "lease_seconds": 30, "ignore_result": False, "eta": None, "countdown": None,
                "concurrency_key": None, "key_concurrency": None}])},
            "CLAIM": {"queues": ["default"], "limit": 256, "worker_id": "plans"},
            "LIMITED_LOCK": {"queues": ["limited"], "limit": 8, "rate_keys": []},
            "LIMITED_TAKE": {"ids": limited[:8], "keys": ["queue:limited"], "taken": [8], "worker_id": "plans"},
            "COMPLETE_MANY": {"ids": ids, "tokens": tokens, "results": ["null"] * len(ids)},
            "RETRY": {**one, "delay": 1.0},
            "FAIL": {**one, "error_type": "E", "error_message": "e", "traceback": None},
            "CANCEL_RUNNING": one,
            "EXTEND_LEASES": {"ids": ids, "tokens": tokens},
            "RELEASE": {"ids": ids, "tokens": tokens},
            "RESCUE": {"limit": 1000, "max_backoff": 3600.0},
        }
        yield url, params
    finally:
        with psycopg.connect(postgres_server, autocommit=True) as admin:
            admin.execute(psycopg.sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                psycopg.sql.Identifier(name)))


#: Each hot statement, the connection that runs it (pgq.db.connect's role), and every index it may read
#: pgq.jobs and pgq.limits through; each read must be an index search (an Index Cond), never a sequential
#: scan or a walk of a whole index. A bulk enqueue reads pgq.limits whole, once per statement, on purpose
#: (sql.ENQUEUE_MANY): None.
PLANS: dict[str, tuple[str, dict[str, set[str] | None]]] = {
    "ENQUEUE": ("client", {"jobs": set(), "limits": {"limits_pkey"}}),
    "ENQUEUE_MANY": ("client", {"jobs": set(), "limits": None}),
    "CLAIM": ("worker", {"jobs": {"jobs_claim_idx", "jobs_pkey"}, "limits": {"limits_pkey"}}),
    "LIMITED_LOCK": ("worker", {"jobs": {"jobs_limited_claim_idx", "jobs_limited_running_idx",
                                         "jobs_key_running_idx"}, "limits": {"limits_pkey"}}),
    "LIMITED_TAKE": ("worker", {"jobs": {"jobs_pkey"}, "limits": {"limits_pkey"}}),
    "COMPLETE_MANY": ("worker", {"jobs": {"jobs_pkey"}}),
    "RETRY": ("worker", {"jobs": {"jobs_pkey"}}),
    "FAIL": ("worker", {"jobs": {"jobs_pkey"}}),
    "CANCEL_RUNNING": ("worker", {"jobs": {"jobs_pkey"}}),
    "EXTEND_LEASES": ("worker", {"jobs": {"jobs_pkey"}}),
    "RELEASE": ("worker", {"jobs": {"jobs_pkey"}}),
    "RESCUE": ("worker", {"jobs": {"jobs_lease_idx", "jobs_pkey"}}),
}

_INDEXES = {"jobs": "jobs_", "limits": "limits_"}


def _reads(node: dict[str, Any], found: list[tuple[str, str, bool]]) -> list[tuple[str, str, bool]]:
    """(table, access, searched) of every read of pgq.jobs and pgq.limits in a JSON plan: access is the
    index, or the node type of a scan without one; searched, whether it had an Index Cond."""
    index = node.get("Index Name")
    if index:
        table = next(t for t, prefix in _INDEXES.items() if index.startswith(prefix))
        found.append((table, index, "Index Cond" in node))
    elif node.get("Relation Name") in _INDEXES and node["Node Type"] != "ModifyTable" \
            and node["Node Type"] != "Bitmap Heap Scan":
        found.append((node["Relation Name"], node["Node Type"], False))
    for child in node.get("Plans", []):
        _reads(child, found)
    return found


def _wrong(plan: dict[str, Any], allowed: dict[str, set[str] | None]) -> list[tuple[str, str, bool]]:
    reads = _reads(plan["Plan"], [])
    wrong = [r for r in reads if allowed.get(r[0], set()) is not None
             and (r[1] not in (allowed.get(r[0]) or set()) or not r[2])]
    expected = allowed.get("jobs")
    if expected and not any(r[0] == "jobs" for r in reads):
        wrong.append(("jobs", "not read at all", False))
    return wrong


def _explain_prepared(conn: psycopg.Connection, statement: str, params: dict[str, Any]) -> dict[str, Any]:
    """The plan of *statement*'s next execution as a prepared statement on *conn*: PREPARE, then EXPLAIN
    EXECUTE with the values as literals (the plan cache chooses custom or generic as for any EXECUTE)."""
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        if match.group(1) not in names:
            names.append(match.group(1))
        return f"${names.index(match.group(1)) + 1}"

    text = re.sub(r"%\((\w+)\)s", number, statement)
    conn.execute("DEALLOCATE ALL")
    conn.execute(psycopg.sql.SQL("PREPARE plans_statement AS {}").format(psycopg.sql.SQL(text)))  # type: ignore[arg-type]
    values = psycopg.sql.SQL(", ").join(psycopg.sql.Literal(params[name]) for name in names)
    return conn.execute(psycopg.sql.SQL("EXPLAIN (FORMAT JSON) EXECUTE plans_statement ({})").format(values)
                        ).fetchone()[0][0]


@pytest.mark.parametrize("name", PLANS)
def test_hot_statements_keep_their_plans_after_analyze(backlog, monkeypatch, name):
    """Each hot statement reads pgq.jobs only by index searches, after ANALYZE saw a backlog of waiting
    jobs and no lease, as each connection runs it: with prepared statements (pgq's session settings;
    the first execution, and the generic plan a prepared statement settles on), and with PGQ_PREPARE=0
    (--no-prepare: no session setting, every execution planned afresh with its values)."""
    url, params = backlog
    role, allowed = PLANS[name]
    statement, values = getattr(sql, name), params[name]
    plans: dict[str, dict[str, Any]] = {}
    monkeypatch.setenv("PGQ_PREPARE", "1")
    with db.connect(url, role=role, autocommit=True) as conn:
        plans["prepared, first execution"] = _explain_prepared(conn, statement, values)
        conn.execute("SET plan_cache_mode = force_generic_plan")
        plans["prepared, generic plan"] = _explain_prepared(conn, statement, values)
    monkeypatch.setenv("PGQ_PREPARE", "0")
    with db.connect(url, role=role, autocommit=True) as conn:
        plans["--no-prepare"] = conn.execute("EXPLAIN (FORMAT JSON) " + statement, values).fetchone()[0][0]
    wrong = {how: _wrong(plan, allowed) for how, plan in plans.items()}
    assert not any(wrong.values()), "\n".join(
        f"{how}: wrong {wrong[how]} of all {_reads(plan['Plan'], [])}" for how, plan in plans.items() if wrong[how])


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


@pytest.mark.parametrize(("prepare", "role", "seqscan", "plans"), [
    ("1", "worker", "off", "force_generic_plan"),  # claim, recorder, keeper
    ("1", "pruner", "off", "auto"), ("1", "scheduler", "off", "auto"), ("1", "listener", "off", "auto"),
    ("1", "client", "on", "auto"), ("1", "cli", "on", "auto"),
    ("0", "worker", "on", "auto"),  # --no-prepare (PgBouncer): no session setting that could leak through the pooler
])
def test_which_connections_turn_sequential_scans_off(db_url, monkeypatch, prepare, role, seqscan, plans):
    monkeypatch.setenv("PGQ_PREPARE", prepare)
    with db.connect(db_url, role=role) as conn:
        assert conn.info.transaction_status.name == "IDLE"  # the SET was committed, no transaction left open
        assert conn.execute("SHOW enable_seqscan").fetchone()[0] == seqscan
        assert conn.execute("SHOW plan_cache_mode").fetchone()[0] == plans


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
