"""A database crash must not make a job run twice at once.

A claim can be undone by a crash only when it was committed without waiting for the disk (the server's
or the session's ``synchronous_commit = off``): recovery then puts its job back as it was, and the next
claim takes the same attempt number. Each claim's random token tells the two apart. Deterministically
first (the lost claim is simulated by putting the row back as recovery would), then for real: repeated
immediate shutdowns of the test server under a busy fleet of ``pgq worker`` processes.
"""

from __future__ import annotations

import logging
import random
import time

import psycopg
import psycopg.sql
import pytest

from pgq import sql
from pgq.executor import Cancelled, ErrorInfo, Failed, RetryLater, Succeeded
from tests import control_apps, fault_apps
from tests.helpers import job, scalar, wait_for
from tests.test_faults import Fleet, _assert_exactly_once


def _undo_claim(conn: psycopg.Connection, job_id: int) -> None:
    """Put the job back as crash recovery does when the claim's commit never reached the disk."""
    conn.execute("UPDATE pgq.jobs SET status = 'queued', attempts = attempts - 1, worker_id = NULL, started_at = NULL, "
                 "lease_expires_at = NULL, claim_token = NULL WHERE id = %s", (job_id,))


def _events(conn, job_id: int) -> list[str]:
    return [r[0] for r in conn.execute("SELECT event FROM control_runs WHERE job_id = %s ORDER BY at",
                                       (job_id,)).fetchall()]


def test_writes_of_a_claim_a_crash_undid_are_refused_and_its_worker_learns_it(capp, conn, caplog):
    handle = control_apps.plain.delay("x")
    first, second = capp.worker(concurrency=1, worker_id="first"), capp.worker(concurrency=1, worker_id="second")
    try:
        [lost] = first._claim(1)
        _undo_claim(conn, handle.id)
        [current] = second._claim(1)
    finally:
        first._drop_claim_conn()
        second._drop_claim_conn()
    assert (lost.id, lost.attempt) == (current.id, current.attempt) == (handle.id, 1)
    assert lost.token != current.token
    before = job(conn, handle.id)

    error = ErrorInfo("ValueError", "late", None)
    with psycopg.connect(capp.database_url, autocommit=True) as recorder_conn, caplog.at_level(logging.WARNING):
        for outcome in (Succeeded('"late"'), RetryLater(0.0, error), Failed(error), Cancelled("late")):
            first.recorder.record(recorder_conn, [(lost, outcome)])
            assert job(conn, handle.id) == before, outcome  # refused: the row is the second claim's
    assert scalar(conn, "SELECT count(*) FROM pgq.results WHERE job_id = %s", (handle.id,)) == 0
    assert sum("claim lost before its" in r.getMessage() for r in caplog.records) == 4

    # The first worker learns it lost the job at its next heartbeat; the second keeps its lease.
    with psycopg.connect(capp.database_url, autocommit=True) as keeper_conn, caplog.at_level(logging.WARNING):
        caplog.clear()
        first.keeper.heartbeat(keeper_conn)
        first.keeper.heartbeat(keeper_conn)
        second.keeper.heartbeat(keeper_conn)
    assert first.held_tokens() == [] and [t[0] for t in second.held_tokens()] == [handle.id]
    assert [r.getMessage() for r in caplog.records if "claim lost" in r.getMessage()] == [
        f"job {handle.id} control.plain attempt 1: claim lost (its lease expired and it was rescued, or a "
        "database crash undid the claim); another worker may run it now"]  # once, though it heartbeated twice

    # The second claim's outcome is the one that counts.
    with psycopg.connect(capp.database_url, autocommit=True) as recorder_conn:
        second.recorder.record(recorder_conn, [(current, Succeeded('"second"'))])
    assert handle.get(timeout=1) == "second"


