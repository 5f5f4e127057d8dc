"""Retention: finished jobs and their results are deleted past their state's retention, in short batches,
by one worker per round (no advisory lock), automatically by running workers and by `pgq prune`."""

from __future__ import annotations

import threading
from datetime import timedelta

import psycopg
import pytest
from click.testing import CliRunner

import pgq
from pgq import pruner
from pgq.cli import main
from tests import apps
from tests.helpers import scalar, wait_for

# Finished jobs (and a result each) of one state, finished `age` ago, in one statement.
_FINISHED = """
WITH made AS (
    INSERT INTO pgq.jobs (task_name, status, attempts, created_at, run_at, started_at, finished_at)
    SELECT 'tests.add', %(status)s, 1, now() - %(age)s::interval - interval '1 minute',
           now() - %(age)s::interval - interval '1 minute', now() - %(age)s::interval - interval '30 seconds',
           now() - %(age)s::interval - g * interval '1 millisecond'
    FROM generate_series(1, %(n)s) AS g
    RETURNING id, status
)
INSERT INTO pgq.results (job_id, status, result) SELECT id, status, '42' FROM made
"""


def finished(conn, n: int, status: str = "succeeded", age: str = "2 days") -> None:
    conn.execute(_FINISHED, {"n": n, "status": status, "age": age})


def counts(conn) -> dict[str, int]:
    return dict(conn.execute("SELECT status, count(*) FROM pgq.jobs GROUP BY status").fetchall())


def test_durations_parse_and_format():
    assert pruner.parse_duration("90") == timedelta(seconds=90)
    assert pruner.parse_duration("1d12h") == timedelta(hours=36)
    assert pruner.parse_duration("2w") == timedelta(days=14)
    assert pruner.parse_duration(" 15m ") == timedelta(minutes=15)
    assert pruner.parse_duration("forever") is None
    for bad in ("-1", "1x", "d", "1d garbage", ""):
        with pytest.raises(ValueError):
            pruner.parse_duration(bad)
    assert pruner.format_duration(timedelta(days=7)) == "7d"
    assert pruner.format_duration(timedelta(hours=36)) == "36h"
    assert pruner.format_duration(timedelta(seconds=1.5)) == "1.5s"
    assert pruner.retention({"failed": "forever"})["failed"] is None
    with pytest.raises(ValueError, match="finished states"):
        pruner.retention({"running": "1d"})


def test_prune_deletes_in_batches_each_its_own_transaction(conn):
    finished(conn, 22_000)  # past the 1-day retention of successes
    finished(conn, 300, age="1 hour")  # within it
    conn.execute("INSERT INTO pgq.jobs (task_name, created_at, run_at) SELECT 'tests.add', "
                 "now() - interval '60 days', now() - interval '60 days' FROM generate_series(1, 50)")
    seen: list[int] = []
    stats = pruner.prune(conn, pruner.retention(), batch_size=5_000, progress=lambda s: seen.append(s.total))

    assert stats.jobs == {"succeeded": 22_000, "failed": 0, "cancelled": 0}
    assert stats.results == 22_000
    assert [b.jobs for b in stats.batches] == [5_000, 5_000, 5_000, 5_000, 2_000]
    assert seen == [5_000, 10_000, 15_000, 20_000, 22_000]
    xids = [b.xid for b in stats.batches]
    assert len(set(xids)) == len(xids) and xids == sorted(xids), "each batch commits in its own transaction"
    assert not stats.more
    assert counts(conn) == {"succeeded": 300, "queued": 50}  # recent and unfinished jobs are untouched
    assert scalar(conn, "SELECT count(*) FROM pgq.results") == 300
    print(f"\npruned {stats.total} jobs in {len(stats.batches)} batches, {stats.seconds:.2f} s "
          f"({stats.total / stats.seconds:,.0f} jobs/s)")


