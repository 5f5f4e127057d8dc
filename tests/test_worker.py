"""The worker's behaviour against a real PostgreSQL: retries, jobs that can never succeed, several worker
processes sharing a queue, a worker killed mid-job, graceful shutdown, NOTIFY wake-up, the solo pool,
scheduling and priorities.

Nothing here sleeps for a fixed time: every wait is ``wait_for`` (or ``get``) with a deadline, on a
condition read from the database.
"""

from __future__ import annotations

import logging
import re
import signal
import statistics
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone

import psycopg
import pytest

import pgq
from tests import apps
from tests.helpers import WorkerProcess, job, scalar, wait_for, wait_registered


@pytest.fixture
def executions(conn: psycopg.Connection) -> psycopg.Connection:
    """test_executions exists before any task runs (concurrent CREATE TABLE IF NOT EXISTS can collide)."""
    conn.execute(apps.EXECUTIONS_DDL)
    return conn


@pytest.fixture
def spawn(db_url: str) -> Iterator[Callable[..., WorkerProcess]]:
    """Start ``pgq worker`` processes; all are stopped at teardown, and their output is printed (pytest
    shows it when the test failed)."""
    started: list[WorkerProcess] = []

    def start(*args: str) -> WorkerProcess:
        worker = WorkerProcess(db_url, *args)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        output = worker.stop()
        print(f"--- output of worker {worker.pid} (exit {worker.proc.returncode}) ---\n{output}")


def _seconds(conn: psycopg.Connection, expression: str, job_id: int) -> float:
    """An interval expression over the job's row, in seconds, on the database clock."""
    return float(scalar(conn, f"SELECT extract(epoch FROM {expression}) FROM pgq.jobs j WHERE id = %s",
                        (job_id,)))


# --- logging -------------------------------------------------------------------------------------


def test_one_info_line_per_success_written_by_the_recorder(app, caplog):
    """At -l info a success costs one line, from the recorder's thread: from the runners, each line cost
    a worker on no-op jobs as much CPU as the job itself (see Recorder.loop). Failures keep theirs, and a
    job's start shows only at DEBUG."""
    caplog.set_level(logging.INFO, logger="pgq")
    handles = [apps.add.delay(i, 1) for i in range(3)]
    failing = apps.fail.apply_async(args=["told to"], max_attempts=1)
    with app.worker(concurrency=2).running():
        assert [h.get(timeout=10) for h in handles] == [1, 2, 3]
        with pytest.raises(pgq.TaskFailed):
            failing.get(timeout=10)
        wait_for(lambda: sum("succeeded in" in r.getMessage() for r in caplog.records) == 3,
                 what="the success lines")
    lines = {h.id: r for r in caplog.records for h in handles if r.getMessage().startswith(f"job {h.id} ")}
    assert sorted(lines) == sorted(h.id for h in handles)
    for record in lines.values():
        assert (record.levelno, record.threadName) == (logging.INFO, "pgq-recorder")
        assert re.fullmatch(r"job \d+ tests\.add succeeded in \d+\.\d ms", record.getMessage())
    assert not [r for r in caplog.records if r.getMessage().endswith(" started") and r.name == "pgq.worker"]
    [failed] = [r for r in caplog.records if r.getMessage().startswith(f"job {failing.id} ")]
    assert failed.levelno == logging.ERROR and "failed for good" in failed.getMessage()


# --- retries -------------------------------------------------------------------------------------