def test_a_running_task_whose_claim_a_crash_undid_is_interrupted_at_the_next_heartbeat(capp, conn):
    handle = control_apps.spin.delay(30.0)  # lease 2 s: a heartbeat every 0.67 s
    with capp.worker(concurrency=1, poll_interval=0.1, rescue_interval=0.2, worker_id="first").running() as worker:
        wait_for(lambda: _events(conn, handle.id) == ["started"], what="the task to start")
        _undo_claim(conn, handle.id)
        [row] = conn.execute(sql.CLAIM, {"queues": ["nowhere", "default"], "limit": 1,
                                         "worker_id": "second"}).fetchall()
        # The second worker is not here to heartbeat: its lease must outlast the test, or the first
        # worker's rescue would hand the job back to itself.
        conn.execute("UPDATE pgq.jobs SET lease_expires_at = now() + interval '1 hour' WHERE id = %s", (handle.id,))
        lost_at = time.monotonic()
        wait_for(lambda: "saw is_cancelled" in _events(conn, handle.id), timeout=10,
                 what="the task to be interrupted")
        took = time.monotonic() - lost_at
        wait_for(lambda: worker.held_count() == 0, what="the worker to forget the job")
        # Its single slot runs the next job: a fresh runner took the interrupted one's place.
        assert control_apps.plain.delay("next").get(timeout=10) == "next"
    assert _events(conn, handle.id) == ["started", "interrupted", "saw is_cancelled"]
    assert took < 2 * 0.67 + 1  # one heartbeat interval, and the time to notice
    after = job(conn, handle.id)  # nothing the first worker did reached the row: the second claim holds it
    assert (after["status"], after["worker_id"], after["claim_token"], after["errors"]) == (
        "running", "second", row[11], [])
    assert scalar(conn, "SELECT count(*) FROM pgq.results WHERE job_id = %s", (handle.id,)) == 0


def test_a_task_can_fence_its_own_writes_with_its_claim_token(capp, conn, db_url):
    """docs/guarantees.md: the check a task makes in its own transaction, before a write of its own."""
    fence = ("SELECT 1 FROM pgq.jobs WHERE id = %(id)s AND claim_token = %(token)s "
             "AND lease_expires_at IS NOT NULL FOR KEY SHARE")
    handle = control_apps.plain.delay("x")
    worker = capp.worker(concurrency=1)
    try:
        [claimed] = worker._claim(1)
    finally:
        worker._drop_claim_conn()
    mine = {"id": handle.id, "token": claimed.token}
    with psycopg.connect(db_url) as task_conn:  # the task's own transaction, open
        assert task_conn.execute(fence, mine).fetchall() == [(1,)]
        # While it is open, the lease may run out: the rescue passes the locked row by, heartbeats still go.
        conn.execute("UPDATE pgq.jobs SET lease_expires_at = now() - interval '1 second' WHERE id = %s", (handle.id,))
        assert conn.execute(sql.RESCUE, {"limit": 10}).fetchall() == []
        assert conn.execute(sql.EXTEND_LEASES, {"ids": [handle.id], "tokens": [claimed.token]}).fetchall() == [
            (handle.id, False)]
        task_conn.rollback()
    _undo_claim(conn, handle.id)
    conn.execute(sql.CLAIM, {"queues": ["default"], "limit": 1, "worker_id": "second"})
    with psycopg.connect(db_url) as task_conn:  # the lost claim's attempt finds nothing: it writes nothing
        assert task_conn.execute(fence, mine).fetchall() == []


