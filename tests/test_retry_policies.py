"""Retry policies (retry_on, discard_on, autoretry_for), pure and with a worker; and retrying failed or
cancelled jobs by hand (app.retry, ``pgq retry ID…``, ``pgq retry --failed --task NAME``)."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

import pgq
from pgq import executor
from pgq.cli import main
from pgq.executor import Cancelled, ClaimedJob, Failed, RetryLater, Succeeded
from pgq.retry import Backoff, RetryPolicy
from pgq.tasks import CancelFlag
from tests.control_apps import autoretry, plain, policy, until_switched
from tests.helpers import job, scalar

# --- the policy, pure ----------------------------------------------------------------------------------


class Transient(ConnectionError):
    pass


def test_most_specific_class_wins_along_the_mro():
    slow = Backoff(base=5, cap=600, jitter=False)
    p = RetryPolicy(retry_on={TimeoutError: slow, (KeyError, IndexError): Backoff(base=1, jitter=False)},
                    discard_on=(OSError, LookupError))
    assert [slow.seconds(a) for a in (1, 2, 3, 4, 5)] == [5, 25, 125, 600, 600]
    assert p.delay_for(TimeoutError, 2, 2.0) == 25  # TimeoutError is an OSError: the subclass wins
    assert p.delay_for(pgq.TimeoutError, 2, 2.0) == 25  # pgq's is a TimeoutError too
    assert p.delay_for(ConnectionError, 2, 2.0) is None  # another OSError: discarded
    assert p.delay_for(KeyError, 3, 2.0) == 1 and p.delay_for(IndexError, 3, 2.0) == 1
    assert p.delay_for(LookupError, 1, 2.0) is None
    # Anything else: the job's own backoff (with jitter: between half and all of 2 ** 3).
    assert 4 <= p.delay_for(ValueError, 3, 2.0) <= 8
    assert 4 <= p.delay_for(SystemExit, 3, 2.0) <= 8


def test_autoretry_for_is_an_allowlist_with_the_jobs_backoff():
    p = RetryPolicy(autoretry_for=(ConnectionError,), discard_on=(ConnectionRefusedError,),
                    retry_on={Transient: Backoff(base=3, jitter=False)})
    assert p.delay_for(ConnectionError, 1, 0) == 0  # retry_backoff=0: at once
    assert p.delay_for(ConnectionResetError, 1, 0) == 0  # a subclass of a listed class
    assert p.delay_for(ConnectionRefusedError, 1, 0) is None  # more specific: discarded
    assert p.delay_for(Transient, 2, 0) == 9  # retry_on classes retry too, with their Backoff
    assert p.delay_for(ValueError, 1, 0) is None  # not listed: fails at once
    assert p.delay_for(pgq.TaskTimeout, 1, 0) is None
    # An empty autoretry_for is no autoretry_for: everything retries.
    assert RetryPolicy(autoretry_for=()).delay_for(ValueError, 1, 0) == 0


def test_explicit_retry_request_uses_retry_on_backoff_and_ignores_discard():
    p = RetryPolicy(retry_on={TimeoutError: Backoff(base=7, jitter=False)}, discard_on=(ValueError,),
                    autoretry_for=(KeyError,))
    assert p.requested_delay(TimeoutError, 1, 0) == 7
    assert p.requested_delay(ValueError, 1, 0) == 0
    assert p.requested_delay(None, 1, 0) == 0


@pytest.mark.parametrize(("options", "message"), [
    ({"retry_on": {ValueError: 5}}, "retry_on values must be pgq.Backoff"),
    ({"retry_on": [ValueError]}, "retry_on takes a dict"),
    ({"retry_on": {"ValueError": Backoff()}}, "retry_on takes exception classes, got 'ValueError'"),
    ({"discard_on": (ValueError, int)}, "discard_on takes exception classes, got <class 'int'>"),
    ({"autoretry_for": "ValueError"}, "autoretry_for takes exception classes"),
    ({"discard_on": ValueError, "autoretry_for": (ValueError,)}, "ValueError is named twice"),
    ({"retry_on": {KeyError: Backoff(1)}, "discard_on": (KeyError,)}, "KeyError is named twice"),
])
def test_bad_policies_are_refused_when_the_task_is_defined(options, message):
    app = pgq.App("postgresql://unused")
    with pytest.raises(ValueError, match=re.escape(f"task p.bad: {message}")):
        app.task(name="p.bad", **options)(lambda: None)


@pytest.mark.parametrize("value", [-1, float("nan"), "5", True])
def test_bad_backoff_is_refused(value):
    with pytest.raises(ValueError, match="Backoff base must be a number"):
        Backoff(base=value)


# --- the executor, pure --------------------------------------------------------------------------------

unit = pgq.App("postgresql://unused")


@unit.task(name="p.raises", bind=True, max_attempts=3, retry_backoff=0,
           retry_on={TimeoutError: Backoff(base=4, jitter=False)}, discard_on=(ValueError,))
def raises(self, name, countdown=None, ask=False):
    exc = {"timeout": TimeoutError("slow"), "value": ValueError("bad"), "key": KeyError("k")}[name]
    if countdown is not None or ask:
        raise self.retry(countdown=countdown, exc=exc)
    raise exc


@unit.task(name="p.auto", max_attempts=3, retry_backoff=0, autoretry_for=(KeyError,))
def auto(name):
    raise {"key": KeyError("k"), "value": ValueError("v")}[name]


@unit.task(name="p.self_cancel")
def self_cancel():
    raise pgq.CancelRequested()


def _job(task_name, args=(), kwargs=None, attempt=1, max_attempts=3):
    return ClaimedJob(id=7, queue="default", task_name=task_name, args=list(args), kwargs=kwargs or {}, priority=0,
                      attempt=attempt, max_attempts=max_attempts, retry_backoff=0.0, lease_seconds=30,
                      ignore_result=False)


def test_executor_applies_the_tasks_policy():
    timeout = executor.run(unit.tasks, _job("p.raises", ["timeout"], attempt=2))
    assert isinstance(timeout, RetryLater) and timeout.delay == 16 and timeout.error.type_name == "TimeoutError"
    discarded = executor.run(unit.tasks, _job("p.raises", ["value"]))
    assert isinstance(discarded, Failed) and (discarded.error.type_name, discarded.error.message) == ("ValueError",
                                                                                                      "bad")
    other = executor.run(unit.tasks, _job("p.raises", ["key"]))
    assert isinstance(other, RetryLater) and other.delay == 0
    last = executor.run(unit.tasks, _job("p.raises", ["timeout"], attempt=3))
    assert isinstance(last, Failed)  # the last attempt fails whatever the policy
    # self.retry: countdown wins; without one, the retry_on Backoff of exc; discard_on does not apply.
    requested = executor.run(unit.tasks, _job("p.raises", ["value", 11]))
    assert isinstance(requested, RetryLater) and (requested.delay, requested.error.type_name) == (11, "ValueError")
    assert executor.run(unit.tasks, _job("p.raises", ["timeout"], {"ask": True})).delay == 4
    assert executor.run(unit.tasks, _job("p.raises", ["value"], {"ask": True})).delay == 0
    asked = executor.run(unit.tasks, _job("p.raises", ["key"], {"ask": True}))
    assert isinstance(asked, RetryLater) and asked.delay == 0
    # autoretry_for: listed classes retry, others fail at once.
    assert isinstance(executor.run(unit.tasks, _job("p.auto", ["key"])), RetryLater)
    assert isinstance(executor.run(unit.tasks, _job("p.auto", ["value"])), Failed)
    # Timeouts go through the policy as pgq.TaskTimeout.
    assert isinstance(executor.timed_out(_job("p.auto"), 1.0, unit.tasks["p.auto"]), Failed)
    assert isinstance(executor.timed_out(_job("p.raises"), 1.0, unit.tasks["p.raises"]), RetryLater)
    # A task that raises CancelRequested itself ends cancelled.
    assert executor.run(unit.tasks, _job("p.self_cancel")) == Cancelled("cancelled while running (attempt 1)")


@unit.task(name="p.cancel_flag", bind=True)
def cancel_flag(self):
    return self.is_cancelled()


def test_is_cancelled_reads_the_workers_flag():
    assert cancel_flag() is False  # outside a worker
    event = CancelFlag()
    assert executor.run(unit.tasks, _job("p.cancel_flag"), cancel_event=event) == Succeeded("false")
    event.set()
    assert executor.run(unit.tasks, _job("p.cancel_flag"), cancel_event=event) == Succeeded("true")


# --- with a worker -------------------------------------------------------------------------------------


def _errors(conn, job_id):
    return [(e["attempt"], e["type"]) for e in job(conn, job_id)["errors"]]


def test_policies_with_a_worker(capp, conn):
    recovered = policy.delay(["TimeoutError", "TimeoutError"])  # retry_on: retried, then succeeds
    discarded = policy.delay(["TimeoutError", "ValueError"])  # discard_on: fails on attempt 2 of 4
    listed = autoretry.delay("ConnectionError")  # autoretry_for: retried until max_attempts (3)
    unlisted = autoretry.delay("KeyError")  # not in autoretry_for: fails at once
    refused = autoretry.delay("ConnectionRefusedError")  # a listed subclass in discard_on: fails at once
    with capp.worker(concurrency=4, poll_interval=0.05).running():
        assert recovered.get(timeout=10) == 3
        for handle, expected in [(discarded, "ValueError"), (listed, "ConnectionError"), (unlisted, "KeyError"),
                                 (refused, "ConnectionRefusedError")]:
            with pytest.raises(pgq.TaskFailed) as info:
                handle.get(timeout=10)
            assert info.value.type_name == expected
    assert _errors(conn, recovered.id) == [(1, "TimeoutError"), (2, "TimeoutError")]
    # The retry_on Backoff (0.01 s, then 0.01 ** 2) was used, not retry_backoff=0 of the task.
    gap = scalar(conn, "SELECT extract(epoch FROM run_at - (errors->1->>'at')::timestamptz) FROM pgq.jobs "
                       "WHERE id = %s", (recovered.id,))
    assert float(gap) == pytest.approx(0.0001, abs=1e-6)
    assert (job(conn, discarded.id)["attempts"], _errors(conn, discarded.id)) == (2, [(1, "TimeoutError"),
                                                                                       (2, "ValueError")])
    assert job(conn, listed.id)["attempts"] == 3
    assert (job(conn, unlisted.id)["attempts"], job(conn, refused.id)["attempts"]) == (1, 1)


# --- retry by hand -------------------------------------------------------------------------------------


def _fail_for_good(capp, conn, handle):
    with capp.worker(concurrency=1, poll_interval=0.05).running(), pytest.raises(pgq.TaskFailed):
        handle.get(timeout=10)


def test_retry_a_failed_job_by_hand(capp, conn):
    handle = until_switched.delay("a")  # max_attempts 2
    _fail_for_good(capp, conn, handle)
    assert (job(conn, handle.id)["attempts"], _errors(conn, handle.id)) == (2, [(1, "RuntimeError"),
                                                                                 (2, "RuntimeError")])
    conn.execute("INSERT INTO control_switches VALUES ('a')")

    assert capp.retry(handle.id) == "queued"
    row = job(conn, handle.id)
    # attempts keep counting (they fence workers' writes); the budget grows instead
    assert (row["status"], row["attempts"], row["max_attempts"], row["finished_at"], row["worker_id"]) == (
        "queued", 2, 4, None, None)
    assert scalar(conn, "SELECT run_at <= now() FROM pgq.jobs WHERE id = %s", (handle.id,))
    assert scalar(conn, "SELECT count(*) FROM pgq.results WHERE job_id = %s", (handle.id,)) == 0
    assert handle.status == "queued" and handle.result is None
    assert _errors(conn, handle.id)[-1] == (2, "ManualRetry")
    assert capp.retry(handle.id) == "queued"  # not failed any more: unchanged

    with capp.worker(concurrency=1, poll_interval=0.05).running():
        assert handle.get(timeout=10) == "a is on"
    row = job(conn, handle.id)
    assert (row["status"], row["attempts"]) == ("succeeded", 3)  # the first attempt of its fresh budget
    assert [t for _, t in _errors(conn, handle.id)] == ["RuntimeError", "RuntimeError", "ManualRetry"]
    assert capp.retry(handle.id) == "succeeded"  # only failed or cancelled jobs
    with pytest.raises(pgq.JobNotFound):
        capp.retry(999999)


def test_retry_a_cancelled_job_and_one_whose_key_is_taken(capp, conn):
    cancelled = plain.apply_async(args=("c",), unique_key="k")
    assert cancelled.cancel() == "cancelled"
    newer = plain.apply_async(args=("n",), unique_key="k")
    assert not newer.deduplicated
    assert capp.retry(cancelled.id) == "cancelled"  # its key is held by the newer job: left alone
    assert newer.cancel() == "cancelled"
    assert capp.retry(cancelled.id) == "queued"
    row = job(conn, cancelled.id)
    assert (row["status"], row["cancel_requested_at"], row["finished_at"]) == ("queued", None, None)
    assert plain.apply_async(unique_key="k").id == cancelled.id  # it holds its key again
    with capp.worker(concurrency=1, poll_interval=0.05).running():
        assert cancelled.get(timeout=10) == "c"


def test_pgq_retry_ids(capp, conn, db_url):
    failed = plain.delay("f")
    conn.execute("UPDATE pgq.jobs SET status = 'failed', attempts = 3, finished_at = now() WHERE id = %s",
                 (failed.id,))
    waiting = plain.delay("w")
    result = CliRunner().invoke(main, ["--database-url", db_url, "retry", str(failed.id), str(waiting.id), "999999"])
    assert result.exit_code == 1
    assert result.stdout.splitlines() == [
        f"job {failed.id}: queued",
        f"job {waiting.id}: queued, not retried: only failed or cancelled jobs can be",
    ]
    assert result.stderr.strip() == "Error: no job with id 999999"
    assert job(conn, failed.id)["status"] == "queued"


@pytest.mark.parametrize(("args", "message"), [
    ([], "give job ids, or --failed"),
    (["--failed"], "--failed and --cancelled need --task NAME"),
    (["1", "--failed", "--task", "t"], "give job ids, or --failed"),
    (["1", "--task", "t"], "--task and --queue select the jobs of --failed or --cancelled"),
])
def test_pgq_retry_usage_errors_are_one_line(db_url, args, message):
    result = CliRunner().invoke(main, ["--database-url", db_url, "retry", *args])
    assert result.exit_code == 1
    assert result.stderr.strip().count("\n") == 0 and message in result.stderr


def test_pgq_retry_failed_in_bounded_batches(capp, conn, db_url):
    # 2,500 failed jobs of one task in queue a, and others that must not be touched.
    conn.execute("""
        INSERT INTO pgq.jobs (task_name, queue, status, attempts, finished_at, args)
        SELECT t, q, s, 3, now(), jsonb_build_array(i)
        FROM (VALUES ('control.plain', 'a', 'failed', 2500), ('control.plain', 'b', 'failed', 10),
                     ('control.plain', 'a', 'cancelled', 7), ('control.plain', 'a', 'succeeded', 5),
                     ('control.other', 'a', 'failed', 3)) AS v(t, q, s, n),
             generate_series(1, n) AS i
    """)
    conn.execute("INSERT INTO pgq.results (job_id, status, error_type) "
                 "SELECT id, status, 'RuntimeError' FROM pgq.jobs WHERE status <> 'succeeded'")
    # Two failed jobs share a unique key: only one of them may wait again.
    conn.execute("UPDATE pgq.jobs SET unique_key = 'twin' WHERE id IN (SELECT id FROM pgq.jobs "
                 "WHERE task_name = 'control.plain' AND queue = 'a' AND status = 'failed' ORDER BY id DESC LIMIT 2)")

    result = CliRunner().invoke(main, ["--database-url", db_url, "retry", "--failed", "--task", "control.plain",
                                       "--queue", "a"])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "requeued 2499 failed job(s) of control.plain in queue a",
        "left 1 alone: another job with the same unique key is waiting or running",
    ]
    counts = dict(((t, q, s), n) for t, q, s, n in conn.execute(
        "SELECT task_name, queue, status, count(*) FROM pgq.jobs GROUP BY 1, 2, 3").fetchall())
    assert counts == {("control.plain", "a", "queued"): 2499, ("control.plain", "a", "failed"): 1,
                      ("control.plain", "b", "failed"): 10, ("control.plain", "a", "cancelled"): 7,
                      ("control.plain", "a", "succeeded"): 5, ("control.other", "a", "failed"): 3}
    # attempts stay at 3 (they fence workers' writes); max_attempts (3) grows by its budget of 3
    assert scalar(conn, "SELECT count(*) FROM pgq.jobs WHERE status = 'queued' AND attempts = 3 "
                        "AND max_attempts = 6 AND finished_at IS NULL AND run_at <= now()") == 2499
    assert scalar(conn, "SELECT count(*) FROM pgq.results") == 2500 + 10 + 7 + 3 - 2499
    # 1,000 per transaction: each batch's rows carry the id of the (sub)transaction that wrote them. (The
    # last batch, with the twins, fell back to one savepoint per job.)
    batches = conn.execute("SELECT (n - 1) / 1000, count(DISTINCT x) FROM (SELECT xmin::text AS x, "
                           "row_number() OVER (ORDER BY id) AS n FROM pgq.jobs WHERE status = 'queued') AS q "
                           "GROUP BY 1 ORDER BY 1").fetchall()
    assert batches == [(0, 1), (1, 1), (2, 499)]

    again = CliRunner().invoke(main, ["--database-url", db_url, "retry", "--cancelled", "--failed", "--task",
                                      "control.plain"])
    assert again.stdout.splitlines() == [
        "requeued 17 failed or cancelled job(s) of control.plain",
        "left 1 alone: another job with the same unique key is waiting or running",
    ]


def test_next_attempt_claimed_before_the_last_one_is_forgotten_stays_held(capp, conn):
    """A retry due at once can be claimed by the same worker between the recorder's commit and its
    forgetting the old attempt: forgetting attempt 1 must not drop attempt 2 (whose outcome would then
    be discarded and the job left running until its lease expired)."""
    handle = policy.delay(["TimeoutError"])
    worker = capp.worker(concurrency=2)
    try:
        [first] = worker._claim(1)
        outcome = executor.run(capp.tasks, first)
        assert isinstance(outcome, RetryLater)
        with worker.keeper._connection() as c:
            worker.recorder.record(c, [(first, outcome)])  # committed: due again in 0.01 s
        from tests.helpers import wait_for
        [second] = wait_for(lambda: worker._claim(1), timeout=5, what="the retry to be claimable")
        assert (second.id, second.attempt) == (handle.id, 2)
        worker._forget([first])  # the recorder, late
        assert [(t[0], t[1]) for t in worker.held_tokens()] == [(handle.id, second.token)]
        worker._execute(second)
        [(recorded, result, _)] = [worker.recorder.outcomes.popleft()]
        assert (recorded.attempt, result) == (2, Succeeded("2"))
    finally:
        worker._drop_claim_conn()
