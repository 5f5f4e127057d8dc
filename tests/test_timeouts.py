"""Task timeouts with the thread pool: the attempt ends at its deadline whatever the code does; Python
code is interrupted, a blocking C call is abandoned, and the worker keeps its full concurrency."""

from __future__ import annotations

import signal
import time

import pytest

import pgq
from tests import fault_apps
from tests.helpers import WorkerProcess, scalar, wait_for


def test_runaway_python_is_interrupted_and_retried_then_failed(fapp, conn):
    fault_apps.INTERRUPTED.clear()
    spinning = fault_apps.spin.delay()
    after = fault_apps.when.delay()  # needs no connection of its own
    with fapp.worker(concurrency=1, queues=["default"]).running():
        with pytest.raises(pgq.TaskFailed, match=r"exceeded its timeout of 0\.5 s") as info:
            spinning.get(timeout=20)
        assert after.get(timeout=10)  # the one slot was given back
        wait_for(lambda: len(fault_apps.INTERRUPTED) == 2, timeout=5, what="both attempts interrupted")
    assert info.value.type_name == "TaskTimeout"
    errors = scalar(conn, "SELECT errors FROM pgq.jobs WHERE id = %s", (spinning.id,))
    assert [e["type"] for e in errors] == ["TaskTimeout", "TaskTimeout"]
    assert [spinning.id, spinning.id] == fault_apps.INTERRUPTED


def test_runners_replaced_again_and_again_keep_the_worker_s_capacity(fapp, conn):
    """Each timeout retires its runner for a fresh one. Thread idents of ended threads are handed to new
    ones: a replacement that inherited the ident of a runner retired earlier must not take itself for
    retired, leave after its first job, and leave the worker with no runner."""
    fault_apps.INTERRUPTED.clear()
    spinning = [fault_apps.spin.delay() for _ in range(3)]  # 2 attempts each: 6 runners retired, one by one
    with fapp.worker(concurrency=1, queues=["default"], poll_interval=0.1).running() as worker:
        for handle in spinning:
            with pytest.raises(pgq.TaskFailed):
                handle.get(timeout=20)
        wait_for(lambda: len(fault_apps.INTERRUPTED) == 6, timeout=5, what="every attempt interrupted")
        for _ in range(4):  # more jobs than a runner that leaves after one could take
            assert fault_apps.when.delay().get(timeout=10)
        assert sum(1 for r in worker._runners if r.is_alive()) == 1


def test_worker_default_timeout_abandons_blocking_code_and_keeps_capacity(fapp, conn, db_url):
    blocked = fault_apps.block.delay(120)
    worker = WorkerProcess(db_url, "-c", "1", "--task-timeout", "0.5", "--shutdown-grace", "30",
                           app="tests.fault_apps")
    try:
        with pytest.raises(pgq.TaskFailed, match=r"exceeded its timeout of 0\.5 s"):
            blocked.get(timeout=20)
        # Both attempts' threads still sleep; a fresh runner keeps the single slot working.
        assert fault_apps.work.delay().get(timeout=10)
        assert scalar(conn, "SELECT attempts FROM pgq.jobs WHERE id = %s", (blocked.id,)) == 2
        started = time.monotonic()
        worker.signal(signal.SIGTERM)
        assert worker.wait(timeout=20) == 0
        assert time.monotonic() - started < 10  # abandoned threads do not hold the shutdown for its grace
    finally:
        output = worker.stop()
    assert "exceeded its timeout of 0.5 s" in output
    assert scalar(conn, "SELECT count(*) FROM pgq.jobs WHERE status = 'running'") == 0


def test_timeout_must_be_positive(fapp):
    with pytest.raises(ValueError, match="timeout must be a number"):
        fapp.task(name="faults.bad_timeout", timeout=0)(lambda: None)
