"""Operating pgq: the public views, `pgq jobs list/show`, `pgq workers` and `pgq doctor`, on a real PostgreSQL."""

from __future__ import annotations

import json
import re
import uuid

import psycopg
import pytest
from click.testing import CliRunner

import pgq
from pgq import control, doctor, grants
from pgq.cli import main
from tests import apps
from tests.helpers import scalar, wait_for

# The views' columns are a public interface (docs/sql.md): a change here is a change of that interface.
VIEW_COLUMNS = {
    "queue_stats": ["queue", "status", "jobs", "oldest_due_for"],
    "stuck_jobs": ["id", "queue", "task_name", "attempts", "max_attempts", "worker_id", "started_at",
                   "lease_expires_at", "lease_expired_for", "worker_last_heartbeat_at"],
    "recent_failures": ["id", "queue", "task_name", "attempts", "max_attempts", "created_at", "finished_at",
                        "error_type", "error_message", "traceback", "last_error", "errors"],
    "live_workers": ["id", "hostname", "pid", "queues", "concurrency", "started_at", "last_heartbeat_at",
                     "since_heartbeat", "running_jobs"],
}


@pytest.fixture
def runner():
    return CliRunner()


def cli(runner, db_url, *args, env=None):
    return runner.invoke(main, ["--database-url", db_url, "-A", "tests.apps", *args], env=env)


def _failed_job(app):
    handle = apps.fail.delay("kaput")
    with app.worker(concurrency=1, poll_interval=0.1).running(), pytest.raises(pgq.TaskFailed):
        handle.get(timeout=10)
    return handle


# --- views -------------------------------------------------------------------------------------------


def test_views_have_their_documented_columns(conn):
    for view, columns in VIEW_COLUMNS.items():
        found = [row[0] for row in conn.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 ORDER BY attnum",
            (f"pgq.{view}",))]
        assert found == columns, view
        assert scalar(conn, "SELECT obj_description(%s::regclass)", (f"pgq.{view}",)).startswith("pgq public view v1")


def test_views_show_queues_stuck_jobs_failures_and_live_workers(app, conn):
    failed = _failed_job(app)
    apps.add.delay(1, 2)
    apps.send_email.delay("a@example.com")
    apps.add.apply_async((3, 4), countdown=3600)  # not due: no age
    conn.execute("UPDATE pgq.jobs SET run_at = now() - interval '90 seconds' WHERE task_name = 'emails.send'")
    stats = {(q, s): (n, age) for q, s, n, age in conn.execute("SELECT * FROM pgq.queue_stats")}
    assert stats[("default", "queued")][0] == 2 and stats[("default", "failed")] == (1, None)
    assert stats[("emails", "queued")][0] == 1 and stats[("emails", "queued")][1].total_seconds() >= 90
    assert stats[("default", "queued")][1].total_seconds() < 60

    # A job whose worker died: running, lease expired, its worker silent for a minute.
    conn.execute("INSERT INTO pgq.workers (id, hostname, pid, queues, concurrency, last_heartbeat_at) "
                 "VALUES ('dead:1:x', 'dead', 1, '[\"default\"]', 1, now() - interval '1 minute')")
    stuck = scalar(conn, "INSERT INTO pgq.jobs (task_name, status, attempts, worker_id, started_at, lease_expires_at) "
                         "VALUES ('tests.add', 'running', 1, 'dead:1:x', now() - interval '2 minutes', "
                         "now() - interval '90 seconds') RETURNING id")
    row = conn.execute("SELECT id, worker_id, lease_expired_for, worker_last_heartbeat_at "
                       "FROM pgq.stuck_jobs").fetchall()
    assert [(r[0], r[1]) for r in row] == [(stuck, "dead:1:x")] and row[0][2].total_seconds() >= 90

    failure = conn.execute("SELECT id, error_type, error_message, traceback, errors "
                           "FROM pgq.recent_failures").fetchall()
    assert len(failure) == 1
    job_id, error_type, message, traceback, errors = failure[0]
    assert (job_id, error_type, message) == (failed.id, "ValueError", "kaput")
    assert "raise ValueError(message)" in traceback
    assert [e["attempt"] for e in errors] == [1, 2] and all("Traceback" in e["traceback"] for e in errors)

    assert conn.execute("SELECT * FROM pgq.live_workers").fetchall() == []  # the dead one is not live
    worker = app.worker(concurrency=2, queues=["default", "emails"])
    with worker.running():
        wait_for(lambda: scalar(conn, "SELECT count(*) FROM pgq.jobs WHERE status = 'queued' AND run_at <= now()")
                 == 0 and scalar(conn, "SELECT count(*) FROM pgq.live_workers"), what="the due jobs to run")
        live = conn.execute("SELECT id, queues, concurrency, running_jobs = (SELECT count(*) FROM pgq.jobs AS j "
                            "WHERE j.status = 'running' AND j.worker_id = w.id) FROM pgq.live_workers AS w").fetchall()
        assert live == [(worker.id, ["default", "emails"], 2, True)]


