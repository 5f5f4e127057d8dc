"""Writing outcomes: the worker's recorder thread.

Outcomes queue up as tasks finish; the recorder writes everything already finished in one
transaction (up to 500), with all successes in one fenced statement. A lost connection keeps the batch
and retries it after a backoff: an outcome is not lost while its lease holds, and once the lease ran
out the fence turns the late write into a logged no-op. Any other database error (a value PostgreSQL
refuses) falls back to one outcome at a time, and an outcome that cannot be stored at all fails its
job with that reason — the recorder itself never dies, or the worker would hold its jobs forever.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
from typing import TYPE_CHECKING

import psycopg

from . import db, sql
from .errors import DatabaseUnavailable
from .executor import Cancelled, ClaimedJob, ErrorInfo, Failed, Outcome, RetryLater, Succeeded
from .humanize import error_line

if TYPE_CHECKING:
    from .worker import Worker

log = logging.getLogger("pgq.worker")

BATCH = 500

Item = tuple[ClaimedJob, Outcome]
# An outcome waiting for the recorder, with how long its task ran in ms (None: it did not return).
Queued = tuple[ClaimedJob, Outcome, float | None]


class Recorder:
    def __init__(self, worker: Worker):
        self.worker = worker
        # Outcomes waiting to be written. A deque and an Event rather than a Queue: runners append without
        # taking a lock, and wake the recorder only when it sleeps, not once per outcome.
        self.outcomes: collections.deque[Queued] = collections.deque()
        self._pending = threading.Event()
        self.done = threading.Event()  # set at shutdown: write what is queued, then stop
        self._backoff = db.Reconnect()
        self._conn: psycopg.Connection | None = None

    def put(self, job: ClaimedJob, outcome: Outcome, ran_ms: float | None = None) -> None:
        """Queue *outcome* for writing; *ran_ms*, how long the task ran, goes into its success line."""
        self.outcomes.append((job, outcome, ran_ms))
        if not self._pending.is_set():
            self._pending.set()

    def loop(self) -> None:
        batch: list[Item] = []
        while True:
            if not batch and not self.outcomes:
                self._pending.wait(0.2)
                self._pending.clear()  # before reading: an outcome appended after this sets it again
                if not self.outcomes:
                    if self.done.is_set():
                        break
                    continue
            while len(batch) < BATCH:
                try:
                    job, outcome, ran_ms = self.outcomes.popleft()
                except IndexError:
                    break
                batch.append((job, outcome))
                # A success's line is written here, by this one thread, not by the runner that ran the job:
                # from 8 runners, each INFO line cost the worker 37 us of CPU (they queue for the handler's
                # lock and the GIL), and with two lines per job a default (-l info) worker drained 7,400-
                # 8,000 no-op jobs/s against 20,000-22,000 at -l warning. Failures keep their runner's line.
                if ran_ms is not None and isinstance(outcome, Succeeded):
                    log.info("job %d %s succeeded in %.1f ms", job.id, job.task_name, ran_ms)
            try:
                # Commit and forget under one lock, so the keeper never sees a job recorded but still
                # held, and takes its finished job for a lost lease.
                with self.worker.outcome_lock:
                    self._write(batch)
                    self.worker._forget([job for job, _ in batch])
                self._backoff.reset()
            except (psycopg.OperationalError, DatabaseUnavailable) as exc:
                self._close()
                self._backoff.wait(self.worker._hurry, "record outcomes", exc)
                if self.worker._hurry.is_set():
                    break
                continue
            batch = []
        self._close()

    def _write(self, batch: list[Item]) -> None:
        if self._conn is None or self._conn.closed:
            self._conn = db.connect(self.worker.app.database_url, role="worker", autocommit=True)
        try:
            self.record(self._conn, batch)
        except psycopg.OperationalError:
            raise
        except psycopg.Error as exc:
            if self._conn.broken:  # the server ended the session (idle_in_transaction_session_timeout, see
                # db.SERVER_SIDE; a terminate): an outage, not a value it refused. Retried on a new connection.
                raise DatabaseUnavailable(f"the session ended: {error_line(exc)}") from exc
            log.warning("recording %d outcome(s) together failed (%s); recording them one by one",
                        len(batch), exc)
            for item in batch:
                self._write_alone(item)

    def _write_alone(self, item: Item) -> None:
        assert self._conn is not None
        job, _ = item
        try:
            self.record(self._conn, [item])
        except psycopg.OperationalError:
            raise
        except psycopg.Error as exc:
            reason = ErrorInfo("RecordError", f"pgq could not store this job's outcome: {error_line(exc)}", None)
            log.error("job %d %s: cannot store its outcome (%s); failing it", job.id, job.task_name, exc)
            try:
                self.record(self._conn, [(job, Failed(reason))])
            except psycopg.OperationalError:
                raise
            except psycopg.Error as again:  # then the lease expires and the rescuer takes it
                log.error("job %d: cannot record its failure either (%s)", job.id, again)

    def record(self, conn: psycopg.Connection, batch: list[Item]) -> None:
        """Write *batch* in one transaction, each write fenced by the claim that produced it."""
        successes = [(job, o) for job, o in batch if isinstance(o, Succeeded)]
        freed = sorted({job.queue for job, _ in batch if job.limited})
        # Only successes, no limit to free: COMPLETE_MANY alone, atomic by itself in autocommit. One round
        # trip instead of three (BEGIN, the statement, COMMIT): the common batch of a busy worker.
        single = not freed and len(successes) == len(batch)
        with contextlib.nullcontext() if single else conn.transaction():
            if freed:  # slots of limits free up at this commit: every worker of these queues hears of it
                conn.execute(sql.LIMITS_FREED, {"queues": freed})
            if successes:
                rows = conn.execute(sql.COMPLETE_MANY, {
                    "ids": [job.id for job, _ in successes],
                    "tokens": [job.token for job, _ in successes],
                    "results": [o.result_json for _, o in successes],
                }).fetchall()
                recorded = {row[0] for row in rows}
                for job, _ in successes:
                    if job.id not in recorded:
                        _log_fenced(job, "success")
            for job, outcome in batch:
                if isinstance(outcome, RetryLater):
                    row = conn.execute(sql.RETRY, {
                        "id": job.id, "token": job.token, "delay": outcome.delay,
                        "error": outcome.error.summary(), "entry": outcome.error.entry(job.attempt),
                    }).fetchone()
                    if row is None:
                        _log_fenced(job, "retry")
                    else:
                        self.worker._due_in(outcome.delay)
                elif isinstance(outcome, Failed):
                    row = conn.execute(sql.FAIL, {
                        "id": job.id, "token": job.token, "error": outcome.error.summary(),
                        "entry": outcome.error.entry(job.attempt), "error_type": outcome.error.type_name,
                        "error_message": outcome.error.message, "traceback": outcome.error.traceback,
                    }).fetchone()
                    if row is None:
                        _log_fenced(job, "failure")
                elif isinstance(outcome, Cancelled):
                    row = conn.execute(sql.CANCEL_RUNNING, {
                        "id": job.id, "token": job.token, "entry": outcome.entry(job.attempt),
                        "message": outcome.message,
                    }).fetchone()
                    if row is None:
                        _log_fenced(job, "cancellation")

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _log_fenced(job: ClaimedJob, what: str) -> None:
    log.warning("job %d %s attempt %d: claim lost before its %s was recorded (its lease expired, or a "
                "database crash undid the claim); this outcome is discarded", job.id, job.task_name,
                job.attempt, what)