def test_flaky_task_retries_with_backoff_then_succeeds(app, conn):
    handle = apps.flaky.delay(2)
    with app.worker(concurrency=2).running():
        assert handle.get(timeout=10) == 3  # failed on attempts 1 and 2, succeeded on 3

    row = job(conn, handle.id)
    assert (row["status"], row["attempts"]) == ("succeeded", 3)
    errors = row["errors"]
    assert [(e["attempt"], e["type"], e["message"]) for e in errors] == [
        (1, "RuntimeError", "flaky failure on attempt 1"),
        (2, "RuntimeError", "flaky failure on attempt 2"),
    ]
    assert all("RuntimeError: flaky failure" in e["traceback"] for e in errors)
    assert row["last_error"] == "RuntimeError: flaky failure on attempt 2"
    # The backoff after attempt 1 is 0.1 s with jitter, never less than half of it: attempt 2 cannot
    # have failed sooner than 0.05 s after attempt 1 did (both times are the database's now()).
    gap = scalar(conn, "SELECT extract(epoch FROM (errors->1->>'at')::timestamptz - (errors->0->>'at')::timestamptz) "
                       "FROM pgq.jobs WHERE id = %s", (handle.id,))
    assert float(gap) >= 0.05
    assert scalar(conn, "SELECT result FROM pgq.results WHERE job_id = %s", (handle.id,)) == 3


def test_self_retry_with_countdown(app, conn):
    handle = apps.retry_me.delay()
    with app.worker(concurrency=1).running():
        assert handle.get(timeout=10) == "third time"

    row = job(conn, handle.id)
    assert (row["status"], row["attempts"]) == ("succeeded", 3)
    assert [(e["attempt"], e["type"], e["message"]) for e in row["errors"]] == [
        (1, "KeyError", "'not yet'"), (2, "KeyError", "'not yet'"),
    ]
    # countdown=0.05 was honoured: the third attempt was claimed no sooner than 0.05 s after the second
    # attempt's retry was recorded.
    assert _seconds(conn, "j.started_at - (j.errors->1->>'at')::timestamptz", handle.id) >= 0.05


def test_retry_refused_on_last_attempt_fails_with_the_exception(app, conn):
    handle = apps.retry_me.apply_async(max_attempts=2)
    with app.worker(concurrency=1).running(), pytest.raises(pgq.TaskFailed) as info:
        handle.get(timeout=10)
    assert info.value.type_name == "KeyError"
    assert info.value.message == "'not yet' (no attempts left: 2 used)"
    assert "KeyError: 'not yet'" in info.value.traceback
    assert job(conn, handle.id)["attempts"] == 2


def test_exhausted_retries_fail_with_type_message_and_traceback(app, conn):
    handle = apps.fail.delay("kaput")
    with app.worker(concurrency=2).running(), pytest.raises(pgq.TaskFailed) as info:
        handle.get(timeout=10)

    failure = info.value
    assert (failure.type_name, failure.message, failure.job_id) == ("ValueError", "kaput", handle.id)
    assert "Traceback (most recent call last)" in failure.traceback
    assert 'raise ValueError(message)' in failure.traceback
    assert failure.traceback.rstrip().endswith("ValueError: kaput")
    assert handle.status == "failed"
    assert isinstance(handle.get(timeout=1, propagate=False), pgq.TaskFailed)

    row = job(conn, handle.id)
    assert (row["status"], row["attempts"], row["last_error"]) == ("failed", 2, "ValueError: kaput")
    assert row["finished_at"] is not None and row["lease_expires_at"] is None
    assert [(e["attempt"], e["type"], e["message"]) for e in row["errors"]] == [
        (1, "ValueError", "kaput"), (2, "ValueError", "kaput"),
    ]
    stored = conn.execute("SELECT status, error_type, error_message, result FROM pgq.results WHERE job_id = %s",
                          (handle.id,)).fetchone()
    assert stored == ("failed", "ValueError", "kaput", None)


# --- jobs that can never succeed -----------------------------------------------------------------


def _enqueue_unknown(app, conn):
    return app.send_task("no.such.task", args=[1]), "unknown task 'no.such.task'"


def _enqueue_bad_args(app, conn):
    return apps.add.delay(1), "arguments do not match tests.add(x, y)"


def _enqueue_bad_kwargs(app, conn):
    return apps.add.apply_async(args=(1, 2), kwargs={"z": 3}), "arguments do not match tests.add(x, y)"


