"""Leases, rescue and fencing, driven deterministically: rows are put in the state under test with SQL,
and pgq's statements and maintenance functions are called directly — no worker loop, no waiting."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

import pgq
from pgq import maintenance, sql
from tests import apps
from tests.helpers import job, scalar


def _running(conn: psycopg.Connection, job_id: int, *, attempts: int = 1, worker: str = "dead",
             lease: str = "-1 second", token: int | None = None) -> None:
    """Put the job in the state a worker's claim leaves it in, with its lease ending at now() + *lease*
    and claim token *token* (the attempt number, unless given: readable in these tests)."""
    conn.execute(
        "UPDATE pgq.jobs SET status = 'running', attempts = %s, worker_id = %s, started_at = now(), "
        "lease_expires_at = now() + %s::interval, claim_token = %s WHERE id = %s",
        (attempts, worker, lease, attempts if token is None else token, job_id),
    )


def _result(conn: psycopg.Connection, job_id: int) -> tuple | None:
    return conn.execute("SELECT status, result, error_type, error_message FROM pgq.results WHERE job_id = %s",
                        (job_id,)).fetchone()


# --- rescue --------------------------------------------------------------------------------------


def test_expired_lease_is_rescued_for_another_attempt(app, conn):
    handle = apps.add.delay(1, 2)  # max_attempts 3, retry_backoff 2
    _running(conn, handle.id, attempts=1, worker="dead")

    rows = maintenance.rescue_expired(conn)

    assert rows == [(handle.id, "retrying", "tests.add", 1, 3)]
    row = job(conn, handle.id)
    assert (row["status"], row["attempts"], row["lease_expires_at"], row["finished_at"]) == ("retrying", 1, None, None)
    assert row["last_error"] == ("lease expired on attempt 1 of 3: worker dead stopped heartbeating "
                                 "(killed, crashed or partitioned)")
    [error] = row["errors"]
    assert {k: error[k] for k in ("attempt", "type", "worker", "message")} == {
        "attempt": 1, "type": "LeaseExpired", "worker": "dead",
        "message": "lease expired: worker dead stopped heartbeating",
    }
    # Due again at once, not after the task's backoff (retry_backoff 2): the job did nothing wrong.
    rescued_at = scalar(conn, "SELECT (errors->0->>'at')::timestamptz FROM pgq.jobs WHERE id = %s", (handle.id,))
    assert row["run_at"] == rescued_at
    assert _result(conn, handle.id) is None
    assert handle.status == "retrying"
    # Rescuing again finds nothing: the row is no longer running.
    assert maintenance.rescue_expired(conn) == []


def test_job_rescued_many_times_is_due_at_once_every_time(app, conn):
    """The task's failure backoff (retry_backoff ** attempts: 2, 4, 8, 16 s here) is not for lost
    workers: the 4th rescue makes the job as due as the 1st."""
    handle = apps.add.apply_async(args=(1, 2), max_attempts=10, retry_backoff=2.0)
    for attempt in range(1, 5):
        _running(conn, handle.id, attempts=attempt, worker=f"dead-{attempt}")
        assert maintenance.rescue_expired(conn) == [(handle.id, "retrying", "tests.add", attempt, 10)]
        assert scalar(conn, "SELECT run_at <= now() FROM pgq.jobs WHERE id = %s", (handle.id,))
        [claimed] = conn.execute(sql.CLAIM, {"queues": ["default"], "limit": 1, "worker_id": "next"}).fetchall()
        assert (claimed[0], claimed[6]) == (handle.id, attempt + 1)  # id, attempt
    assert [e["worker"] for e in job(conn, handle.id)["errors"]] == ["dead-1", "dead-2", "dead-3", "dead-4"]


def test_rescue_notifies_the_queues_of_the_jobs_it_makes_due(app, conn, db_url):
    """Idle workers on other hosts learn of a rescued job from a NOTIFY, not at their next poll: one per
    queue (a limited job's as 'limited <queue>'), none for a job that ended failed."""
    mail = [apps.add.apply_async(args=(i, i), queue="mail").id for i in range(2)]
    limited = apps.add.apply_async(args=(1, 1), queue="reports").id
    last = apps.add.apply_async(args=(1, 1), queue="archive", max_attempts=1).id
    conn.execute("UPDATE pgq.jobs SET limited = true WHERE id = %s", (limited,))
    for job_id in [*mail, limited, last]:
        _running(conn, job_id)
    with psycopg.connect(db_url, autocommit=True) as listener:
        listener.execute("LISTEN pgq_jobs")
        assert len(maintenance.rescue_expired(conn)) == 4
        payloads = sorted(n.payload for n in listener.notifies(timeout=1, stop_after=3))
        assert payloads == ["limited reports", "mail"]  # the two of 'mail' folded into one
        assert list(listener.notifies(timeout=0.2)) == []  # nothing for 'archive': its job failed
    assert job(conn, last)["status"] == "failed"


def test_expired_lease_on_the_last_attempt_fails_the_job(app, conn):
    handle = apps.add.delay(1, 2)
    _running(conn, handle.id, attempts=3, worker="dead")

    assert maintenance.rescue_expired(conn) == [(handle.id, "failed", "tests.add", 3, 3)]

    row = job(conn, handle.id)
    assert (row["status"], row["attempts"], row["lease_expires_at"]) == ("failed", 3, None)
    assert row["finished_at"] is not None
    expected = ("lost its worker on every attempt (3 of 3): the lease expired each time; the task may be "
                "killing or hanging its worker")
    assert row["last_error"] == expected
    assert [e["type"] for e in row["errors"]] == ["LeaseExpired"]
    assert _result(conn, handle.id) == ("failed", None, "LeaseExpired", expected)
    with pytest.raises(pgq.TaskFailed) as info:
        handle.get(timeout=1)
    assert (info.value.type_name, info.value.message) == ("LeaseExpired", expected)


def test_rescue_leaves_live_leases_and_other_states_alone(app, conn):
    live, expired, waiting, done = (apps.add.delay(i, i).id for i in range(4))
    _running(conn, live, lease="30 seconds", worker="alive")
    _running(conn, expired, worker="dead")
    conn.execute("UPDATE pgq.jobs SET status = 'succeeded', attempts = 1, finished_at = now() WHERE id = %s", (done,))
    before = {i: job(conn, i) for i in (live, waiting, done)}

    assert [r[0] for r in maintenance.rescue_expired(conn)] == [expired]
    assert {i: job(conn, i) for i in (live, waiting, done)} == before


def test_rescue_takes_the_oldest_leases_first_up_to_the_limit(app, conn):
    ids = [apps.add.delay(i, i).id for i in range(3)]
    for job_id, lease in zip(ids, ["-1 second", "-3 seconds", "-2 seconds"], strict=True):
        _running(conn, job_id, lease=lease)

    assert [r[0] for r in maintenance.rescue_expired(conn, limit=2)] == [ids[1], ids[2]]
    assert job(conn, ids[0])["status"] == "running"
    assert [r[0] for r in maintenance.rescue_expired(conn, limit=2)] == [ids[0]]


def test_rescued_job_is_claimed_again_and_counts_the_lost_attempt(app, conn):
    handle = apps.add.delay(20, 22)
    _running(conn, handle.id, attempts=1, worker="dead")
    maintenance.rescue_expired(conn)

    with app.worker(concurrency=1, poll_interval=0.1).running():
        assert handle.get(timeout=10) == 42
    row = job(conn, handle.id)
    assert (row["status"], row["attempts"]) == ("succeeded", 2)
    assert row["worker_id"] != "dead"
    assert [e["type"] for e in row["errors"]] == ["LeaseExpired"]


# --- fencing -------------------------------------------------------------------------------------

def _entry(attempt: int) -> str:
    return json.dumps({"attempt": attempt, "type": "ValueError", "message": "late", "traceback": None})


def _complete(conn, job_id, token):
    return conn.execute(sql.COMPLETE_MANY, {"ids": [job_id], "tokens": [token], "results": ['"late"']}).fetchall()


def _retry(conn, job_id, token):
    return conn.execute(sql.RETRY, {"id": job_id, "token": token, "delay": 0.0, "error": "ValueError: late",
                                    "entry": _entry(1)}).fetchall()


def _fail(conn, job_id, token):
    return conn.execute(sql.FAIL, {"id": job_id, "token": token, "error": "ValueError: late",
                                   "entry": _entry(1), "error_type": "ValueError", "error_message": "late",
                                   "traceback": None}).fetchall()


def _cancel(conn, job_id, token):
    return conn.execute(sql.CANCEL_RUNNING, {"id": job_id, "token": token, "entry": _entry(1),
                                             "message": "cancelled"}).fetchall()


def _extend(conn, job_id, token):
    return conn.execute(sql.EXTEND_LEASES, {"ids": [job_id], "tokens": [token]}).fetchall()


def _release(conn, job_id, token):
    return conn.execute(sql.RELEASE, {"ids": [job_id], "tokens": [token]}).fetchall()


# Every write a worker makes for one attempt, each taking the claim token it believes in.
WRITES: dict[str, Callable[[psycopg.Connection, int, int], list]] = {
    "complete": _complete, "retry": _retry, "fail": _fail, "cancel": _cancel, "extend": _extend,
    "release": _release,
}


def _snapshot(conn: psycopg.Connection, job_id: int) -> tuple[dict[str, Any], Any]:
    return job(conn, job_id), _result(conn, job_id)


@pytest.mark.parametrize("write", WRITES)
def test_write_with_a_stale_attempt_changes_nothing(app, conn, write):
    handle = apps.add.delay(1, 2)
    _running(conn, handle.id, attempts=2, worker="current", lease="1 second")
    before = _snapshot(conn, handle.id)

    assert WRITES[write](conn, handle.id, 1) == []
    assert _snapshot(conn, handle.id) == before

    # The same write with the current claim's token does apply (so the above was the fence, not a broken query).
    assert len(WRITES[write](conn, handle.id, 2)) == 1
    assert _snapshot(conn, handle.id) != before


@pytest.mark.parametrize("write", WRITES)
def test_write_of_a_claim_a_crash_undid_changes_nothing_under_the_same_attempt(app, conn, write):
    """A database crash undid a claim (committed without waiting for the disk): the job was claimed
    again under the same attempt number, with a new token. The lost claim's writes are refused."""
    handle = apps.add.delay(1, 2)
    _running(conn, handle.id, attempts=1, worker="lost", lease="30 seconds", token=111)
    conn.execute("UPDATE pgq.jobs SET status = 'queued', attempts = 0, lease_expires_at = NULL, worker_id = NULL "
                 "WHERE id = %s", (handle.id,))  # as recovery leaves it: the claim never happened
    [again] = conn.execute(sql.CLAIM, {"queues": ["default"], "limit": 1, "worker_id": "second"}).fetchall()
    assert (again[0], again[6]) == (handle.id, 1) and again[11] != 111  # same attempt, another token
    before = _snapshot(conn, handle.id)

    assert WRITES[write](conn, handle.id, 111) == []
    assert _snapshot(conn, handle.id) == before
    assert len(WRITES[write](conn, handle.id, again[11])) == 1


@pytest.mark.parametrize("write", WRITES)
def test_late_write_after_rescue_changes_nothing(app, conn, write):
    """The worker lost its lease (frozen, partitioned) and was rescued; it then comes back with the
    attempt number it still believes in. The job is no longer running, so the write is refused."""
    handle = apps.add.delay(1, 2)
    _running(conn, handle.id, attempts=1, worker="frozen")
    maintenance.rescue_expired(conn)
    before = _snapshot(conn, handle.id)
    assert before[0]["status"] == "retrying" and before[0]["attempts"] == 1

    assert WRITES[write](conn, handle.id, 1) == []
    assert _snapshot(conn, handle.id) == before


def test_complete_many_records_only_the_jobs_still_held(app, conn):
    held, lost = apps.add.delay(1, 1).id, apps.add.delay(2, 2).id
    _running(conn, held, attempts=1, lease="30 seconds")
    _running(conn, lost, attempts=2, lease="30 seconds")  # re-claimed elsewhere: attempt 1 is stale

    rows = conn.execute(sql.COMPLETE_MANY, {"ids": [held, lost], "tokens": [1, 1],
                                            "results": ["2", "4"]}).fetchall()

    assert rows == [(held,)]
    assert (job(conn, held)["status"], _result(conn, held)) == ("succeeded", ("succeeded", 2, None, None))
    assert (job(conn, lost)["status"], _result(conn, lost)) == ("running", None)


# --- release -------------------------------------------------------------------------------------


def test_release_gives_the_attempt_back(app, conn):
    handle = apps.add.delay(1, 2)
    [claimed] = conn.execute(sql.CLAIM, {"queues": ["default"], "limit": 5, "worker_id": "w1"}).fetchall()
    assert (claimed[0], claimed[6]) == (handle.id, 1)  # id, attempt

    assert _release(conn, handle.id, claimed[11]) == [(handle.id,)]  # by the claim's token

    row = job(conn, handle.id)
    assert (row["status"], row["attempts"], row["worker_id"], row["lease_expires_at"]) == ("queued", 0, None, None)
    assert row["errors"] == [] and row["last_error"] is None
    # The next claim is attempt 1 again: the release cost the job nothing.
    [again] = conn.execute(sql.CLAIM, {"queues": ["default"], "limit": 5, "worker_id": "w2"}).fetchall()
    assert (again[0], again[6]) == (handle.id, 1)


def test_release_of_a_retry_puts_it_back_to_retrying(app, conn):
    handle = apps.add.delay(1, 2)
    conn.execute("UPDATE pgq.jobs SET last_error = 'ValueError: earlier' WHERE id = %s", (handle.id,))
    _running(conn, handle.id, attempts=2, worker="w1", lease="30 seconds")

    assert _release(conn, handle.id, 2) == [(handle.id,)]

    row = job(conn, handle.id)
    assert (row["status"], row["attempts"], row["worker_id"]) == ("retrying", 1, None)
    assert row["last_error"] == "ValueError: earlier"


def test_worker_releases_claimed_jobs_it_did_not_start(app, conn):
    ids = [apps.add.delay(i, 1).id for i in range(3)]
    worker = app.worker(concurrency=3)
    try:
        claimed = worker._claim(3)
        assert sorted(j.id for j in claimed) == ids and worker.held_count() == 3
        assert scalar(conn, "SELECT count(*) FROM pgq.jobs WHERE status = 'running' AND worker_id = %s",
                      (worker.id,)) == 3
        worker._release(claimed)
    finally:
        worker._drop_claim_conn()
    assert worker.held_count() == 0
    assert conn.execute("SELECT DISTINCT status, attempts FROM pgq.jobs").fetchall() == [("queued", 0)]


# --- the keeper ----------------------------------------------------------------------------------


def test_heartbeat_extends_held_leases_and_drops_lost_ones(app, conn):
    kept, lost = apps.add.delay(1, 1).id, apps.add.delay(2, 2).id
    worker = app.worker(concurrency=2)
    try:
        worker._claim(2)
        conn.execute("UPDATE pgq.jobs SET lease_expires_at = now() + interval '1 second'")
        # Meanwhile another worker rescued and re-claimed `lost` (its attempt moved on, its token changed).
        conn.execute("UPDATE pgq.jobs SET attempts = 2, worker_id = 'other', claim_token = claim_token + 1 "
                     "WHERE id = %s", (lost,))
        with psycopg.connect(app.database_url, autocommit=True) as keeper_conn:
            worker.keeper.heartbeat(keeper_conn)
    finally:
        worker._drop_claim_conn()

    assert [t[0] for t in worker.held_tokens()] == [kept]
    remaining = scalar(conn, "SELECT extract(epoch FROM lease_expires_at - now()) FROM pgq.jobs WHERE id = %s",
                       (kept,))
    assert 25 < float(remaining) <= 30  # extended by lease_seconds (30) from now
    assert job(conn, lost)["worker_id"] == "other" and job(conn, lost)["attempts"] == 2
    registered = conn.execute("SELECT pid, concurrency, queues FROM pgq.workers WHERE id = %s",
                              (worker.id,)).fetchone()
    assert registered is not None and registered[1:] == (2, ["default"])


def test_shutdown_hands_back_jobs_still_running(app, conn):
    more = apps.add.delay(1, 1).id
    last = apps.add.apply_async(args=(2, 2), max_attempts=1).id
    worker = app.worker(concurrency=2)
    try:
        claimed = worker._claim(2)
    finally:
        worker._drop_claim_conn()
    worker.keeper.abandon(claimed)

    row = job(conn, more)
    assert (row["status"], row["attempts"]) == ("retrying", 1)
    assert scalar(conn, "SELECT run_at <= now() FROM pgq.jobs WHERE id = %s", (more,))  # due again at once
    assert [(e["attempt"], e["type"]) for e in row["errors"]] == [(1, "WorkerShutdown")]
    assert row["last_error"] == "WorkerShutdown: the worker shut down before the job finished"
    assert job(conn, last)["status"] == "failed"
    assert _result(conn, last) == ("failed", None, "WorkerShutdown", "the worker shut down before the job finished")
