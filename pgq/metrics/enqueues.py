"""Jobs enqueued by this process: ``pgq_jobs_enqueued_total`` per task and queue.

pgq.enqueue and pgq.periodic call :func:`enqueued` after each INSERT. Until something counts (a worker
serving metrics, or :func:`count_enqueues`), that is a call and a loop over an empty list.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..enqueue import JobSpec

# Every EnqueueCounter counting this process's enqueues. Empty (the default), enqueue pays a call and an
# empty loop.
_enqueue_counters: list[EnqueueCounter] = []


def enqueued(task_name: str, queue: str, jobs: int = 1) -> None:
    """Jobs were written by an enqueue of this process (pgq.enqueue and pgq.periodic call it)."""
    for counter in _enqueue_counters:
        counter.add(task_name, queue, jobs)


def enqueued_many(bases: Sequence[JobSpec], jobs: Sequence[str]) -> None:
    """A bulk enqueue wrote *jobs* (pgq.enqueue.bulk_job texts, each starting with its base's index)."""
    if _enqueue_counters:
        per_base = Counter(int(job[1:job.index(",")]) for job in jobs)
        for index, count in per_base.items():
            enqueued(bases[index].task_name, bases[index].queue, count)


class EnqueueCounter:
    """``pgq_jobs_enqueued_total``: jobs this process enqueued, per task and queue, as a collector.

    Counted when the INSERT returns, so a job enqueued in a transaction that then rolls back is counted
    too; a unique job that returned an existing job is not. Producers in other processes are counted by
    their own process (:func:`count_enqueues`), and all of them together by ``pgq_jobs_inserted_total``.
    """

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def add(self, task_name: str, queue: str, jobs: int) -> None:
        with self._lock:
            key = (task_name, queue)
            self._counts[key] = self._counts.get(key, 0) + jobs

    def start(self) -> EnqueueCounter:
        if self not in _enqueue_counters:
            _enqueue_counters.append(self)
        return self

    def stop(self) -> None:
        if self in _enqueue_counters:
            _enqueue_counters.remove(self)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily

        family = CounterMetricFamily("pgq_jobs_enqueued_total", "Jobs enqueued by this process (committed or not)",
                                     labels=("task", "queue"))
        with self._lock:
            counts = sorted(self._counts.items())
        for (task_name, queue), jobs in counts:
            family.add_metric((task_name, queue), jobs)
        yield family


def count_enqueues(registry: Any = None) -> EnqueueCounter:
    """Count the jobs this process enqueues as ``pgq_jobs_enqueued_total`` in *registry* (default:
    prometheus_client's global registry), for producers that export metrics of their own (a web app).
    Workers started with metrics count theirs without this."""
    from prometheus_client import REGISTRY

    counter = EnqueueCounter()
    (REGISTRY if registry is None else registry).register(counter)
    return counter.start()