def _enqueue_malformed_args(app, conn):
    job_id = scalar(conn, "INSERT INTO pgq.jobs (task_name, args) VALUES ('tests.add', '{}'::jsonb) RETURNING id")
    return app.result(job_id), "malformed job: args must be a JSON array"


def _enqueue_malformed_kwargs(app, conn):
    job_id = scalar(conn, "INSERT INTO pgq.jobs (task_name, args, kwargs) "
                          "VALUES ('tests.add', '[1, 2]', '[3]'::jsonb) RETURNING id")
    return app.result(job_id), "kwargs a JSON object"


def _enqueue_unserializable(app, conn):
    return apps.unserializable_result.delay(), "the result of tests.unserializable_result is not JSON-serializable"


def _enqueue_nul_result(app, conn):
    return apps.unstorable_result.delay("nul"), "the result of tests.unstorable_result is not JSON-serializable"


def _enqueue_surrogate_result(app, conn):
    return apps.unstorable_result.delay("surrogate"), "the result of tests.unstorable_result is not JSON-serializable"


@pytest.mark.parametrize("enqueue", [
    _enqueue_unknown, _enqueue_bad_args, _enqueue_bad_kwargs, _enqueue_malformed_args, _enqueue_malformed_kwargs,
    _enqueue_unserializable, _enqueue_nul_result, _enqueue_surrogate_result,
], ids=lambda f: f.__name__.removeprefix("_enqueue_"))
def test_job_that_can_never_succeed_fails_at_once_and_worker_carries_on(app, conn, enqueue):
    handle, expected = enqueue(app, conn)
    assert job(conn, handle.id)["max_attempts"] > 1  # it could have been retried, and must not be
    with app.worker(concurrency=1, poll_interval=0.2).running() as worker:
        with pytest.raises(pgq.TaskFailed) as info:
            handle.get(timeout=10)
        # The same worker is still alive and runs the next job.
        assert apps.add.delay(20, 22).get(timeout=10) == 42
        # get() returns at the outcome's commit; the recorder forgets the job a moment later.
        wait_for(lambda: worker.held_count() == 0, timeout=5, what="the worker to forget its jobs")

    assert info.value.type_name == "NotRetryable"
    assert expected in info.value.message
    row = job(conn, handle.id)
    assert (row["status"], row["attempts"]) == ("failed", 1)
    assert [(e["attempt"], e["type"]) for e in row["errors"]] == [(1, "NotRetryable")]
    assert expected in row["last_error"]


@pytest.mark.parametrize("kind", ["nul", "surrogate"])
def test_error_message_postgres_cannot_store_is_recorded_escaped(app, conn, kind):
    handle = apps.unstorable_error.delay(kind)
    with app.worker(concurrency=1, poll_interval=0.2).running():
        with pytest.raises(pgq.TaskFailed) as info:
            handle.get(timeout=10)
        assert apps.add.delay(1, 1).get(timeout=10) == 2
    assert info.value.type_name == "ValueError"
    assert info.value.message.startswith("bad a\\") and info.value.message.endswith("b message")
    row = job(conn, handle.id)
    assert (row["status"], row["attempts"]) == ("failed", 2)
    assert [e["type"] for e in row["errors"]] == ["ValueError", "ValueError"]


# --- several worker processes --------------------------------------------------------------------


