"""Unique jobs: one waiting-or-running job per key (and, with unique_for, per recently finished key),
under concurrent producers (threads and processes), in callers' transactions that commit or roll back."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
from collections import Counter
from datetime import timedelta

import psycopg
import pytest

import pgq
from pgq import enqueue, sql
from tests.control_apps import add, plain, welcome
from tests.helpers import ROOT, job, scalar, wait_for


def _jobs(conn, key: str) -> list[tuple]:
    return conn.execute("SELECT id, status FROM pgq.jobs WHERE unique_key = %s ORDER BY id", (key,)).fetchall()


# --- keys --------------------------------------------------------------------------------------------


def test_same_key_returns_the_waiting_or_running_job_then_frees_the_key(capp, conn):
    first = plain.apply_async(args=(1,), unique_key="user:42:welcome")
    again = plain.apply_async(args=(2,), unique_key="user:42:welcome", priority=5)
    other = plain.apply_async(args=(3,), unique_key="user:43:welcome")
    assert (first.deduplicated, again.deduplicated, other.deduplicated) == (False, True, False)
    assert again.id == first.id and other.id != first.id
    assert _jobs(conn, "user:42:welcome") == [(first.id, "queued")]
    assert job(conn, first.id)["args"] == [1]  # the existing job is returned untouched

    conn.execute("UPDATE pgq.jobs SET status = 'running', attempts = 1, worker_id = 'w', "
                 "lease_expires_at = now() + interval '1 minute' WHERE id = %s", (first.id,))
    assert plain.apply_async(unique_key="user:42:welcome").id == first.id  # running holds the key too

    conn.execute("UPDATE pgq.jobs SET status = 'retrying', lease_expires_at = NULL WHERE id = %s", (first.id,))
    assert plain.apply_async(unique_key="user:42:welcome").id == first.id  # …and so does retrying

    with capp.worker(concurrency=1, poll_interval=0.1).running():
        assert first.get(timeout=10) == 1
    # Finished, without unique_for: the key is free again.
    after = plain.apply_async(args=(4,), unique_key="user:42:welcome")
    assert not after.deduplicated and after.id != first.id
    assert _jobs(conn, "user:42:welcome") == [(first.id, "succeeded"), (after.id, "queued")]
    # send_task takes the same options.
    assert capp.send_task("control.plain", unique_key="user:42:welcome").id == after.id
    assert capp.send_task("not.registered", unique_key="k:unregistered").id == \
        capp.send_task("not.registered", args=[1], unique_key="k:unregistered").id


def test_unique_true_keys_by_task_name_and_arguments(capp, conn):
    a = add.delay(1, y=2)
    assert add.apply_async(args=(1,), kwargs={"y": 2}).id == a.id
    assert add.delay(1, 3).id != a.id  # other arguments
    assert add.delay(1, 2).id != a.id  # y positional is another call than y=2
    canonical = json.dumps([[1], {"y": 2}], sort_keys=True, separators=(",", ":"))
    assert job(conn, a.id)["unique_key"] == f"control.add:{hashlib.sha256(canonical.encode()).hexdigest()}"
    assert add.unique_key_for((1,), {"y": 2}) == job(conn, a.id)["unique_key"]
    # An explicit key wins over the task's.
    assert add.apply_async(args=(1,), kwargs={"y": 2}, unique_key="mine").id != a.id
    assert scalar(conn, "SELECT count(*) FROM pgq.jobs") == 4


def test_unique_key_function_and_unique_for(capp, conn):
    first = welcome.delay(7, note="a")
    assert welcome.delay(7, note="b").id == first.id  # the key is the function's: user 7
    assert job(conn, first.id)["unique_key"] == "welcome:7"

    with capp.worker(concurrency=1, poll_interval=0.1).running():
        assert first.get(timeout=10) == "welcome 7"
    # Finished within unique_for (1 hour): still the same job, and its result.
    late = welcome.delay(7)
    assert late.id == first.id and late.deduplicated and late.get(timeout=1) == "welcome 7"
    # A per-call unique_for overrides the task's: finished 0 s ago is outside a 0 s window.
    fresh = welcome.apply_async(args=(7,), unique_for=0)
    assert not fresh.deduplicated
    # Cancelling releases the key at once, even within unique_for.
    assert fresh.cancel() == "cancelled"
    conn.execute("UPDATE pgq.jobs SET finished_at = now() - interval '2 hours' WHERE id = %s", (first.id,))
    again = welcome.delay(7)
    assert not again.deduplicated and again.id not in (first.id, fresh.id)
    # A failed job keeps its key for unique_for as well.
    conn.execute("UPDATE pgq.jobs SET status = 'failed', finished_at = now() WHERE id = %s", (again.id,))
    assert welcome.delay(7).id == again.id
    conn.execute("UPDATE pgq.jobs SET finished_at = now() - interval '61 minutes' WHERE id = %s", (again.id,))
    newest = welcome.delay(7)
    assert newest.id not in (first.id, fresh.id, again.id)
    assert [s for _, s in _jobs(conn, "welcome:7")] == ["succeeded", "cancelled", "failed", "queued"]


@pytest.mark.parametrize(("options", "message"), [
    ({"unique_key": ""}, "unique_key must be a non-empty string"),
    ({"unique_key": 42}, "unique_key must be a non-empty string"),
    ({"unique_key": "a\x00b"}, "NUL"),
    ({"unique_key": "é" * 501}, "1002 bytes as UTF-8, over the limit of 1000"),
    ({"unique_for": 60}, "unique_for needs a unique key"),
    ({"unique_key": "k", "unique_for": -1}, "unique_for must be a timedelta or a number of seconds >= 0"),
    ({"unique_key": "k", "unique_for": "1h"}, "unique_for must be a timedelta"),
])
def test_bad_unique_options_are_refused_before_anything_is_written(capp, conn, options, message):
    with pytest.raises(pgq.EnqueueError, match=message) as info:
        plain.apply_async(**options)
    assert str(info.value).startswith("cannot enqueue control.plain: ")
    assert scalar(conn, "SELECT count(*) FROM pgq.jobs") == 0


def test_unique_key_function_errors_name_the_task(capp, conn):
    with pytest.raises(pgq.EnqueueError, match=r"cannot enqueue control.welcome: its unique_key function raised "
                                                r"TypeError"):
        welcome.delay()  # the lambda needs user_id
    keyed = capp.task(name="control.bad_key", unique_key=lambda: 42)(lambda: None)
    with pytest.raises(pgq.EnqueueError, match=r"cannot enqueue control\.bad_key: unique_key must be a non-empty"):
        keyed.delay()
    assert scalar(conn, "SELECT count(*) FROM pgq.jobs") == 0


@pytest.mark.parametrize(("options", "message"), [
    ({"unique": True, "unique_key": "k"}, "not both"),
    ({"unique_for": 5}, "unique_for needs unique=True or unique_key="),
    ({"unique": True, "unique_for": timedelta(seconds=-1)}, "unique_for must be"),
    ({"unique_key": 3}, "unique_key must be a string or a function"),
    ({"unique_key": ""}, "unique_key must be a non-empty string"),
])
def test_bad_unique_task_options_are_refused_at_definition(options, message):
    app = pgq.App("postgresql://unused")
    with pytest.raises(ValueError, match=message):
        app.task(name="control.bad", **options)(lambda: None)


# --- transactions ----------------------------------------------------------------------------------


def test_one_transaction_enqueueing_a_key_twice_gets_one_job(capp, conn, db_url):
    with psycopg.connect(db_url) as own:
        a = plain.apply_async(unique_key="tx", connection=own)
        b = plain.apply_async(unique_key="tx", connection=own, unique_for=60)
        assert (a.deduplicated, b.deduplicated, b.id) == (False, True, a.id)
    assert _jobs(conn, "tx") == [(a.id, "queued")]
    # An autocommit connection gets a transaction of its own around the lock and the insert.
    c = plain.apply_async(unique_key="ac", unique_for=60, connection=conn)
    assert plain.apply_async(unique_key="ac", unique_for=60, connection=conn).id == c.id
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


def test_rolled_back_enqueue_frees_the_key(capp, conn, db_url):
    with psycopg.connect(db_url) as own:
        ghost = welcome.apply_async(args=(1,), connection=own)
        own.rollback()
    real = welcome.delay(1)
    assert not real.deduplicated and real.id != ghost.id
    assert _jobs(conn, "welcome:1") == [(real.id, "queued")]
    with pytest.raises(pgq.JobNotFound):
        ghost.get(timeout=1)


@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_unique_enqueue_in_a_sqlalchemy_session(capp, conn, postgresql, driver):
    from sqlalchemy.orm import Session

    from tests.test_enqueue import _engine

    engine = _engine(postgresql, driver)
    try:
        with Session(engine) as session:
            ghost = welcome.apply_async(args=(5,), connection=session)
            assert welcome.apply_async(args=(5,), connection=session).id == ghost.id
            session.rollback()
            kept = welcome.apply_async(args=(5,), connection=session)
            session.commit()
    finally:
        engine.dispose()
    assert kept.id != ghost.id and not kept.deduplicated
    assert _jobs(conn, "welcome:5") == [(kept.id, "queued")]
    assert welcome.delay(5).id == kept.id


@pytest.mark.parametrize("unique_for", [None, 3600], ids=["index", "unique_for_lock"])
@pytest.mark.parametrize("outcome", ["rollback", "commit"])
def test_producer_waits_for_an_open_transaction_holding_the_key(capp, conn, db_url, unique_for, outcome):
    """A caller's open transaction has enqueued the key; another producer waits for it to end, then gets a
    job of its own if it rolled back, or the caller's job if it committed."""
    got: list[pgq.AsyncResult] = []
    with psycopg.connect(db_url) as own:
        mine = plain.apply_async(unique_key="open", unique_for=unique_for, connection=own)
        producer = threading.Thread(target=lambda: got.append(plain.apply_async(unique_key="open",
                                                                                 unique_for=unique_for)))
        producer.start()
        wait_for(lambda: scalar(conn, "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                      "AND application_name = 'pgq-client' AND wait_event_type = 'Lock'") == 1,
                 timeout=10, what="the other producer to wait for the open transaction")
        own.rollback() if outcome == "rollback" else own.commit()
        producer.join(timeout=10)
    [theirs] = got
    if outcome == "rollback":
        assert not theirs.deduplicated and theirs.id != mine.id
    else:
        assert theirs.deduplicated and theirs.id == mine.id
    assert _jobs(conn, "open") == [(theirs.id, "queued")]


# --- concurrent producers ----------------------------------------------------------------------------


@pytest.mark.parametrize("unique_for", [None, 3600], ids=["index", "unique_for_lock"])
def test_concurrent_threads_enqueueing_one_key_get_one_job(capp, conn, unique_for):
    threads, keys = 8, 40
    capp.close()
    capp._pool_size = threads  # every thread holds a connection at once
    barrier = threading.Barrier(threads)
    results: list[tuple[str, int, bool]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def produce() -> None:
        try:
            for k in range(keys):
                barrier.wait(timeout=30)  # all threads enqueue key k at the same instant
                handle = plain.apply_async(args=(k,), unique_key=f"race:{k}", unique_for=unique_for)
                with lock:
                    results.append((f"race:{k}", handle.id, handle.deduplicated))
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    workers = [threading.Thread(target=produce) for _ in range(threads)]
    try:
        for t in workers:
            t.start()
        for t in workers:
            t.join(timeout=60)
    finally:
        capp._pool_size = 4
        capp.close()
    assert errors == []
    per_key = Counter(key for key, _, _ in results)
    created = Counter(key for key, _, dedup in results if not dedup)
    ids = {key: {i for k, i, _ in results if k == key} for key in per_key}
    print(f"{threads} threads x {keys} keys = {len(results)} enqueues -> "
          f"{scalar(conn, 'SELECT count(*) FROM pgq.jobs')} jobs (expected {keys})")
    assert len(results) == threads * keys
    assert all(n == threads for n in per_key.values())
    assert all(n == 1 for n in created.values()) and len(created) == keys  # one producer inserted each key
    assert all(len(s) == 1 for s in ids.values())  # and every producer got that job's id
    assert scalar(conn, "SELECT count(*) FROM pgq.jobs") == keys
    assert scalar(conn, "SELECT count(DISTINCT unique_key) FROM pgq.jobs") == keys


PRODUCER = """
import sys
from tests import control_apps
control_apps.app.set_database_url(sys.argv[1])
keys, unique_for = int(sys.argv[2]), (None if sys.argv[3] == "-" else float(sys.argv[3]))
control_apps.app.run(lambda conn: None)  # connected: ready to race
print("ready", flush=True)
sys.stdin.readline()  # start together
created = 0
for k in range(keys):
    handle = control_apps.plain.apply_async(args=(k,), unique_key=f"proc:{k}", unique_for=unique_for)
    created += not handle.deduplicated
print(created)
"""


@pytest.mark.parametrize("unique_for", [None, 3600], ids=["index", "unique_for_lock"])
def test_concurrent_processes_enqueueing_the_same_keys_get_one_job_each(capp, conn, db_url, unique_for):
    processes, keys = 4, 150
    outputs = _race([[sys.executable, "-c", PRODUCER, db_url, str(keys), str(unique_for or "-")]] * processes)
    created = sum(int(out) for out in outputs)
    jobs = scalar(conn, "SELECT count(*) FROM pgq.jobs")
    print(f"{processes} processes x {keys} keys = {processes * keys} enqueues -> {jobs} jobs (expected {keys}); "
          f"producers reported {created} inserts")
    assert jobs == keys and created == keys
    assert scalar(conn, "SELECT count(DISTINCT unique_key) FROM pgq.jobs") == keys


def _race(commands: list[list[str]]) -> list[str]:
    """Start the producer processes, let them all connect, then start them at once; their outputs."""
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for cmd in commands]
    try:
        for p in procs:
            line = p.stdout.readline()
            assert line == "ready\n", (line, p.stderr.read() if p.poll() is not None else "")
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        outputs = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0] * len(procs), [err for _, err in outputs]
    return [out for out, _ in outputs]