# --- pgq jobs list / show, pgq workers ----------------------------------------------------------------


def test_jobs_list_filters_newest_first_and_pages(app, conn, runner, db_url):
    failed = _failed_job(app)
    ids = [apps.add.delay(i, i).id for i in range(5)]
    email = apps.send_email.delay("b@example.com").id
    conn.execute("UPDATE pgq.jobs SET created_at = now() - interval '2 hours' WHERE id = %s", (ids[0],))

    result = cli(runner, db_url, "jobs", "list")
    assert result.exit_code == 0, result.output
    firsts = [line.split()[0] for line in result.output.splitlines()[1:] if line.strip()]
    listed = [int(first) for first in firsts if first.isdigit()]
    assert listed == sorted([failed.id, *ids, email], reverse=True)  # newest first
    assert "ValueError: kaput" in result.output

    def ids_of(*args):
        out = cli(runner, db_url, "jobs", "list", "--json", *args)
        assert out.exit_code == 0, out.output
        return [job["id"] for job in json.loads(out.stdout)["jobs"]]

    assert ids_of("--queue", "emails") == [email]
    assert ids_of("--task", "tests.fail") == [failed.id]
    assert ids_of("--state", "failed,succeeded") == [failed.id]
    assert ids_of("--state", "queued", "--task", "tests.add", "--limit", "2") == [ids[4], ids[3]]
    assert ids_of("--state", "queued", "--task", "tests.add", "--limit", "2", "--page", "2") == [ids[2], ids[1]]
    assert ids_of("--older-than", "1h") == [ids[0]]
    assert ids[0] not in ids_of("--newer-than", "30m")
    job = json.loads(cli(runner, db_url, "jobs", "list", "--json", "--task", "tests.fail").stdout)["jobs"][0]
    assert job["status"] == "failed" and job["attempts"] == 2 and job["age"] >= 0 and job["ran_for"] >= 0

    bad = cli(runner, db_url, "jobs", "list", "--state", "done")
    assert bad.exit_code == 2 and "unknown state done" in bad.output


def test_jobs_list_fits_the_terminal(app, conn, runner, db_url):
    apps.echo.delay()
    conn.execute("UPDATE pgq.jobs SET last_error = %s", ("RuntimeError: " + "x" * 300,))
    narrow = cli(runner, db_url, "jobs", "list", env={"COLUMNS": "80"})
    assert narrow.exit_code == 0, narrow.output
    assert max(len(line) for line in narrow.output.splitlines()) <= 80
    assert "…" in narrow.output
    wide = cli(runner, db_url, "jobs", "list")  # not a terminal, no COLUMNS: nothing is cut
    assert "x" * 300 in wide.output


def test_jobs_show_has_arguments_every_attempt_result_and_timings(app, conn, runner, db_url):
    failed = _failed_job(app)
    result = cli(runner, db_url, "jobs", "show", str(failed.id))
    assert result.exit_code == 0, result.output
    out = result.output
    assert "tests.fail" in out and '["kaput"]' in out and "failed  (attempt 2 of 2)" in out
    assert "outcome: failed: ValueError: kaput" in out
    assert "attempt 1 at" in out and "attempt 2 at" in out
    assert out.count("raise ValueError(message)") == 2  # each attempt's traceback (the last one is the outcome's)
    assert "ran " in out and "waited" in out

    ok = apps.echo.delay(1, name="x")
    with app.worker(concurrency=1).running():
        ok.get(timeout=10)
    shown = json.loads(cli(runner, db_url, "jobs", "show", str(ok.id), "--json").stdout)
    assert shown["args"] == [1] and shown["kwargs"] == {"name": "x"} and shown["status"] == "succeeded"
    assert shown["outcome"]["result"] == {"args": [1], "kwargs": {"name": "x"}}
    assert shown["errors"] == [] and shown["timings"]["ran"] >= 0 and shown["timings"]["total"] >= 0
    assert "result: {" in cli(runner, db_url, "jobs", "show", str(ok.id)).output

    missing = cli(runner, db_url, "jobs", "show", "999999")
    assert missing.exit_code == 1 and missing.stderr.strip() == "Error: no job with id 999999"