def test_worker_processes_run_every_job_exactly_once(app, executions, db_url, spawn):
    conn = executions
    jobs = 300
    workers = [spawn("-c", "4") for _ in range(3)]
    for worker in workers:
        wait_registered(conn, worker)

    # One transaction: every worker is woken by the same NOTIFY and they race for the same rows.
    with psycopg.connect(db_url) as enqueuer:
        ids = [apps.record.apply_async(args=(0.005,), connection=enqueuer).id for _ in range(jobs)]
    started = time.monotonic()
    wait_for(lambda: scalar(conn, "SELECT count(*) FROM pgq.jobs WHERE status = 'succeeded'") == jobs,
             timeout=60, what=f"{jobs} jobs to succeed")
    elapsed = time.monotonic() - started

    not_once = conn.execute(
        "SELECT j.id, j.status, j.attempts, count(e.*) FROM pgq.jobs j LEFT JOIN test_executions e ON e.job_id = j.id "
        "GROUP BY j.id HAVING count(e.*) <> 1 OR j.attempts <> 1 OR j.status <> 'succeeded' ORDER BY j.id"
    ).fetchall()
    overlapping = conn.execute(
        "SELECT a.job_id, a.attempt, a.worker_pid, a.started_at, a.ended_at, b.attempt, b.worker_pid, b.started_at, "
        "b.ended_at FROM test_executions a JOIN test_executions b ON a.job_id = b.job_id AND a.ctid < b.ctid "
        "WHERE tstzrange(a.started_at, coalesce(a.ended_at, 'infinity')) "
        "   && tstzrange(b.started_at, coalesce(b.ended_at, 'infinity'))"
    ).fetchall()
    per_pid = dict(conn.execute("SELECT worker_pid, count(*) FROM test_executions GROUP BY 1").fetchall())
    print(f"{jobs} jobs in {elapsed:.2f} s; executions per worker pid: {per_pid}")
    assert not_once == [], f"jobs not run exactly once (id, status, attempts, executions): {not_once}"
    assert overlapping == [], f"overlapping executions of the same job: {overlapping}"

    assert scalar(conn, "SELECT count(*) FROM test_executions") == jobs
    assert scalar(conn, "SELECT count(*) FROM test_executions WHERE ended_at IS NULL OR attempt <> 1") == 0
    results = dict(conn.execute("SELECT job_id, result FROM pgq.results WHERE status = 'succeeded'").fetchall())
    assert results == {job_id: job_id for job_id in ids}  # each result is the job's own id
    assert scalar(conn, "SELECT count(*) FROM pgq.results") == jobs
    assert set(per_pid) <= {w.pid for w in workers}
    assert len(per_pid) >= 2, f"one worker ran everything, the test proved nothing about sharing: {per_pid}"
    assert sum(per_pid.values()) == jobs


# --- a worker killed mid-job ---------------------------------------------------------------------


def test_killed_worker_job_runs_again_after_its_lease_expires(app, executions, spawn):
    conn = executions
    first, second = spawn("-c", "1"), spawn("-c", "1")
    for worker in (first, second):
        wait_registered(conn, worker)
    handle = apps.sleep.delay(1.0)  # lease_seconds=2, max_attempts=3
    pid = wait_for(lambda: scalar(conn, "SELECT worker_pid FROM test_executions WHERE job_id = %s AND attempt = 1",
                                  (handle.id,)), what="attempt 1 to start")
    victim, survivor = (first, second) if pid == first.pid else (second, first)
    assert pid == victim.pid
    victim.kill()

    assert handle.get(timeout=20) == 1.0
    row = job(conn, handle.id)
    assert (row["status"], row["attempts"]) == ("succeeded", 2)
    runs = conn.execute("SELECT attempt, worker_pid FROM test_executions WHERE job_id = %s ORDER BY started_at",
                        (handle.id,)).fetchall()
    assert runs == [(1, victim.pid), (2, survivor.pid)]
    [error] = row["errors"]
    assert (error["attempt"], error["type"]) == (1, "LeaseExpired")
    assert "lease expired" in error["message"]
    assert f":{victim.pid}:" in error["worker"]
    assert row["last_error"].startswith("lease expired on attempt 1 of 3")
    # Not rescued before the lease (2 s from the claim, just before attempt 1 started) ran out, and then
    # due again at once (not after the task's backoff, 2 s), on the database clock.
    rescued_at = scalar(conn, "SELECT (errors->0->>'at')::timestamptz FROM pgq.jobs WHERE id = %s", (handle.id,))
    first_start = scalar(conn, "SELECT started_at FROM test_executions WHERE job_id = %s AND attempt = 1",
                         (handle.id,))
    assert rescued_at - first_start >= timedelta(seconds=1.5)
    assert row["run_at"] == rescued_at
    assert row["started_at"] >= row["run_at"]
    assert scalar(conn, "SELECT count(*) FROM pgq.jobs WHERE status = 'running'") == 0