def test_unique_for_holds_while_a_worker_finishes_jobs_under_concurrent_producers(capp, conn, db_url):
    """Producers hammer one key while a worker finishes its job as fast as it can: with unique_for, the
    job that just finished still holds the key, so exactly one job is ever created."""
    processes, rounds = 4, 100
    code = PRODUCER.replace('f"proc:{k}"', '"hot"')
    with capp.worker(concurrency=2, poll_interval=0.05).running():
        outputs = _race([[sys.executable, "-c", code, db_url, str(rounds), "3600"]] * processes)
        wait_for(lambda: scalar(conn, "SELECT count(*) FROM pgq.jobs WHERE status = 'succeeded'") >= 1,
                 what="the job to run")
    created = sum(int(out) for out in outputs)
    print(f"{processes} processes x {rounds} enqueues of one key while a worker runs it -> "
          f"{scalar(conn, 'SELECT count(*) FROM pgq.jobs')} job(s) (expected 1)")
    assert created == 1
    assert conn.execute("SELECT status, count(*) FROM pgq.jobs GROUP BY 1").fetchall() == [("succeeded", 1)]


def test_enqueue_unique_uses_the_partial_indexes(capp, conn):
    plain.apply_async(unique_key="plan")
    conn.execute("ANALYZE pgq.jobs")
    conn.execute("SET enable_seqscan = off")  # a tiny table: make the planner show what it can use
    spec = enqueue.build("control.plain", unique_key="plan", unique_for=60.0)
    plan = "\n".join(r[0] for r in conn.execute("EXPLAIN " + _inline(sql.ENQUEUE_UNIQUE, spec.params())))
    assert "jobs_unique_key_idx" in plan and "jobs_unique_finished_idx" in plan, plan


def _inline(statement: str, params: dict) -> str:
    """The statement with its parameters written in as literals (EXPLAIN cannot take bind parameters)."""
    from psycopg import sql as psql

    literals = {k: psql.Literal(v) for k, v in params.items()}
    return psql.SQL(statement.replace("%(", "{").replace(")s", "}")).format(**literals).as_string(None)
