"""``pgq doctor``: one report of what threatens a queue kept in PostgreSQL, each finding with what to do.

A queue table is updated all day long; what hurts it is rarely pgq itself:

- anything that holds back the **xmin horizon** (a long or idle-in-transaction session, a forgotten
  replication slot, a prepared transaction) stops vacuum from removing dead row versions, in every table
  of the database: claims then step over more and more of them, and the table and its indexes bloat;
- **vacuum** not keeping up with pgq's tables (the dead-row ratio, the last autovacuum);
- the **claim** no longer walking its index (``jobs_claim_idx`` dropped, invalid, or not chosen);
- **stuck leases**: jobs running past their lease that nobody rescues (no live worker);
- a **schema** at another revision than this pgq's code.

Each check returns findings; a finding that is not ``ok`` makes ``pgq doctor`` exit 1. A check that
cannot run (a missing privilege) says so as a note, which is not a failure.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any

import psycopg
import psycopg.errors

from . import migrate, sql
from .humanize import duration, error_line

OK, NOTE, PROBLEM = "ok", "note", "problem"

#: A table whose dead row versions are more than this share of its rows, and at least MIN_DEAD of them,
#: is not being vacuumed enough.
MAX_DEAD_RATIO = 0.2
MIN_DEAD = 10_000
#: Below this many rows (the planner's estimate) a sequential scan for the claim is cheap and fine.
MIN_ROWS_FOR_INDEX = 10_000


@dataclass
class Finding:
    check: str  # xmin, replication, prepared, vacuum, claim, leases, schema, pruning
    level: str  # ok, note or problem
    summary: str
    advice: str = ""
    details: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.level != PROBLEM

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["details"] = [{k: _jsonable(v) for k, v in d.items()} for d in self.details]
        return out


@dataclass(frozen=True)
class Thresholds:
    max_transaction_age: timedelta = timedelta(minutes=5)
    max_idle_in_transaction: timedelta = timedelta(minutes=1)
    stuck_after: timedelta = timedelta(minutes=1)


def examine(conn: psycopg.Connection, thresholds: Thresholds | None = None, *,
            queue: str | None = None) -> list[Finding]:
    """Run every check on *conn* (autocommit) and return the findings, problems first within each check."""
    t = thresholds or Thresholds()
    findings = schema(conn)
    findings += sessions(conn, t)
    findings += replication_slots(conn)
    findings += prepared_transactions(conn, t)
    if migrate.current_revision(conn) is None:
        return findings
    checks = [("vacuum", vacuum), ("claim", lambda c: claim_plan(c, queue)),
              ("leases", lambda c: stuck_leases(c, t)), ("pruning", pruning)]
    for name, check in checks:
        try:
            findings += check(conn)
        except psycopg.errors.InsufficientPrivilege as exc:
            findings.append(Finding(name, NOTE, f"not checked: {error_line(exc)}",
                                    "run pgq doctor as a role with SELECT on pgq's tables (pgq grants --kind "
                                    "monitor), or as the schema owner"))
        except psycopg.errors.UndefinedTable as exc:
            findings.append(Finding(name, NOTE, f"not checked: {error_line(exc)}",
                                    "the schema is older than this pgq: run pgq migrate"))
    return findings


# --- the checks ----------------------------------------------------------------------------------------


def schema(conn: psycopg.Connection) -> list[Finding]:
    head = migrate.head_revision()
    current = migrate.current_revision(conn)
    if current is None:
        return [Finding("schema", PROBLEM, "pgq's schema is not in this database",
                        "run `pgq migrate` (as the role that should own the pgq schema)")]
    if current == head:
        return [Finding("schema", OK, f"schema at revision {current}, as this pgq expects")]
    from alembic.script import ScriptDirectory

    known = {r.revision for r in ScriptDirectory.from_config(migrate.alembic_config()).walk_revisions()}
    if current in known:
        return [Finding("schema", PROBLEM, f"schema at revision {current}, this pgq needs {head}",
                        "run `pgq migrate` before starting workers of this version (they refuse to start)")]
    return [Finding("schema", PROBLEM, f"schema at revision {current}, which this pgq ({head}) does not know",
                    "the database was migrated by a newer pgq: upgrade this installation of pgq")]


def sessions(conn: psycopg.Connection, t: Thresholds) -> list[Finding]:
    rows = conn.execute(sql.DOCTOR_SESSIONS, {"max_idle": t.max_idle_in_transaction.total_seconds(),
                                              "max_xact": t.max_transaction_age.total_seconds()}).fetchall()
    if not rows:
        return [Finding("xmin", OK, f"no transaction older than {duration(t.max_transaction_age)}, no session idle "
                                    f"in a transaction for more than {duration(t.max_idle_in_transaction)}")]
    out = []
    for pid, user, app, client, backend_type, state, xact_age, state_age, holds, xmin_age, query in rows:
        who = f"session {pid} ({', '.join(x for x in (user, app or None, client) if x)})"
        if state and state.startswith("idle in transaction"):
            summary = (f"{who} idle in a transaction for {duration(state_age)} "
                       f"(transaction open for {duration(xact_age)})"
                       + (", holding back the xmin horizon" if holds else ", holding its locks"))
            advice = (f"end it: SELECT pg_terminate_backend({pid}); then fix the code that leaves transactions "
                      "open (commit or roll back before waiting on anything), and set "
                      "idle_in_transaction_session_timeout (e.g. '5min') for that role")
        else:
            summary = f"{who} in a transaction for {duration(xact_age)} ({state}), holding back the xmin horizon"
            advice = ("vacuum cannot remove any row version newer than its snapshot, in pgq's tables too: end it "
                      f"if it is not needed (SELECT pg_cancel_backend({pid}), or pg_terminate_backend), run long "
                      "reports on a replica, set statement_timeout / transaction_timeout for such roles")
        out.append(Finding("xmin", PROBLEM, summary, advice, [{
            "pid": pid, "user": user, "application_name": app, "client_addr": client, "backend_type": backend_type,
            "state": state, "transaction_age": xact_age, "state_age": state_age, "holds_xmin": holds,
            "xmin_age_xids": xmin_age, "query": query}]))
    return out


def replication_slots(conn: psycopg.Connection) -> list[Finding]:
    rows = conn.execute(sql.DOCTOR_SLOTS).fetchall()
    out = []
    for name, slot_type, database, active, xmin_age, catalog_xmin_age, wal_bytes in rows:
        detail = {"slot_name": name, "slot_type": slot_type, "database": database, "active": active,
                  "xmin_age_xids": xmin_age, "catalog_xmin_age_xids": catalog_xmin_age,
                  "retained_wal_bytes": None if wal_bytes is None else int(wal_bytes)}
        retained = "" if wal_bytes is None else f", retaining {_bytes(int(wal_bytes))} of WAL"
        if not active:
            holds = " and holding back the xmin horizon" if xmin_age is not None else ""
            out.append(Finding("replication", PROBLEM, f"replication slot {name} ({slot_type}) is inactive{retained}"
                               f"{holds}", f"if its consumer is gone for good: SELECT pg_drop_replication_slot("
                               f"'{name}'); otherwise bring the consumer back (and set max_slot_wal_keep_size)",
                               [detail]))
        elif xmin_age is not None:
            out.append(Finding("replication", OK, f"replication slot {name} is active; its standby's "
                               f"hot_standby_feedback holds the xmin horizon {xmin_age} transactions back",
                               "long queries on that standby hold back vacuum here", [detail]))
    if not out:
        out.append(Finding("replication", OK, "no replication slot holds back the xmin horizon or WAL"
                           if rows else "no replication slots"))
    return out


def prepared_transactions(conn: psycopg.Connection, t: Thresholds) -> list[Finding]:
    rows = conn.execute(sql.DOCTOR_PREPARED).fetchall()
    old = [r for r in rows if r[3] > t.max_transaction_age]
    if not old:
        return [Finding("prepared", OK, f"no prepared transaction older than {duration(t.max_transaction_age)}")]
    return [Finding("prepared", PROBLEM, f"prepared transaction {gid!r} (database {database}, owner {owner}) "
                    f"is {duration(age)} old, holding back the xmin horizon and its locks",
                    f"its transaction manager should finish it; if it is lost: COMMIT PREPARED '{gid}' or "
                    f"ROLLBACK PREPARED '{gid}' (in database {database})",
                    [{"gid": gid, "database": database, "owner": owner, "age": age, "xmin_age_xids": xmin_age}])
            for gid, database, owner, age, xmin_age in old]


def vacuum(conn: psycopg.Connection) -> list[Finding]:
    rows = conn.execute(sql.DOCTOR_TABLES).fetchall()
    now = conn.execute(sql.DB_NOW).fetchone()[0]
    out, healthy = [], []
    for name, live, dead, last_auto, last_manual, vacuums, since in rows:
        ratio = dead / (live + dead) if live + dead else 0.0
        detail = {"table": f"pgq.{name}", "live_rows": live, "dead_rows": dead, "dead_ratio": round(ratio, 3),
                  "last_autovacuum": last_auto, "last_vacuum": last_manual, "autovacuum_count": vacuums}
        if dead >= MIN_DEAD and ratio > MAX_DEAD_RATIO:
            last = "never vacuumed" if since is None else f"last vacuumed {duration(since)} ago"
            out.append(Finding("vacuum", PROBLEM, f"pgq.{name}: {dead:,} dead row versions, {ratio:.0%} of the table "
                               f"({last})", "vacuum is behind or blocked: first clear the xmin findings above (a "
                               f"dead row newer than the oldest snapshot cannot be removed), then VACUUM (VERBOSE) "
                               f"pgq.{name} and read its 'not yet removable' count; if autovacuum is merely slow, "
                               "lower autovacuum_vacuum_cost_delay or raise autovacuum_max_workers", [detail]))
        else:
            healthy.append(detail)
    if not out:
        main = [d for d in healthy if d["table"] in ("pgq.jobs", "pgq.results")]
        summary = ", ".join(f"{d['table']} {d['dead_rows']:,} dead ({d['dead_ratio']:.0%}), last autovacuum "
                            + (f"{duration(now - d['last_autovacuum'])} ago" if d["last_autovacuum"] else "never")
                            for d in main) or "no statistics yet"
        out.append(Finding("vacuum", OK, f"dead row versions under control: {summary}", details=healthy))
    return out


def claim_plan(conn: psycopg.Connection, queue: str | None = None) -> list[Finding]:
    valid, rows = conn.execute(sql.DOCTOR_CLAIM_INDEX).fetchone() or (None, None)
    rebuild = ("CREATE INDEX CONCURRENTLY jobs_claim_idx_new ON pgq.jobs (queue, priority DESC, run_at, id) "
               "WHERE status IN ('queued', 'retrying'); then drop the broken one and rename (as the schema owner)")
    if valid is None:
        return [Finding("claim", PROBLEM, "the claim index pgq.jobs_claim_idx is missing: every claim reads the "
                        "whole table", rebuild)]
    if not valid:
        return [Finding("claim", PROBLEM, "the claim index pgq.jobs_claim_idx is invalid (an interrupted CREATE "
                        "INDEX CONCURRENTLY or REINDEX): the planner cannot use it",
                        "REINDEX INDEX CONCURRENTLY pgq.jobs_claim_idx (as the schema owner)")]
    if queue is None:
        row = conn.execute(sql.DOCTOR_SAMPLE_QUEUE).fetchone()
        queue = row[0] if row else "default"
    try:
        # Plain EXPLAIN plans the statement without running it: nothing is claimed.
        plan = "\n".join(r[0] for r in conn.execute("EXPLAIN " + sql.CLAIM, {
            "queues": [queue], "limit": 10, "worker_id": "pgq-doctor"}).fetchall())
    except psycopg.errors.InsufficientPrivilege:
        return [Finding("claim", NOTE, "claim plan not checked: planning the claim needs the worker's UPDATE "
                        "privilege on pgq.jobs", "run pgq doctor as a worker role or the schema owner to check it")]
    detail = [{"queue": queue, "estimated_rows": rows, "plan": plan}]
    if "jobs_claim_idx" in plan:
        return [Finding("claim", OK, f"the claim (queue {queue!r}) walks jobs_claim_idx", details=detail)]
    if (rows or 0) < MIN_ROWS_FOR_INDEX:
        return [Finding("claim", OK, f"the claim (queue {queue!r}) does not use jobs_claim_idx, which is fine for "
                        f"a table of about {max(rows or 0, 0):,} rows", details=detail)]
    return [Finding("claim", PROBLEM, f"the claim (queue {queue!r}) does not use jobs_claim_idx on a table of about "
                    f"{rows:,} rows: each claim scans and sorts", "ANALYZE pgq.jobs (stale statistics are the usual "
                    "cause); if the plan stays the same, look for bloat (the vacuum findings) and compare the plan "
                    "with docs/operations.md", detail)]


def stuck_leases(conn: psycopg.Connection, t: Thresholds) -> list[Finding]:
    stuck, oldest, alive = conn.execute(sql.DOCTOR_STUCK, {"after": t.stuck_after.total_seconds()}).fetchone() \
        or (0, None, 0)
    if not stuck:
        return [Finding("leases", OK, f"no job running more than {duration(t.stuck_after)} past its lease")]
    detail = [{"stuck_jobs": stuck, "oldest_expired_for": oldest, "live_workers": alive}]
    if not alive:
        return [Finding("leases", PROBLEM, f"{stuck} job(s) running past their lease (the oldest expired "
                        f"{duration(oldest)} ago) and no live worker to rescue them",
                        "start a worker (any queue): every worker rescues expired leases within its "
                        "--rescue-interval; SELECT * FROM pgq.stuck_jobs lists them", detail)]
    return [Finding("leases", PROBLEM, f"{stuck} job(s) running past their lease (the oldest expired "
                    f"{duration(oldest)} "
                    f"ago) although {alive} worker(s) are alive", "live workers should have rescued them: look in "
                    "their logs for 'heartbeat failed' or permission errors (the worker grants); "
                    "SELECT * FROM pgq.stuck_jobs lists them", detail)]


def pruning(conn: psycopg.Connection) -> list[Finding]:
    rows = conn.execute(sql.MAINTENANCE_RUNS).fetchall()
    prune = next((r for r in rows if r[0] == "prune"), None)
    if prune is None:
        return [Finding("pruning", NOTE, "no worker has pruned finished jobs here yet",
                        "running workers prune once a minute unless started with --no-prune (see --keep-*); "
                        "`pgq prune` prunes by hand")]
    _, next_run, started, finished, run_by, deleted, since = prune
    detail = [{"next_run_at": next_run, "last_started_at": started, "last_finished_at": finished,
               "last_run_by": run_by, "last_deleted": deleted}]
    return [Finding("pruning", OK, f"last pruning round {duration(since)} ago on {run_by}: {deleted:,} job(s) deleted",
                    details=detail)]


# --- formatting ----------------------------------------------------------------------------------------




def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1024:
            return f"{size:.0f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"




def _jsonable(value: Any) -> Any:
    if isinstance(value, timedelta):
        return value.total_seconds()
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value