# --- graceful shutdown ---------------------------------------------------------------------------


def test_sigterm_lets_the_running_job_finish_and_exits_zero(app, executions, spawn):
    conn = executions
    worker = spawn("-c", "2", "--shutdown-grace", "10")
    wait_registered(conn, worker)
    handle = apps.sleep.delay(1.0)
    wait_for(lambda: scalar(conn, "SELECT count(*) FROM test_executions WHERE job_id = %s", (handle.id,)),
             what="the job to start")

    worker.signal(signal.SIGTERM)
    wait_for(lambda: "SIGTERM received" in worker.output(), what="the worker to acknowledge SIGTERM")
    # The worker claims nothing after the signal: a job enqueued now stays queued.
    late = apps.add.delay(1, 2)
    assert worker.wait(timeout=15) == 0

    row = job(conn, handle.id)
    assert (row["status"], row["attempts"]) == ("succeeded", 1)
    assert handle.get(timeout=1) == 1.0
    assert job(conn, late.id)["status"] == "queued" and job(conn, late.id)["attempts"] == 0
    assert scalar(conn, "SELECT count(*) FROM pgq.jobs WHERE status = 'running'") == 0
    assert scalar(conn, "SELECT count(*) FROM pgq.workers WHERE pid = %s", (worker.pid,)) == 0
    assert "handed back" not in worker.output()


@pytest.mark.parametrize("how", ["grace_runs_out", "second_signal"])
def test_job_still_running_at_shutdown_is_handed_back(app, executions, spawn, how):
    conn = executions
    grace = "0.5" if how == "grace_runs_out" else "30"
    worker = spawn("-c", "1", "--shutdown-grace", grace)
    wait_registered(conn, worker)
    handle = apps.sleep.delay(30)
    wait_for(lambda: scalar(conn, "SELECT count(*) FROM test_executions WHERE job_id = %s", (handle.id,)),
             what="the job to start")
    started = time.monotonic()
    worker.signal(signal.SIGTERM)
    if how == "second_signal":
        wait_for(lambda: "SIGTERM received" in worker.output(), what="the worker to acknowledge SIGTERM")
        worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=10) == 0
    took = time.monotonic() - started
    assert took < 5.0, f"took {took:.2f} s to stop"

    # The attempt counts, and the job is due again at once instead of waiting for its lease to expire.
    row = job(conn, handle.id)
    assert (row["status"], row["attempts"], row["lease_expires_at"]) == ("retrying", 1, None)
    assert scalar(conn, "SELECT run_at <= now() FROM pgq.jobs WHERE id = %s", (handle.id,))
    assert [(e["attempt"], e["type"]) for e in row["errors"]] == [(1, "WorkerShutdown")]
    assert scalar(conn, "SELECT count(*) FROM pgq.workers WHERE pid = %s", (worker.pid,)) == 0


def test_sigterm_on_idle_worker_exits_zero_promptly(app, conn, spawn):
    worker = spawn("-c", "2")
    wait_registered(conn, worker)
    started = time.monotonic()
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=10) == 0
    took = time.monotonic() - started
    assert took < 3.0, f"an idle worker took {took:.2f} s to stop"
    assert scalar(conn, "SELECT count(*) FROM pgq.workers WHERE pid = %s", (worker.pid,)) == 0


# --- waking up -----------------------------------------------------------------------------------

_IDLE = """
SELECT EXISTS (
    SELECT 1 FROM pg_stat_activity l, pg_stat_activity c
    WHERE l.datname = current_database() AND c.datname = current_database()
      AND l.application_name = 'pgq-listener' AND l.state = 'idle' AND l.query LIKE 'LISTEN%%'
      AND c.application_name = 'pgq-worker' AND c.state = 'idle' AND c.query LIKE '%%WITH picked%%'
      AND c.state_change > l.state_change AND c.state_change > %(since)s
)
"""


