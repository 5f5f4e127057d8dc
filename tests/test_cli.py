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


def test_status_shows_jobs_finished_per_minute_over_1_5_and_15_minutes(runner, conn, db_url):
    # Jobs of queue q finished 30 s, 3 min, 10 min and 20 min ago: in the 1, 5 and 15 minute windows
    # (cumulative) 1, 2 and 3 of them; the 20-minute-old one in none. Plus a failure 2 minutes ago.
    conn.execute("""
        INSERT INTO pgq.jobs (queue, task_name, status, attempts, started_at, finished_at)
        SELECT 'q', 'tests.add', s, 1, now() - ago - interval '1 second', now() - ago
        FROM (VALUES ('succeeded', interval '30 seconds'), ('succeeded', interval '3 minutes'),
                     ('succeeded', interval '10 minutes'), ('succeeded', interval '20 minutes'),
                     ('failed', interval '2 minutes')) AS v(s, ago)
    """)
    conn.execute("INSERT INTO pgq.jobs (queue, task_name) VALUES ('idle', 'tests.add')")
    as_json = json.loads(runner.invoke(main, ["--database-url", db_url, "status", "--json"]).output)
    finished = as_json["queues"]["q"]["finished"]
    assert {w: c["succeeded"] for w, c in finished.items()} == {"1m": 1, "5m": 2, "15m": 3}
    assert {w: c["failed"] for w, c in finished.items()} == {"1m": 0, "5m": 1, "15m": 1}
    assert as_json["queues"]["q"]["counts"]["succeeded"] == 4 and as_json["queues"]["idle"]["finished"]["15m"] == {
        "succeeded": 0, "failed": 0, "cancelled": 0}
    assert as_json["now"]

    result = runner.invoke(main, ["--database-url", db_url, "status"])
    assert result.exit_code == 0, result.output
    rows = {row[0]: row for row in (re.split(r"\s{2,}", line.strip()) for line in result.output.splitlines())}
    assert rows["finished per minute"] == ["finished per minute", "last 1m", "last 5m", "last 15m"]
    assert rows["q succeeded"] == ["q succeeded", "1.0", "0.4", "0.2"]  # per minute: 1/1, 2/5, 3/15
    assert rows["q failed"] == ["q failed", "0", "0.2", "0.1"]
    assert "idle succeeded" not in rows and "workers alive: 0" in result.output

    conn.execute("DELETE FROM pgq.jobs WHERE queue = 'q'")
    quiet = runner.invoke(main, ["--database-url", db_url, "status"]).output
    assert "finished per minute: no job finished in the last 15m" in quiet


def test_status_fits_the_terminal_but_never_cuts_counts(runner, conn, db_url):
    conn.execute("INSERT INTO pgq.jobs (queue, task_name) VALUES (%s, 'tests.add')", ("q" * 60,))
    narrow = runner.invoke(main, ["--database-url", db_url, "status"], env={"COLUMNS": "90"})
    assert narrow.exit_code == 0, narrow.output
    lines = narrow.output.splitlines()
    assert max(len(line) for line in lines) <= 90 and "q" * 60 not in narrow.output
    assert re.search(r"^q+…\s+1\s+0\s+0\s+0\s+0\s+0\s+\S+$", narrow.output, flags=re.MULTILINE), narrow.output
    too_narrow = runner.invoke(main, ["--database-url", db_url, "status"], env={"COLUMNS": "20"}).output
    assert "oldest due" in too_narrow and "cancelled" in too_narrow  # wider than asked, rather than a column lost
