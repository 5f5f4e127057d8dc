"""Cancellation: a waiting job ends cancelled at once; a running job's worker learns of the request on
its heartbeat, records the job cancelled and interrupts the task; a job that finished first keeps its
outcome; nothing hands a cancel-requested job back to the queue; the CLI."""

from __future__ import annotations

import json
import re
import time
import uuid

import psycopg
import psycopg.errors
import pytest
from click.testing import CliRunner
from psycopg import sql as psql
from psycopg.conninfo import make_conninfo

import pgq
from pgq import maintenance, sql
from pgq.cli import main
from pgq.executor import Cancelled
from tests.control_apps import block, plain, spin
from tests.helpers import WorkerProcess, job, scalar, wait_for, wait_registered


def _result(conn, job_id):
    return conn.execute("SELECT status, result, error_type, error_message FROM pgq.results WHERE job_id = %s",
                        (job_id,)).fetchone()


def _runs(conn, job_id):
    return [r[0] for r in conn.execute("SELECT event FROM control_runs WHERE job_id = %s ORDER BY at",
                                       (job_id,)).fetchall()]


def _running(conn, job_id, attempts=1, worker="w"):
    """As a claim leaves the job, with its claim token equal to its attempt number."""
    conn.execute("UPDATE pgq.jobs SET status = 'running', attempts = %s, worker_id = %s, started_at = now(), "
                 "lease_expires_at = now() + interval '1 minute', claim_token = %s WHERE id = %s",
                 (attempts, worker, attempts, job_id))


# --- waiting jobs --------------------------------------------------------------------------------------


def test_cancel_waiting_jobs_at_once_and_they_never_run(capp, conn):
    queued = plain.delay("q")
    retrying = plain.delay("r")
    conn.execute("UPDATE pgq.jobs SET status = 'retrying', attempts = 1 WHERE id = %s", (retrying.id,))

    assert queued.cancel() == "cancelled"
    assert capp.cancel(retrying.id) == "cancelled"
    assert capp.cancel(queued.id) == "cancelled"  # again: no change

    for handle, message in [(queued, "cancelled before it ran"),
                            (retrying, "cancelled while waiting to be retried (after attempt 1)")]:
        row = job(conn, handle.id)
        assert row["status"] == "cancelled" and row["finished_at"] is not None
        assert row["cancel_requested_at"] is not None
        assert _result(conn, handle.id) == ("cancelled", None, "TaskCancelled", message)
        with pytest.raises(pgq.TaskCancelled, match=re.escape(f"job {handle.id} was {message}")):
            handle.get(timeout=1)
        assert handle.status == "cancelled" and handle.ready()

    later = plain.delay("after")
    with capp.worker(concurrency=2, poll_interval=0.1).running():
        assert later.get(timeout=10) == "after"
    assert scalar(conn, "SELECT count(*) FROM pgq.jobs WHERE status = 'cancelled' AND started_at IS NULL") == 2
    assert job(conn, retrying.id)["attempts"] == 1 and job(conn, queued.id)["attempts"] == 0


def test_cancel_unknown_and_finished_jobs(capp, conn):
    with pytest.raises(pgq.JobNotFound, match="no job with id 999999"):
        capp.cancel(999999)
    done = plain.delay(1)
    conn.execute("UPDATE pgq.jobs SET status = 'succeeded', attempts = 1, finished_at = now() WHERE id = %s",
                 (done.id,))
    before = job(conn, done.id)
    assert capp.cancel(done.id) == "succeeded"
    assert job(conn, done.id) == before  # a finished job is left exactly as it was


# --- running jobs ------------------------------------------------------------------------------------


def test_cancel_running_task_interrupts_it_and_the_slot_is_reused(capp, conn):
    handle = spin.delay()
    with capp.worker(concurrency=1, poll_interval=0.1, rescue_interval=0.2).running() as worker:
        wait_for(lambda: _runs(conn, handle.id) == ["started"], what="the task to start")
        requested = time.monotonic()
        assert handle.cancel() == "running"
        assert job(conn, handle.id)["cancel_requested_at"] is not None
        with pytest.raises(pgq.TaskCancelled, match="cancelled while running \\(attempt 1\\)"):
            handle.get(timeout=10)
        noticed = time.monotonic() - requested
        # The task was interrupted (CancelRequested), and saw is_cancelled() in its finally.
        wait_for(lambda: _runs(conn, handle.id) == ["started", "interrupted", "saw is_cancelled"],
                 what="the task to be interrupted")
        # The single slot runs the next job.
        assert plain.delay("next").get(timeout=10) == "next"
        # get() returns at the outcome's commit; the recorder forgets the job a moment later.
        wait_for(lambda: worker.held_count() == 0, timeout=5, what="the worker to forget its jobs")
    row = job(conn, handle.id)
    assert (row["status"], row["attempts"], row["lease_expires_at"]) == ("cancelled", 1, None)
    assert [(e["attempt"], e["type"], e["message"]) for e in row["errors"]] == [
        (1, "TaskCancelled", "cancelled while running (attempt 1)")]
    assert _result(conn, handle.id) == ("cancelled", None, "TaskCancelled", "cancelled while running (attempt 1)")
    print(f"cancellation of a running job took effect after {noticed:.2f} s")