def _wait_idle(conn: psycopg.Connection, worker: pgq.Worker, since) -> None:
    """Wait until *worker* listens and its claim loop has made its last claim (finding nothing) after
    *since*: from then on it sleeps for the whole poll interval unless a NOTIFY wakes it."""
    wait_for(lambda: worker.held_count() == 0 and scalar(conn, _IDLE, {"since": since}),
             what="the worker to be idle and listening")


def test_notify_wakes_an_idle_worker_long_before_its_poll(app, conn):
    worker = app.worker(concurrency=1, poll_interval=5)
    latencies, db_latencies = [], []
    with worker.running():
        since = datetime(2000, 1, 1, tzinfo=timezone.utc)
        for i in range(5):
            _wait_idle(conn, worker, since)
            started = time.monotonic()
            handle = apps.add.delay(i, 1)
            assert handle.get(timeout=4) == i + 1
            latencies.append(time.monotonic() - started)
            db_latencies.append(_seconds(conn, "j.started_at - j.created_at", handle.id))
            since = job(conn, handle.id)["finished_at"]
    print(f"NOTIFY wake-up, enqueue to result: median {statistics.median(latencies) * 1000:.1f} ms, "
          f"max {max(latencies) * 1000:.1f} ms; enqueue to claim (database clock): median "
          f"{statistics.median(db_latencies) * 1000:.1f} ms, max {max(db_latencies) * 1000:.1f} ms")
    assert max(latencies) < 1.0, latencies
    assert max(db_latencies) < 1.0, db_latencies