def test_failures_are_kept_longer_than_successes(conn):
    for status in ("succeeded", "cancelled", "failed"):
        for age in ("2 days", "10 days", "40 days"):
            finished(conn, 10, status=status, age=age)
    stats = pruner.prune(conn, pruner.retention())
    assert stats.jobs == {"succeeded": 30, "cancelled": 20, "failed": 10}
    left = conn.execute("SELECT status, count(*) FROM pgq.jobs GROUP BY 1").fetchall()
    assert dict(left) == {"cancelled": 10, "failed": 20}  # cancelled kept 7 days, failed 30 days
    assert scalar(conn, "SELECT count(*) FROM pgq.results") == 30
    # Kept forever: nothing of that state is ever deleted.
    assert pruner.prune(conn, pruner.retention({"failed": None, "cancelled": "1s"})).jobs["failed"] == 0
    assert counts(conn) == {"failed": 20}


def test_two_workers_never_prune_the_same_round(app, conn):
    finished(conn, 6_000)
    pruners = [pruner.Pruner(app, interval=3600, batch_size=1_000, owner=f"w{i}") for i in range(8)]
    winners_per_round = []
    deleted = 0
    try:
        for _ in range(5):
            start = threading.Barrier(len(pruners))
            results: list[pruner.PruneRound | None] = [None] * len(pruners)

            def ask(i: int, start: threading.Barrier = start, results: list = results) -> None:
                start.wait(timeout=10)
                results[i] = pruners[i].run_once()

            threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(pruners))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=30)
            winners = [i for i, r in enumerate(results) if r is not None]
            winners_per_round.append(len(winners))
            deleted += sum(r.stats.total for r in results if r is not None)
            # Nobody gets the round again before it is due (an hour from now) ...
            assert all(p.run_once() is None for p in pruners)
            row = conn.execute("SELECT last_run_by, last_deleted, next_run_at > now() + interval '59 minutes' "
                               "FROM pgq.maintenance_runs WHERE name = 'prune'").fetchone()
            assert row[0] == f"w{winners[0]}" and row[2]
            # ... so make the next round due, as the clock would.
            conn.execute("UPDATE pgq.maintenance_runs SET next_run_at = now() WHERE name = 'prune'")
    finally:
        for p in pruners:
            p._close()
    assert winners_per_round == [1] * 5
    assert deleted == 6_000


def test_a_round_stopped_with_work_left_hands_the_next_one_out_at_once(app, conn):
    finished(conn, 100)
    first = pruner.Pruner(app, interval=3600, owner="first")
    second = pruner.Pruner(app, interval=3600, owner="second")
    try:
        first.stop()  # the round is taken, and stops before its first batch (as at worker shutdown)
        stopped = first.run_once()
        assert stopped is not None and stopped.stats.more and stopped.stats.total == 0
        assert scalar(conn, "SELECT next_run_at <= now() FROM pgq.maintenance_runs WHERE name = 'prune'")
        done = second.run_once()
        assert done is not None and done.stats.total == 100 and not done.stats.more
        assert second.run_once() is None
    finally:
        first._close()
        second._close()


def test_workers_prune_by_themselves(app, conn):
    finished(conn, 12_000)
    finished(conn, 5, status="failed")
    worker = app.worker(concurrency=1, retention={"succeeded": timedelta(milliseconds=300)}, prune_interval=0.2)
    with worker.running():
        wait_for(lambda: counts(conn) == {"failed": 5}, timeout=30, what="the old successes to be pruned")
        handle = apps.add.delay(1, 2)
        assert handle.get(timeout=10) == 3
        # Its own job, too, once it is older than the 300 ms retention.
        wait_for(lambda: scalar(conn, "SELECT count(*) FROM pgq.jobs WHERE id = %s", (handle.id,)) == 0,
                 timeout=20, what="the new job to be pruned")
        row = conn.execute("SELECT last_run_by, last_finished_at IS NOT NULL FROM pgq.maintenance_runs").fetchone()
        assert row == (worker.id, True)
        assert any(t.name == "pgq-pruner" for t in threading.enumerate())
    assert not any(t.name == "pgq-pruner" for t in threading.enumerate())
    with pytest.raises(pgq.JobNotFound):
        handle.get(timeout=1)


def test_pruning_can_be_turned_off(app, conn):
    finished(conn, 10)
    assert app.worker(prune_interval=None).pruner is None
    assert app.worker(retention=dict.fromkeys(pruner.STATES)).pruner is None  # everything kept forever
    with app.worker(concurrency=1, prune_interval=None).running():
        assert apps.add.delay(2, 2).get(timeout=10) == 4
    assert scalar(conn, "SELECT count(*) FROM pgq.maintenance_runs") == 0
    assert counts(conn) == {"succeeded": 11}


