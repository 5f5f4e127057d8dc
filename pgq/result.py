"""A handle on one job: its status, and its outcome once it has one (Celery's ``AsyncResult``)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from . import sql
from .errors import JobNotFound, TaskCancelled, TaskFailed, TimeoutError

if TYPE_CHECKING:
    from .app import App

# get() polls the results table: first after 5 ms, then each wait 1.5x longer, at most 0.5 s apart.
# A job that finishes in a few milliseconds is returned within about as much; a long job costs one
# primary-key lookup every half second.
POLL_FIRST = 0.005
POLL_FACTOR = 1.5
POLL_MAX = 0.5


class AsyncResult:
    def __init__(self, app: App, job_id: int):
        self.app = app
        self.id = int(job_id)
        # True when enqueueing found a job holding the same unique key and returned it instead.
        self.deduplicated = False

    def __repr__(self) -> str:
        return f"<AsyncResult {self.id}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AsyncResult) and other.id == self.id and other.app is self.app

    def __hash__(self) -> int:
        return hash(self.id)

    def _fetch(self) -> tuple[Any, ...] | None:
        return self.app.run(lambda conn: conn.execute(sql.FETCH_RESULT, {"id": self.id}).fetchone(),
                            idempotent=True)

    @property
    def status(self) -> str:
        """The job's status (``queued``, ``retrying``, ``running``, ``succeeded``, ``failed``,
        ``cancelled``); the stored outcome's once the job row has been pruned."""
        row = self._fetch()
        if row is None or (row[0] is None and row[1] is None):
            raise JobNotFound(f"no job with id {self.id}")
        return str(row[0] or row[1])

    state = status  # Celery's name

    def ready(self) -> bool:
        return self.status in ("succeeded", "failed", "cancelled")

    def successful(self) -> bool:
        return self.status == "succeeded"

    def failed(self) -> bool:
        return self.status == "failed"

    def cancel(self) -> str:
        """Cancel the job; see :meth:`pgq.App.cancel`. Returns its status afterwards."""
        return self.app.cancel(self.id)

    def get(self, timeout: float | None = None, *, propagate: bool = True) -> Any:
        """Wait for the job to finish and return its result.

        Raises :class:`pgq.TaskFailed` (original type name, message and traceback text) if it failed,
        :class:`pgq.TaskCancelled` if it was cancelled, :class:`pgq.TimeoutError` after *timeout*
        seconds, :class:`pgq.JobNotFound` if no such job exists. With ``propagate=False`` a failure is
        returned as the TaskFailed instead of raised.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = POLL_FIRST
        while True:
            outcome = self._outcome()
            if outcome is not _PENDING:
                if isinstance(outcome, BaseException) and (propagate or not isinstance(outcome, TaskFailed)):
                    raise outcome
                return outcome
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"job {self.id} did not finish within {timeout} s")
                delay = min(delay, remaining)
            time.sleep(delay)
            delay = min(delay * POLL_FACTOR, POLL_MAX)

    @property
    def result(self) -> Any:
        """The result if the job succeeded, the TaskFailed if it failed, None while it is not done."""
        outcome = self._outcome()
        return None if outcome is _PENDING else outcome

    def _outcome(self) -> Any:
        row = self._fetch()
        assert row is not None
        job_status, result_status, result, error_type, error_message, traceback = row
        if result_status == "succeeded":
            return result
        if result_status == "failed":
            return TaskFailed(error_type or "Error", error_message or "", traceback, job_id=self.id)
        if job_status == "cancelled" or result_status == "cancelled":
            return TaskCancelled(f"job {self.id} was {error_message or 'cancelled'}")
        if job_status == "succeeded":  # ignore_result=True: the job ran, nothing was stored
            return None
        if job_status is None:
            return JobNotFound(f"no job with id {self.id} (never committed, or already pruned)")
        return _PENDING


_PENDING = object()