def test_cancel_task_blocked_in_c_is_recorded_at_once_and_its_thread_abandoned(capp, conn):
    handle = block.delay(30)
    with capp.worker(concurrency=1, poll_interval=0.1, rescue_interval=0.2).running() as worker:
        wait_for(lambda: _runs(conn, handle.id) == ["started"], what="the task to start")
        assert capp.cancel(handle.id) == "running"
        with pytest.raises(pgq.TaskCancelled):
            handle.get(timeout=10)
        assert plain.delay("next").get(timeout=10) == "next"  # a fresh runner took the blocked one's slot
        # get() returns at the outcome's commit; the recorder forgets the job a moment later.
        wait_for(lambda: worker.held_count() == 0, timeout=5, what="the worker to forget its jobs")
        worker.stop(hurry=True)  # do not wait 30 s for the abandoned sleep
    assert _runs(conn, handle.id) == ["started"]  # the sleep never came back while the worker ran
    assert job(conn, handle.id)["status"] == "cancelled"


def test_job_claimed_but_not_started_is_never_run(capp, conn):
    handle = spin.delay()
    worker = capp.worker(concurrency=1)
    try:
        [claimed] = worker._claim(1)
    finally:
        worker._drop_claim_conn()
    assert capp.cancel(handle.id) == "running"  # claimed: running, from the database's point of view
    worker.keeper.heartbeat(worker.keeper._connection())
    worker.keeper._close()
    [(recorded_job, outcome, _)] = [worker.recorder.outcomes.popleft()]
    assert (recorded_job.id, outcome) == (handle.id, Cancelled("cancelled while running (attempt 1)"))
    worker._execute(claimed)  # a runner picks it up now: it does not run
    assert _runs(conn, handle.id) == []
    assert not worker.recorder.outcomes


def test_job_that_finishes_before_its_worker_notices_keeps_its_outcome(capp, conn):
    """Succeeded wins: the request arrives while the task returns, before the worker's next heartbeat."""
    handle = plain.delay("done")
    worker = capp.worker(concurrency=1)
    try:
        [claimed] = worker._claim(1)
    finally:
        worker._drop_claim_conn()
    assert capp.cancel(handle.id) == "running"
    worker._execute(claimed)  # the task ran and returned; its success is queued for the recorder
    assert worker.cancel_requested([handle.id]) == 0  # the heartbeat comes too late: nothing to cancel
    with worker.keeper._connection() as keeper_conn:
        worker.recorder.record(keeper_conn, [worker.recorder.outcomes.popleft()[:2]])
    assert handle.get(timeout=1) == "done"
    row = job(conn, handle.id)
    assert row["status"] == "succeeded" and row["cancel_requested_at"] is not None
    assert capp.cancel(handle.id) == "succeeded"


# --- nothing hands a cancel-requested job back -------------------------------------------------------


def _entry(attempt):
    return json.dumps({"attempt": attempt, "type": "ValueError", "message": "boom", "traceback": None})


def _retry(conn, job_id):
    return conn.execute(sql.RETRY, {"id": job_id, "token": 1, "delay": 0.0, "error": "ValueError: boom",
                                    "entry": _entry(1)}).fetchall()


def _release(conn, job_id):
    return conn.execute(sql.RELEASE, {"ids": [job_id], "tokens": [1]}).fetchall()


def _rescue(conn, job_id):
    conn.execute("UPDATE pgq.jobs SET lease_expires_at = now() - interval '1 second' WHERE id = %s", (job_id,))
    return [r[:2] for r in maintenance.rescue_expired(conn)]


@pytest.mark.parametrize(("hand_back", "returned", "message"), [
    (_retry, "[(id,)]", "cancelled while running (attempt 1)"),
    (_release, "[(id,)]", "cancelled before it ran"),
    (_rescue, "[(id, 'cancelled')]", "cancelled while running (attempt 1; its worker was lost)"),
], ids=["retry", "release", "rescue"])
def test_cancel_requested_job_ends_cancelled_instead_of_waiting_again(capp, conn, hand_back, returned, message):
    handle = plain.delay(1)
    _running(conn, handle.id)
    assert capp.cancel(handle.id) == "running"
    assert str(hand_back(conn, handle.id)).replace(str(handle.id), "id") == returned
    row = job(conn, handle.id)
    assert row["status"] == "cancelled" and row["finished_at"] is not None and row["lease_expires_at"] is None
    assert _result(conn, handle.id) == ("cancelled", None, "TaskCancelled", message)
    # And without a request, the same statements hand the job back as before.
    other = plain.delay(2)
    _running(conn, other.id)
    hand_back(conn, other.id)
    assert job(conn, other.id)["status"] in ("queued", "retrying") and _result(conn, other.id) is None


