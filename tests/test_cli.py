"""The pgq command: arguments, output and one-line errors (CliRunner); signals are in test_worker."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

from pgq.cli import main
from tests import apps


@pytest.fixture
def runner():
    return CliRunner()


def test_help_lists_every_command_and_worker_setting(runner):
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in ("migrate", "worker", "status"):
        assert command in result.output
    worker_help = runner.invoke(main, ["worker", "--help"]).output
    for flag, env in [("--queues", "PGQ_QUEUES"), ("--concurrency", "PGQ_CONCURRENCY"), ("--pool", "PGQ_POOL"),
                      ("--poll-interval", "PGQ_POLL_INTERVAL"), ("--shutdown-grace", "PGQ_SHUTDOWN_GRACE"),
                      ("--no-listen", "PGQ_LISTEN"), ("--rescue-interval", "PGQ_RESCUE_INTERVAL")]:
        assert flag in worker_help and env in worker_help, flag


def test_migrate_then_status(runner, empty_db_url):
    result = runner.invoke(main, ["--database-url", empty_db_url, "migrate"])
    assert result.exit_code == 0, result.output
    assert "pgq schema is at revision" in result.output
    result = runner.invoke(main, ["--database-url", empty_db_url, "status"])
    assert result.exit_code == 0, result.output
    assert "(no jobs)" in result.output


def test_status_counts_per_queue_and_state(runner, app, conn, db_url):
    apps.add.delay(1, 2)
    apps.add.delay(1, 2)
    apps.send_email.delay("a@example.com")
    failed = apps.fail.delay()
    with app.worker(queues=["default"], concurrency=1).running(), pytest.raises(Exception, match="boom"):
        failed.get(timeout=10)
    apps.add.delay(3, 4)  # one left waiting in default
    result = runner.invoke(main, ["--database-url", db_url, "-A", "tests.apps", "status"])
    assert result.exit_code == 0, result.output
    rows = [re.split(r"\s{2,}", line.strip()) for line in result.output.splitlines() if line.strip()]
    lines = {row[0]: row for row in rows}
    header = lines["queue"]
    default = dict(zip(header, lines["default"], strict=True))
    emails = dict(zip(header, lines["emails"], strict=True))
    assert (default["queued"], default["succeeded"], default["failed"]) == ("1", "2", "1")
    assert emails["queued"] == "1"
    as_json = json.loads(runner.invoke(main, ["--database-url", db_url, "status", "--json"]).output)
    assert as_json["queues"]["default"]["counts"]["succeeded"] == 2
    assert as_json["queues"]["emails"]["oldest_due_seconds"] >= 0
    assert as_json["workers"] == []  # the in-process worker deregistered on stop


def _one_line_error(result, *needles):
    assert result.exit_code == 1, result.output
    err = result.stderr.strip()
    assert err.count("\n") == 0 and err.startswith("Error: "), err
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in err, err


def test_unreachable_database_is_one_line(runner):
    result = runner.invoke(main, ["--database-url", "postgresql://u:p@127.0.0.1:1/x", "status"])
    _one_line_error(result, "cannot connect to the database")


def test_unmigrated_database_says_to_migrate(runner, empty_db_url):
    result = runner.invoke(main, ["--database-url", empty_db_url, "status"])
    _one_line_error(result, "pgq migrate")
    result = runner.invoke(main, ["--database-url", empty_db_url, "-A", "tests.apps", "worker"])
    _one_line_error(result, "pgq migrate")


@pytest.mark.parametrize(
    ("target", "needle"),
    [("no_such_module_xyz", "cannot import module"), ("tests.apps:nope", "has no attribute 'nope'"),
     ("tests.apps:add", "is not a pgq.App"), ("tests.helpers", "no pgq.App found")],
)
def test_bad_app_target_is_one_line(runner, db_url, target, needle):
    _one_line_error(runner.invoke(main, ["--database-url", db_url, "-A", target, "status"]), needle)


def test_debug_shows_the_traceback(runner):
    result = runner.invoke(main, ["-l", "debug", "--database-url", "postgresql://u:p@127.0.0.1:1/x", "status"])
    assert result.exit_code != 0
    assert result.exception is not None  # re-raised for the traceback instead of the one-liner


def test_app_module_without_attribute_is_found(runner, db_url):
    result = runner.invoke(main, ["--database-url", db_url, "-A", "tests.apps", "status"])
    assert result.exit_code == 0, result.output


def test_wrong_password_is_one_line(runner, password_role):
    from psycopg.conninfo import make_conninfo

    from tests.helpers import wait_for

    role, good_url = password_role
    # pg_reload_conf() is asynchronous: wait until the server asks for the password.
    wait_for(lambda: runner.invoke(main, ["--database-url", make_conninfo(good_url, password="nope"), "status"])
             .exit_code == 1, what="the password rule to be in force")
    bad = runner.invoke(main, ["--database-url", make_conninfo(good_url, password="wrong"), "status"])
    _one_line_error(bad, "password authentication failed", role)
    good = runner.invoke(main, ["--database-url", good_url, "status"])
    assert "password authentication failed" not in good.output
