"""Hostile strings stay data, and least-privilege roles are enough to produce and to work, and no more."""

from __future__ import annotations

import uuid

import psycopg
import pytest
from click.testing import CliRunner
from psycopg.conninfo import make_conninfo

import pgq
from pgq import grants
from pgq.cli import main
from tests import apps
from tests.helpers import WorkerProcess, scalar, wait_for

HOSTILE = [
    "'; DROP TABLE pgq.jobs; --",
    '$$; DROP SCHEMA pgq CASCADE; $$',
    "\\'\"; SELECT pg_sleep(10); --",
    "%(id)s %s {0} :name $1",
    "<script>alert(1)</script>",
    "nul-free unicode: é 中 🎉",
]


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_names_and_payloads_are_stored_verbatim(app, conn, text):
    handle = app.send_task(text, args=[text, {text: text}], kwargs={text: [text]})
    row = conn.execute("SELECT task_name, args, kwargs FROM pgq.jobs WHERE id = %s", (handle.id,)).fetchone()
    assert row == (text, [text, {text: text}], {text: [text]})
    assert scalar(conn, "SELECT count(*) FROM pgq.jobs") == 1  # the table is still there and whole


def test_hostile_task_runs_and_returns_verbatim(app):
    weird = app.task(name="tests.weird'; --$$")(lambda value: value)
    handle = weird.delay(HOSTILE)
    with app.worker(concurrency=1).running():
        assert handle.get(timeout=10) == HOSTILE


def test_grants_quote_the_role_name():
    text = grants.script('evil"; DROP TABLE x; --', "producer")
    assert 'TO "evil""; DROP TABLE x; --"' in text
    with pytest.raises(ValueError, match="kind"):
        grants.statements("r", "admin")


def test_grants_cli_prints_statements():
    result = CliRunner().invoke(main, ["grants", "--role", "web", "--kind", "producer"])
    assert result.exit_code == 0
    assert 'GRANT SELECT, INSERT ON "pgq"."jobs" TO "web";' in result.output


@pytest.fixture
def roles(conn, db_url):
    """A producer, a worker and a monitor role with exactly pgq's grants (roles are cluster-wide: unique names)."""
    suffix = uuid.uuid4().hex[:8]
    names = {"producer": f"pgq_producer_{suffix}", "worker": f"pgq_worker_{suffix}",
             "monitor": f"pgq_monitor_{suffix}"}
    urls = {}
    for kind, name in names.items():
        conn.execute(psycopg.sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'secret-pw'").format(psycopg.sql.Identifier(name)))
        args = ["--database-url", db_url, "grants", "--role", name, "--kind", kind, "--apply"]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        urls[kind] = make_conninfo(db_url, user=name, password="secret-pw")
    yield urls
    for name in names.values():
        conn.execute(psycopg.sql.SQL("DROP OWNED BY {}").format(psycopg.sql.Identifier(name)))
        conn.execute(psycopg.sql.SQL("DROP ROLE {}").format(psycopg.sql.Identifier(name)))


def test_restricted_producer_and_worker_roles(app, conn, roles):
    app.set_database_url(roles["producer"])
    handle = apps.add.delay(20, 22)
    failing = apps.fail.delay("as the worker role")
    old = apps.add.delay(1, 1)  # finished two days ago: the worker's pruner deletes it, and its result
    conn.execute("UPDATE pgq.jobs SET status = 'succeeded', finished_at = now() - interval '2 days' WHERE id = %s",
                 (old.id,))
    conn.execute("INSERT INTO pgq.results (job_id, status, result) VALUES (%s, 'succeeded', '2')", (old.id,))
    worker = WorkerProcess(roles["worker"], "-c", "2")
    try:
        assert handle.get(timeout=20) == 42
        with pytest.raises(pgq.TaskFailed, match="as the worker role"):
            failing.get(timeout=20)
        wait_for(lambda: scalar(conn, "SELECT count(*) FROM pgq.workers") == 1, what="worker row")
        wait_for(lambda: scalar(conn, "SELECT count(*) FROM pgq.jobs WHERE id = %s", (old.id,)) == 0,
                 what="the worker to prune the old job")
        assert scalar(conn, "SELECT count(*) FROM pgq.results WHERE job_id = %s", (old.id,)) == 0
        assert f":{worker.pid}:" in scalar(conn, "SELECT last_run_by FROM pgq.maintenance_runs WHERE name = 'prune'")
    finally:
        output = worker.stop()
    assert "permission denied" not in output
    assert "worker" in output and "stopped" in output

    # …and no more than that.
    with psycopg.connect(roles["producer"], autocommit=True) as producer:
        for statement in ("UPDATE pgq.jobs SET status = 'succeeded'", "DELETE FROM pgq.results",
                          "DELETE FROM pgq.jobs", "CREATE TABLE pgq.evil (x int)"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                producer.execute(statement)
    with psycopg.connect(roles["worker"], autocommit=True) as worker_conn:
        for statement in ("INSERT INTO pgq.jobs (task_name) VALUES ('x')", "TRUNCATE pgq.jobs",
                          "DELETE FROM pgq.periodic_ticks", "DELETE FROM pgq.maintenance_runs",
                          "DROP TABLE pgq.results", "DROP VIEW pgq.queue_stats"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                worker_conn.execute(statement)


def test_monitor_role_reads_and_changes_nothing(app, conn, roles):
    handle = apps.fail.delay("seen by the monitor")
    with app.worker(concurrency=1).running(), pytest.raises(pgq.TaskFailed):
        handle.get(timeout=10)
    runner = CliRunner()
    url = roles["monitor"]
    with psycopg.connect(url, autocommit=True) as monitor:
        for view in ("queue_stats", "stuck_jobs", "recent_failures", "live_workers"):
            monitor.execute(f"SELECT * FROM pgq.{view}").fetchall()
        assert scalar(monitor, "SELECT id FROM pgq.recent_failures") == handle.id
        for statement in ("UPDATE pgq.jobs SET priority = 1", "DELETE FROM pgq.results", "DELETE FROM pgq.workers",
                          "INSERT INTO pgq.maintenance_runs (name) VALUES ('x')", "TRUNCATE pgq.jobs"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                monitor.execute(statement)
    for args in (["status"], ["jobs", "list"], ["jobs", "show", str(handle.id)], ["workers"], ["limits"]):
        result = runner.invoke(main, ["--database-url", url, *args])
        assert result.exit_code == 0, (args, result.output)
    assert "seen by the monitor" in runner.invoke(main, ["--database-url", url, "jobs", "show", str(handle.id)]).output
    # The doctor runs too: what the role may not see becomes a note, not a failure.
    result = runner.invoke(main, ["--database-url", url, "doctor"])
    assert result.exit_code == 0, result.output
    assert "claim plan not checked" in result.output