def test_late_writes_never_overwrite_cancelled(capp, conn):
    handle = plain.delay(1)
    _running(conn, handle.id)
    assert capp.cancel(handle.id) == "running"
    conn.execute(sql.CANCEL_RUNNING, {"id": handle.id, "token": 1, "entry": _entry(1), "message": "cancelled"})
    before = job(conn, handle.id), _result(conn, handle.id)
    late = {"ids": [handle.id], "tokens": [1], "results": ['"late"']}
    assert conn.execute(sql.COMPLETE_MANY, late).fetchall() == []
    assert conn.execute(sql.FAIL, {"id": handle.id, "token": 1, "error": "x", "entry": _entry(1), "error_type": "X",
                                   "error_message": "x", "traceback": None}).fetchall() == []
    assert _retry(conn, handle.id) == [] and _release(conn, handle.id) == []
    assert conn.execute(sql.EXTEND_LEASES, {"ids": [handle.id], "tokens": [1]}).fetchall() == []
    assert (job(conn, handle.id), _result(conn, handle.id)) == before


# --- the CLI, against a worker process --------------------------------------------------------------


def test_pgq_cancel_command_with_a_worker_process(capp, conn, db_url):
    worker = WorkerProcess(db_url, "-c", "2", app="tests.control_apps")
    try:
        wait_registered(conn, worker)
        running = spin.delay()
        wait_for(lambda: _runs(conn, running.id) == ["started"], what="the task to start")
        waiting = plain.apply_async(args=(1,), countdown=3600)
        done = plain.delay(2)
        assert done.get(timeout=20) == 2
        result = CliRunner().invoke(main, ["--database-url", db_url, "cancel", str(running.id), str(waiting.id),
                                           str(done.id), "999999"])
        assert result.exit_code == 1, result.output
        assert result.stdout.splitlines() == [
            f"job {running.id}: running, asked to stop (its worker stops it at its next heartbeat)",
            f"job {waiting.id}: cancelled",
            f"job {done.id}: succeeded already, left alone",
        ]
        assert result.stderr.strip() == "Error: no job with id 999999"
        with pytest.raises(pgq.TaskCancelled):
            running.get(timeout=20)
        wait_for(lambda: "interrupted" in _runs(conn, running.id), what="the task to be interrupted")
    finally:
        output = worker.stop()
    assert f"job {running.id} control.spin attempt 1/3 cancelled" in output
    assert job(conn, waiting.id)["status"] == "cancelled"


# --- least privilege -----------------------------------------------------------------------------------


def test_producer_enqueues_unique_jobs_and_control_role_cancels_and_retries(capp, conn, db_url):
    suffix = uuid.uuid4().hex[:8]
    names = {"producer": f"pgq_producer_{suffix}", "control": f"pgq_control_{suffix}"}
    urls = {}
    try:
        for kind, name in names.items():
            conn.execute(psql.SQL("CREATE ROLE {} LOGIN PASSWORD 'secret-pw'").format(psql.Identifier(name)))
            result = CliRunner().invoke(main, ["--database-url", db_url, "grants", "--role", name, "--kind", kind,
                                               "--apply"])
            assert result.exit_code == 0, result.output
            urls[kind] = make_conninfo(db_url, user=name, password="secret-pw")

        capp.set_database_url(urls["producer"])
        first = plain.apply_async(unique_key="roles", unique_for=60)  # the advisory lock needs no grant
        assert plain.apply_async(unique_key="roles", unique_for=60).id == first.id
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            first.cancel()

        capp.set_database_url(urls["control"])
        assert first.cancel() == "cancelled"
        assert capp.retry(first.id) == "queued"
        result = CliRunner().invoke(main, ["--database-url", urls["control"], "cancel", str(first.id)])
        assert result.exit_code == 0 and result.stdout == f"job {first.id}: cancelled\n"
        with pytest.raises(psycopg.errors.InsufficientPrivilege):  # …and it cannot enqueue
            plain.delay()
    finally:
        capp.close()
        for name in names.values():
            conn.execute(psql.SQL("DROP OWNED BY {}").format(psql.Identifier(name)))
            conn.execute(psql.SQL("DROP ROLE IF EXISTS {}").format(psql.Identifier(name)))