def _crash_repeatedly(fapp, conn, db_url: str, restart_postgres, *worker_args: str,
                      durable: bool = True) -> tuple[list[int], list[str]]:
    """Four workers drain 400 jobs of 50-300 ms while the server is killed (pg_ctl stop -m immediate:
    no checkpoint, recovery at start) three times, at random moments. Returns the jobs and the workers'
    output; every job has succeeded. The record of executions (fault_runs) is written durably."""
    if durable:  # the test server does not wait for the disk (conftest); this database does, as production's
        conn.execute(psycopg.sql.SQL("ALTER DATABASE {} SET synchronous_commit = on").format(
            psycopg.sql.Identifier(conn.info.dbname)))
    rng = random.Random()
    with fapp.connection() as c:
        ids = [fault_apps.through_crashes.apply_async(args=(rng.uniform(0.05, 0.3),), connection=c).id
               for _ in range(400)]
    fleet = Fleet(db_url, 4, "-c", "4", *worker_args)
    crashes = 0
    try:
        for share in (0.15, 0.4, 0.65):
            wait_for(lambda s=share: _succeeded(db_url) >= s * len(ids), timeout=60, interval=0.1,
                     what=f"{share:.0%} of the jobs done")
            time.sleep(rng.uniform(0, 0.3))  # a random moment: claiming, running or recording
            conn.close()
            restart_postgres(0.3, mode="immediate")
            crashes += 1
        wait_for(lambda: _succeeded(db_url) == len(ids), timeout=120, interval=0.2, what="every job to succeed")
    finally:
        outputs = fleet.stop()
    assert crashes == 3
    assert any("database unavailable" in o for o in outputs)
    with psycopg.connect(db_url, autocommit=True) as after:
        # The outcome accepted for each job is that of a finished execution under the job's last claim.
        foreign = after.execute("""
            SELECT j.id, j.claim_token FROM pgq.jobs AS j
            WHERE NOT EXISTS (SELECT 1 FROM fault_runs AS r WHERE r.job_id = j.id AND r.token = j.claim_token
                                                             AND r.ended_at IS NOT NULL AND r.interrupted IS NULL)
        """).fetchall()
        assert foreign == [], f"outcomes accepted from no finished execution of their claim: {foreign[:10]}"
        assert scalar(after, "SELECT count(*) FROM fault_runs WHERE token IS NULL") == 0
    return ids, outputs


@pytest.mark.slow
def test_immediate_shutdowns_of_postgres_never_run_a_job_twice_at_once(fapp, conn, db_url, restart_postgres):
    """Claims wait for the disk, so no crash undoes one: no job runs twice at once, no attempt number is
    used twice, and every outcome accepted is its own claim's."""
    ids, outputs = _crash_repeatedly(fapp, conn, db_url, restart_postgres)
    with psycopg.connect(db_url, autocommit=True) as after:
        counts = _assert_exactly_once(after, ids)  # nothing lost, no attempt twice, no overlap
    assert not any("claim lost" in o for o in outputs), "a claim was undone by a crash"
    print(f"\nimmediate shutdowns, durable claims: {counts}")


@pytest.mark.slow
def test_immediate_shutdowns_with_non_durable_claims_overlap_for_one_heartbeat_at_most(
        fapp, conn, db_url, restart_postgres):
    """With --non-durable-claims on a server that waits for the disk for nothing else either (the test
    server: synchronous_commit = off), a crash undoes the last moments' claims and outcomes: an undone
    claim's job is claimed again under the same attempt number while the first worker still runs it. No
    outcome of an undone claim is accepted (above), nothing is lost, and two executions of one job
    overlap for at most one heartbeat (a third of the 6 s lease) plus the worker's reconnection after
    the outage and the task's last sleep."""
    ids, outputs = _crash_repeatedly(fapp, conn, db_url, restart_postgres, "--non-durable-claims", durable=False)
    with psycopg.connect(db_url, autocommit=True) as after:
        statuses = dict(after.execute("SELECT status, count(*) FROM pgq.jobs GROUP BY status").fetchall())
        assert statuses == {"succeeded": len(ids)}, statuses
        overlaps = after.execute("""
            SELECT a.job_id, extract(epoch FROM least(a.ended_at, b.ended_at) - b.started_at)::float8
            FROM fault_runs a JOIN fault_runs b
              ON a.job_id = b.job_id AND a.token <> b.token AND a.started_at <= b.started_at
            WHERE b.started_at < a.ended_at
        """).fetchall()
    longest = max((seconds for _, seconds in overlaps), default=0.0)
    assert longest < 2.0 + 1.5 + 0.3, overlaps
    undone = sum(o.count("claim lost") for o in outputs)
    print(f"\nimmediate shutdowns, non-durable claims: {len(overlaps)} overlapping executions "
          f"(longest {longest:.2f} s), {undone} claims lost")


def _succeeded(db_url: str) -> int:
    try:
        with psycopg.connect(db_url, autocommit=True, connect_timeout=2) as c:
            return scalar(c, "SELECT count(*) FROM pgq.jobs WHERE status = 'succeeded'")
    except psycopg.OperationalError:  # the server is still recovering
        return 0