def test_without_listen_jobs_still_run_by_polling(app, conn):
    worker = app.worker(concurrency=1, poll_interval=0.2, listen=False)
    with worker.running():
        handle = apps.add.delay(2, 2)
        assert handle.get(timeout=10) == 4
        assert scalar(conn, "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                            "AND application_name = 'pgq-listener'") == 0
    assert job(conn, handle.id)["status"] == "succeeded"


# --- the solo pool and the request ---------------------------------------------------------------


def test_solo_pool_runs_jobs_in_the_worker_thread_with_request_fields(app, conn):
    worker = app.worker(pool="solo", concurrency=8, poll_interval=0.2)
    assert worker.concurrency == 1
    with worker.running():
        first = apps.whoami.apply_async(args=(True,), queue="default")
        second = apps.whoami.delay()
        one, two = first.get(timeout=10), second.get(timeout=10)
    assert one == {
        "id": first.id, "task_name": "tests.whoami", "attempt": 2, "max_attempts": 3, "retries": 1,
        "queue": "default", "args": [True], "kwargs": {}, "worker_id": worker.id, "thread": "pgq-worker",
    }
    assert (two["id"], two["attempt"], two["retries"], two["thread"]) == (second.id, 1, 0, "pgq-worker")
    assert job(conn, first.id)["worker_id"] == worker.id


def test_threads_pool_runs_jobs_in_runner_threads(app):
    with app.worker(concurrency=1).running():
        answer = apps.whoami.apply_async(kwargs={"retry_first": False}).get(timeout=10)
    assert answer["thread"] == "pgq-runner-0"
    assert answer["kwargs"] == {"retry_first": False}


# --- scheduling ----------------------------------------------------------------------------------


def test_countdown_job_does_not_run_before_it_is_due(app, conn):
    later = apps.add.apply_async(args=(1, 1), countdown=1.0)
    now = apps.add.delay(2, 2)
    with app.worker(concurrency=2, poll_interval=0.1).running():
        assert now.get(timeout=10) == 4
        status, due = conn.execute("SELECT status, run_at <= now() FROM pgq.jobs WHERE id = %s",
                                   (later.id,)).fetchone()
        if not due:
            assert status == "queued"
        assert later.get(timeout=10) == 2
    row = job(conn, later.id)
    assert row["run_at"] - row["created_at"] >= timedelta(seconds=1)
    assert row["started_at"] >= row["run_at"]
    lateness = (row["started_at"] - row["run_at"]).total_seconds()
    assert lateness < 1.0, f"started {lateness:.2f} s after it was due, with a 0.1 s poll"


def test_solo_worker_process_runs_higher_priority_first(app, executions, db_url, spawn):
    conn = executions
    with psycopg.connect(db_url) as enqueuer:
        plan = [0, 0, 5, -3, 10, 5, 0, 10]
        ids = {apps.record.apply_async(priority=p, connection=enqueuer).id: p for p in plan}
    worker = spawn("--pool", "solo")
    wait_for(lambda: scalar(conn, "SELECT count(*) FROM pgq.jobs WHERE status = 'succeeded'") == len(plan),
             what="every job to succeed")
    order = [row[0] for row in conn.execute("SELECT id FROM pgq.jobs ORDER BY started_at").fetchall()]
    expected = sorted(ids, key=lambda job_id: (-ids[job_id], job_id))
    assert order == expected, f"ran in order {[(i, ids[i]) for i in order]}"
    runs = conn.execute("SELECT job_id FROM test_executions ORDER BY started_at").fetchall()
    assert [r[0] for r in runs] == expected
    assert scalar(conn, "SELECT count(DISTINCT worker_pid) FROM test_executions") == 1
    assert scalar(conn, "SELECT min(worker_pid) FROM test_executions") == worker.pid


def test_free_slots_beyond_one_claim_statement_are_claimed_at_once(app, executions):
    """One claim statement takes at most MAX_CLAIM jobs; a worker with more free slots claims again at
    once, not at its next poll or NOTIFY (neither comes here, and no task returns meanwhile). It claims
    while a third of its capacity is free: 32 slots, 3 per statement, 8 statements, 24 jobs."""
    app.enqueue_many(apps.sleep.s(5).set(lease_seconds=60) for _ in range(40))  # no heartbeat race either
    worker = app.worker(concurrency=2, prefetch=30, poll_interval=60, listen=False)  # capacity 32
    worker.MAX_CLAIM = 3
    with worker.running():
        wait_for(lambda: worker.held_count() >= 3, what="the worker's first claim")
        # No task returns for 5 s after the first claim: more jobs within 4 s come from more claims at once.
        try:
            wait_for(lambda: worker.held_count() >= 24, timeout=4, what="the worker to claim 24 jobs, 3 at a time")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; it holds {worker.held_count()}") from None
        assert scalar(executions, "SELECT count(*) FROM pgq.jobs WHERE status = 'running'") == 24
        assert scalar(executions, "SELECT count(*) FROM pgq.jobs WHERE status = 'succeeded'") == 0
        worker.stop(hurry=True)


def test_a_recorder_that_falls_behind_holds_back_the_claims(app, conn):
    """Finished jobs stay claimed until their outcome is written: a stalled recorder must stop the
    claiming at twice the capacity, not let the worker claim (and heartbeat) the whole queue."""
    app.enqueue_many(apps.noop.s() for _ in range(2000))
    worker = app.worker(concurrency=2, prefetch=4)  # capacity 6: at most 12 held
    worker.outcome_lock.acquire()  # the recorder writes under this lock: it stalls
    with worker.running():
        try:
            wait_for(lambda: worker.held_count() >= 12, what="the worker to fill its room")
            time.sleep(0.3)  # a bound is checked over time: claims would go on within this if unbounded
            assert worker.held_count() == 12
            assert scalar(conn, "SELECT count(*) FROM pgq.jobs WHERE status = 'running'") == 12
        finally:
            worker.outcome_lock.release()  # before the worker stops: its shutdown waits for the recorder
        wait_for(lambda: scalar(conn, "SELECT count(*) FROM pgq.jobs WHERE status = 'succeeded'") == 2000,
                 what="every job to be recorded")