def test_workers_lists_alive_and_stale_workers(app, conn, runner, db_url):
    conn.execute("INSERT INTO pgq.workers (id, hostname, pid, queues, concurrency, started_at, last_heartbeat_at) "
                 "VALUES ('gone:1:x', 'gone', 1, '[\"default\"]', 3, now() - interval '1 hour', "
                 "now() - interval '5 minutes')")
    assert "1 stale" in cli(runner, db_url, "workers").output
    worker = app.worker(concurrency=2, queues=["default", "emails"])
    with worker.running():
        wait_for(lambda: scalar(conn, "SELECT count(*) FROM pgq.workers") == 2, what="the worker's row")
        result = cli(runner, db_url, "workers")
        assert result.exit_code == 0, result.output
        lines = {line.split()[0]: line for line in result.output.splitlines() if line.strip()}
        assert lines["gone:1:x"].endswith("STALE") and lines[worker.id].endswith("alive")
        assert "default,emails" in lines[worker.id]
        assert "1 alive, 1 stale" in result.output
        listed = json.loads(cli(runner, db_url, "workers", "--json").stdout)["workers"]
        assert [(w["id"], w["alive"], w["concurrency"]) for w in listed] == [("gone:1:x", False, 3),
                                                                             (worker.id, True, 2)]
        assert listed[0]["since_heartbeat"] >= 300


# --- pgq doctor ---------------------------------------------------------------------------------------


def test_doctor_on_a_healthy_database_exits_0(app, runner, db_url):
    apps.add.delay(1, 1)
    result = cli(runner, db_url, "doctor")
    assert result.exit_code == 0, result.output
    assert "no problems found" in result.output
    for check in ("schema", "xmin", "replication", "prepared", "vacuum", "claim", "leases", "pruning"):
        assert f" {check} " in result.output, check
    assert "walks jobs_claim_idx" in result.output
    report = json.loads(cli(runner, db_url, "doctor", "--json").stdout)
    assert report["healthy"] is True and all(f["level"] != "problem" for f in report["findings"])


def test_doctor_finds_a_session_idle_in_transaction(conn, runner, db_url):
    with psycopg.connect(db_url, application_name="forgotten-report") as idle:
        idle.execute("SELECT count(*) FROM pgq.jobs")  # and then nothing: idle in transaction
        pid = idle.info.backend_pid

        def diagnosed():
            result = cli(runner, db_url, "doctor", "--max-idle-in-transaction", "0.2s")
            return result if result.exit_code == 1 else None

        result = wait_for(diagnosed, timeout=10, interval=0.1, what="the session to be idle for 0.2 s")
        assert f"session {pid} (" in result.output and "forgotten-report" in result.output
        assert "idle in a transaction" in result.output and f"pg_terminate_backend({pid})" in result.output
        assert "query: SELECT count(*) FROM pgq.jobs" in result.output
        assert "1 problem(s) found" in result.output
        # Under the default threshold (1 minute) it is no problem yet.
        assert cli(runner, db_url, "doctor").exit_code == 0
        report = json.loads(cli(runner, db_url, "doctor", "--json", "--max-idle-in-transaction", "0.2s").stdout)
        problem = next(f for f in report["findings"] if f["level"] == "problem")
        assert problem["check"] == "xmin" and problem["details"][0]["pid"] == pid
        idle.rollback()
    assert cli(runner, db_url, "doctor", "--max-idle-in-transaction", "0.2s").exit_code == 0


def test_doctor_finds_a_long_transaction_holding_back_vacuum(conn, db_url):
    with psycopg.connect(db_url) as long_one:
        long_one.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        long_one.execute("SELECT 1")  # holds its snapshot: backend_xmin
        pid = long_one.info.backend_pid
        thresholds = doctor.Thresholds(max_transaction_age=doctor.timedelta(milliseconds=100),
                                       max_idle_in_transaction=doctor.timedelta(hours=1))

        def found():
            with psycopg.connect(db_url, autocommit=True) as c:
                return [f for f in doctor.sessions(c, thresholds) if f.level == doctor.PROBLEM]

        findings = wait_for(found, timeout=10, interval=0.05, what="the transaction to be 100 ms old")
        assert findings[0].details[0]["pid"] == pid and findings[0].details[0]["holds_xmin"]


def test_doctor_finds_stuck_leases_and_says_no_worker_is_alive(conn, runner, db_url):
    conn.execute("INSERT INTO pgq.jobs (task_name, status, attempts, worker_id, lease_expires_at) "
                 "VALUES ('tests.add', 'running', 1, 'dead:1:x', now() - interval '10 minutes')")
    result = cli(runner, db_url, "doctor")
    assert result.exit_code == 1, result.output
    assert "1 job(s) running past their lease" in result.output and "no live worker" in result.output


def test_doctor_finds_a_missing_claim_index(conn, runner, db_url):
    conn.execute("DROP INDEX pgq.jobs_claim_idx")
    result = cli(runner, db_url, "doctor")
    assert result.exit_code == 1, result.output
    assert "jobs_claim_idx is missing" in result.output and "CREATE INDEX CONCURRENTLY" in result.output


