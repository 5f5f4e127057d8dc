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
    """A producer and a worker role with exactly pgq's grants (roles are cluster-wide: unique names)."""
    suffix = uuid.uuid4().hex[:8]
    names = {"producer": f"pgq_producer_{suffix}", "worker": f"pgq_worker_{suffix}"}
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
    worker = WorkerProcess(roles["worker"], "-c", "2")
    try:
        assert handle.get(timeout=20) == 42
        with pytest.raises(pgq.TaskFailed, match="as the worker role"):
            failing.get(timeout=20)
        wait_for(lambda: scalar(conn, "SELECT count(*) FROM pgq.workers") == 1, what="worker row")
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
        for statement in ("INSERT INTO pgq.jobs (task_name) VALUES ('x')", "DELETE FROM pgq.jobs",
                          "DROP TABLE pgq.results"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                worker_conn.execute(statement)
