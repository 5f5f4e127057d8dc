"""The pure parts: validation at enqueue, retry arithmetic, serialization, running one job. No database."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

import pgq
from pgq import enqueue, executor, retry
from pgq.executor import ClaimedJob, Failed, RetryLater, Succeeded

app = pgq.App("postgresql://unused")  # never connects: these tests write nothing


@app.task(name="u.add")
def add(x, y):
    return x + y


@app.task(name="u.boom", max_attempts=3, retry_backoff=2)
def boom():
    raise ValueError("boom")


@app.task(name="u.bound", bind=True, max_attempts=2)
def bound(self, n):
    if n == "retry":
        raise self.retry(countdown=7)
    return [self.request.id, self.request.attempt, self.request.task_name]


class Unprintable(Exception):
    def __str__(self):
        raise RuntimeError("cannot print me")


@app.task(name="u.unprintable")
def unprintable():
    raise Unprintable()


@app.task(name="u.exits")
def exits():
    raise SystemExit(3)


def job(task_name, args=(), kwargs=None, attempt=1, max_attempts=3, ignore_result=False, backoff=2.0):
    return ClaimedJob(id=42, queue="default", task_name=task_name, args=list(args), kwargs=kwargs or {},
                      priority=0, attempt=attempt, max_attempts=max_attempts, retry_backoff=backoff,
                      lease_seconds=30, ignore_result=ignore_result)


# --- enqueue validation: refused before anything is written, naming the task and the problem ---------

@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"args": ({1, 2},)}, "not JSON-serializable"),
        ({"kwargs": {"when": datetime.now(timezone.utc)}}, "not JSON-serializable"),
        ({"args": (float("nan"),)}, "not JSON-serializable"),
        ({"args": "abc"}, "args must be a list or tuple"),
        ({"kwargs": {1: "x"}}, "string keys"),
        ({"queue": ""}, "queue name"),
        ({"queue": "bad queue; drop table"}, "queue name"),
        ({"priority": 40000}, "priority must be an integer"),
        ({"priority": "high"}, "priority must be an integer"),
        ({"countdown": -1}, "countdown must be a number"),
        ({"countdown": float("inf")}, "countdown must be a number"),
        ({"eta": datetime(2030, 1, 1)}, "naive datetime"),
        ({"eta": "tomorrow"}, "eta must be a datetime"),
        ({"eta": datetime.now(timezone.utc), "countdown": 5}, "not both"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"lease_seconds": 0}, "lease_seconds"),
    ],
)
def test_bad_enqueue_is_refused_with_a_clear_message(options, message):
    with pytest.raises(pgq.EnqueueError, match=message) as info:
        enqueue.build("u.add", **options)
    assert "u.add" in str(info.value)


@pytest.mark.parametrize("name", ["", "   ", None, 5, "x" * 201])
def test_bad_task_name_is_refused(name):
    with pytest.raises(pgq.EnqueueError, match="task name"):
        enqueue.build(name)


def test_payload_over_the_limit_is_refused(monkeypatch):
    monkeypatch.setenv("PGQ_MAX_PAYLOAD_BYTES", "100")
    enqueue.build("u.add", args=["x" * 50])
    with pytest.raises(pgq.EnqueueError, match="over the limit of 100 bytes"):
        enqueue.build("u.add", args=["x" * 200])


def test_delay_validates_before_connecting():
    # The app's URL points nowhere: a refusal must come before any connection attempt.
    with pytest.raises(pgq.SerializationError, match=r"u\.add"):
        add.delay(object(), 1)


def test_valid_spec_keeps_values():
    eta = datetime.now(timezone(timedelta(hours=2)))
    spec = enqueue.build("u.add", args=(1, "é"), kwargs={"k": [1]}, queue="a.b:c-d_e", priority=-5, eta=eta)
    assert json.loads(spec.args) == [1, "é"]
    assert json.loads(spec.kwargs) == {"k": [1]}
    assert (spec.queue, spec.priority, spec.eta) == ("a.b:c-d_e", -5, eta)


def test_task_registration():
    assert app.tasks["u.add"] is add
    assert add(2, 3) == 5  # calling a task runs it here and now

    @app.task
    def plain():
        return 1

    assert plain.name == f"{__name__}.test_task_registration.<locals>.plain"
    with pytest.raises(ValueError, match="already registered"):
        app.task(name="u.add")(lambda: None)
    with pytest.raises(pgq.EnqueueError, match="max_attempts"):
        app.task(name="u.bad", max_attempts=0)(lambda: None)


# --- retry arithmetic -------------------------------------------------------------------------------

def test_backoff_grows_exponentially_and_is_capped():
    assert retry.backoff_seconds(1, 2, jitter=False) == 2
    assert retry.backoff_seconds(3, 2, jitter=False) == 8
    assert retry.backoff_seconds(50, 2, jitter=False) == retry.MAX_BACKOFF_SECONDS
    assert retry.backoff_seconds(4, 0) == 0


def test_jitter_stays_between_half_and_full_delay():
    delays = [retry.backoff_seconds(3, 2) for _ in range(500)]
    assert all(4 <= d <= 8 for d in delays)
    assert max(delays) - min(delays) > 1  # it does vary


# --- running one job ---------------------------------------------------------------------------------

def test_success_is_serialized():
    assert executor.run(app.tasks, job("u.add", (2, 3))) == Succeeded("5")
    assert executor.run(app.tasks, job("u.add", (2, 3), ignore_result=True)) == Succeeded(None)


def test_error_retries_then_fails_on_the_last_attempt():
    first = executor.run(app.tasks, job("u.boom", attempt=1, max_attempts=3))
    assert isinstance(first, RetryLater)
    assert 1 <= first.delay <= 2
    assert first.error.type_name == "ValueError" and first.error.message == "boom"
    assert "raise ValueError" in first.error.traceback
    last = executor.run(app.tasks, job("u.boom", attempt=3, max_attempts=3))
    assert isinstance(last, Failed) and last.error.summary() == "ValueError: boom"


@pytest.mark.parametrize(
    ("the_job", "message"),
    [
        (job("u.nope"), "unknown task 'u.nope'"),
        (job("u.add", (1,)), "arguments do not match u.add"),
        (job("u.add", (1, 2), {"z": 1}), "arguments do not match"),
        (ClaimedJob(1, "default", "u.add", {"x": 1}, [], 0, 1, 3, 2.0, 30, False), "malformed job"),
    ],
)
def test_jobs_that_can_never_succeed_fail_at_once(the_job, message):
    outcome = executor.run(app.tasks, the_job)
    assert isinstance(outcome, Failed)
    assert message in outcome.error.message


def test_argument_check_is_kept_per_shape_of_arguments():
    """The worker checks a job's arguments once per task and shape (count, keyword names); values never
    change the answer."""
    for _ in range(2):  # the second round answers from what the first one kept
        assert isinstance(executor.run(app.tasks, job("u.add", (1, 2))), Succeeded)
        assert isinstance(executor.run(app.tasks, job("u.add", (3, 4))), Succeeded)
        assert "arguments do not match" in executor.run(app.tasks, job("u.add", (1,))).error.message
        assert isinstance(executor.run(app.tasks, job("u.add", (1,), {"y": 2})), Succeeded)
        assert "arguments do not match" in executor.run(app.tasks, job("u.add", (1,), {"z": 2})).error.message
    assert app.tasks["u.add"].bind_problems.keys() >= {(2, ()), (1, ()), (1, ("y",)), (1, ("z",))}


def test_unserializable_result_fails_at_once():
    @app.task(name="u.returns_object")
    def returns_object():
        return object()

    outcome = executor.run(app.tasks, job("u.returns_object"))
    assert isinstance(outcome, Failed)
    assert "the result of u.returns_object is not JSON-serializable" in outcome.error.message


def test_bound_task_sees_its_request_and_can_retry():
    assert executor.run(app.tasks, job("u.bound", ("x",), attempt=1)) == Succeeded('[42,1,"u.bound"]')
    outcome = executor.run(app.tasks, job("u.bound", ("retry",), attempt=1, max_attempts=2))
    assert isinstance(outcome, RetryLater) and outcome.delay == 7
    outcome = executor.run(app.tasks, job("u.bound", ("retry",), attempt=2, max_attempts=2))
    assert isinstance(outcome, Failed) and "no attempts left" in outcome.error.message
    assert bound.request.id is None  # outside a job the request is empty


def test_exception_whose_str_raises_is_still_reported():
    outcome = executor.run(app.tasks, job("u.unprintable", attempt=3, max_attempts=3))
    assert isinstance(outcome, Failed)
    assert outcome.error.type_name == "Unprintable"
    assert outcome.error.message == "<unprintable Unprintable>"


def test_system_exit_in_a_task_does_not_escape():
    outcome = executor.run(app.tasks, job("u.exits", attempt=1, max_attempts=1))
    assert isinstance(outcome, Failed) and outcome.error.type_name == "SystemExit"


def test_task_failed_keeps_the_original_error():
    exc = pgq.TaskFailed("KeyError", "'x'", "Traceback ...", job_id=3)
    assert str(exc) == "KeyError: 'x'"
    assert (exc.type_name, exc.message, exc.traceback, exc.job_id) == ("KeyError", "'x'", "Traceback ...", 3)
    assert isinstance(pgq.TimeoutError("t"), TimeoutError)


@pytest.mark.parametrize("script", ["run.py", "sustained.py", "enqueue_anatomy.py"])
def test_benchmark_help(script):
    """Each benchmark's one command documents itself: --help prints its options (a '%' in a help string
    once made run.py's --help crash in argparse)."""
    import subprocess
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / script
    out = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--database-url" in out.stdout
