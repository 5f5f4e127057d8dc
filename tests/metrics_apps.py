"""Tasks for tests/test_metrics.py; worker subprocesses load them with ``-A tests.metrics_apps``.
Every outcome a worker counts, each with a number of attempts known in advance."""

from __future__ import annotations

import sys
import time

import pgq

app = pgq.App()


@app.task(name="metrics.ok")
def ok():
    return "ok"


@app.task(name="metrics.fail", max_attempts=2, retry_backoff=0)
def fail():
    """Two attempts, both failing: one retried, one failed."""
    raise ValueError("always")


@app.task(name="metrics.flaky", bind=True, max_attempts=3, retry_backoff=0)
def flaky(self):
    """Fails its first two attempts, succeeds on the third."""
    if self.request.attempt < 3:
        raise RuntimeError(f"attempt {self.request.attempt}")
    return self.request.attempt


@app.task(name="metrics.spawn")
def spawn(jobs, queue):
    """Enqueues *jobs* jobs of metrics.ok in *queue* from inside the worker (its own enqueues are counted)."""
    for _ in range(jobs):
        ok.apply_async(queue=queue)
    return jobs


def _nap(seconds):
    """Sleeps in short steps, so a timeout or a cancellation interrupts it at once."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.01)


@app.task(name="metrics.nap")
def nap(seconds):
    _nap(seconds)


@app.task(name="metrics.too_slow", timeout=0.2, max_attempts=2, retry_backoff=0)
def too_slow(seconds):
    """Times out on both its attempts: one retried, one failed."""
    _nap(seconds)


@app.task(name="metrics.prometheus_loaded")
def prometheus_loaded():
    """Whether the worker process running this task has imported prometheus_client."""
    return "prometheus_client" in sys.modules