def test_prune_command_reports_progress_and_totals(conn, db_url):
    finished(conn, 12_000)
    finished(conn, 40, status="failed", age="10 days")
    finished(conn, 7, status="cancelled", age="10 days")
    runner = CliRunner()
    dry = runner.invoke(main, ["--database-url", db_url, "prune", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "succeeded: 12,000 job(s) finished more than 1d ago would be deleted" in dry.stdout
    assert "failed: 0 job(s)" in dry.stdout and "cancelled: 7 job(s)" in dry.stdout
    assert counts(conn) == {"succeeded": 12_000, "failed": 40, "cancelled": 7}

    result = runner.invoke(main, ["--database-url", db_url, "prune", "--state", "succeeded", "--batch-size", "5000"])
    assert result.exit_code == 0, result.output
    assert "deleted 5,000 job(s) so far (1 batch(es))" in result.stderr
    assert "deleted 12,000 job(s) (12,000 succeeded) and 12,000 result(s) in 3 batch(es)" in result.stdout
    assert counts(conn) == {"failed": 40, "cancelled": 7}

    # The same PGQ_KEEP_* variables as the workers; --older-than wins over them.
    result = runner.invoke(main, ["--database-url", db_url, "prune"], env={"PGQ_KEEP_FAILED": "9d"})
    assert result.exit_code == 0, result.output
    assert "deleted 47 job(s) (0 succeeded, 40 failed, 7 cancelled)" in result.stdout
    finished(conn, 3, status="failed", age="2 hours")
    result = runner.invoke(main, ["--database-url", db_url, "prune", "--state", "failed,cancelled",
                                  "--older-than", "1h"])
    assert "deleted 3 job(s) (3 failed, 0 cancelled)" in result.stdout
    assert counts(conn) == {}


def test_prune_command_refuses_unfinished_states_and_bad_durations(db_url):
    runner = CliRunner()
    result = runner.invoke(main, ["--database-url", db_url, "prune", "--state", "running"])
    assert result.exit_code == 2 and "only finished jobs are pruned" in result.output
    result = runner.invoke(main, ["--database-url", db_url, "prune", "--older-than", "soon"])
    assert result.exit_code == 2 and "not a duration" in result.output
    result = runner.invoke(main, ["--database-url", db_url, "prune", "--older-than", "forever"])
    assert result.exit_code == 2 and "finite duration" in result.output


def test_worker_flags_and_environment_set_the_retention(monkeypatch):
    captured = {}

    def fake_worker(self, **settings):
        captured.update(settings)

        class Stub:
            def run(self):
                return None

        return Stub()

    monkeypatch.setattr(pgq.App, "worker", fake_worker)
    runner = CliRunner()
    result = runner.invoke(main, ["-A", "tests.apps", "worker", "--keep-succeeded", "6h", "--keep-failed", "forever"],
                           env={"PGQ_KEEP_CANCELLED": "2d", "PGQ_PRUNE_INTERVAL": "30"})
    assert result.exit_code == 0, result.output
    assert captured["retention"] == {"succeeded": timedelta(hours=6), "failed": None,
                                     "cancelled": timedelta(days=2)}
    assert captured["prune_interval"] == 30
    result = runner.invoke(main, ["-A", "tests.apps", "worker"], env={"PGQ_PRUNE": "0"})
    assert result.exit_code == 0, result.output
    assert captured["prune_interval"] is None
    assert captured["retention"] == pruner.DEFAULT_RETENTION


def test_pruning_skips_jobs_being_retried_by_hand(conn):
    finished(conn, 3, status="failed", age="40 days")
    ids = [row[0] for row in conn.execute("SELECT id FROM pgq.jobs ORDER BY id")]
    with psycopg.connect(conn.info.dsn, autocommit=False) as other:
        other.execute("SELECT id FROM pgq.jobs WHERE id = %s FOR UPDATE", (ids[0],))  # a retry by hand, say
        stats = pruner.prune(conn, pruner.retention())
        assert stats.jobs["failed"] == 2  # the locked row is skipped, not waited for
    assert [row[0] for row in conn.execute("SELECT id FROM pgq.jobs")] == [ids[0]]