def test_doctor_finds_dead_rows_vacuum_could_not_remove(conn, runner, db_url):
    conn.execute("ALTER TABLE pgq.results SET (autovacuum_enabled = false)")
    conn.execute("INSERT INTO pgq.results (job_id, status) SELECT g, 'succeeded' FROM generate_series(1, 12000) g")
    conn.execute("DELETE FROM pgq.results")
    conn.execute("SELECT pg_stat_force_next_flush()")

    def diagnosed():
        result = cli(runner, db_url, "doctor")
        return result if result.exit_code == 1 else None

    result = wait_for(diagnosed, timeout=10, interval=0.1, what="the dead rows to show in the statistics")
    assert "pgq.results: 12,000 dead row versions, 100% of the table" in result.output
    assert "VACUUM (VERBOSE) pgq.results" in result.output


def test_doctor_finds_an_inactive_replication_slot(conn, runner, db_url):
    name = f"pgq_doctor_{uuid.uuid4().hex[:8]}"
    conn.execute("SELECT pg_create_physical_replication_slot(%s, true)", (name,))
    try:
        result = cli(runner, db_url, "doctor")
        assert result.exit_code == 1, result.output
        assert f"replication slot {name} (physical) is inactive" in result.output
        assert f"pg_drop_replication_slot('{name}')" in result.output
    finally:
        conn.execute("SELECT pg_drop_replication_slot(%s)", (name,))


def test_doctor_on_an_unmigrated_database(runner, empty_db_url):
    result = runner.invoke(main, ["--database-url", empty_db_url, "doctor"])
    assert result.exit_code == 1, result.output
    assert "pgq's schema is not in this database" in result.output and "pgq migrate" in result.output


def test_doctor_notes_the_last_pruning_round(app, conn, runner, db_url):
    assert "no worker has pruned finished jobs here yet" in cli(runner, db_url, "doctor").output
    with app.worker(concurrency=1).running():
        wait_for(lambda: scalar(conn, "SELECT count(*) FROM pgq.maintenance_runs"), what="a pruning round")
    result = cli(runner, db_url, "doctor")
    assert result.exit_code == 0 and "last pruning round" in result.output


def test_monitor_grants_cover_the_views():
    text = grants.script("dash", "monitor")
    for view in VIEW_COLUMNS:
        assert f'GRANT SELECT ON "pgq"."{view}" TO "dash";' in text
    assert "INSERT" not in text and "UPDATE" not in text and "DELETE" not in text


# --- long operations: bounded batches, progress -----------------------------------------------------


def test_bulk_retry_of_20000_jobs_commits_1000_at_a_time_and_shows_progress(conn, runner, db_url):
    conn.execute("""
        INSERT INTO pgq.jobs (task_name, status, attempts, max_attempts, started_at, finished_at, last_error)
        SELECT 'tests.fail', 'failed', 2, 2, now(), now(), 'ValueError: kaput' FROM generate_series(1, 20000)
    """)
    conn.execute("INSERT INTO pgq.jobs (task_name, status, finished_at) VALUES ('tests.add', 'failed', now())")
    result = cli(runner, db_url, "retry", "--failed", "--task", "tests.fail")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == ["requeued 20000 failed job(s) of tests.fail"]
    progress = result.stderr.splitlines()
    assert progress[0] == "requeued 1,000 job(s) so far (1 batch(es))"  # the first batch, then once a second
    assert all(re.fullmatch(r"requeued [\d,]+ job\(s\) so far \([\d,]+ batch\(es\)\)", line) for line in progress)
    # Each batch was its own transaction: the rows it requeued carry its transaction id (xmin).
    per_transaction = [n for (n,) in conn.execute(
        "SELECT count(*) FROM pgq.jobs WHERE task_name = 'tests.fail' GROUP BY xmin::text")]
    assert sum(per_transaction) == 20000 and len(per_transaction) == 20 and max(per_transaction) == 1000
    assert scalar(conn, "SELECT count(*) FROM pgq.jobs WHERE status = 'queued'") == 20000

    # The library call reports each batch as it commits.
    conn.execute("UPDATE pgq.jobs SET status = 'failed', finished_at = now() WHERE task_name = 'tests.fail'")
    calls = []
    with psycopg.connect(db_url, autocommit=True) as c:
        assert control.requeue_matching(c, task_name="tests.fail", batch=4000,
                                        progress=lambda done, skipped: calls.append((done, skipped))) == (20000, 0)
    assert calls == [(4000 * i, 0) for i in range(1, 6)]
    with psycopg.connect(db_url) as c, pytest.raises(ValueError, match="autocommit"):
        control.requeue_matching(c, task_name="tests.fail")
