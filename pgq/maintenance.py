"""Background duties of every worker, each callable once (``run_once``) so tests drive them directly.

- heartbeat: extend the leases of the jobs this worker runs (learning which of them were cancelled
  meanwhile), and refresh its row in ``pgq.workers``;
- rescue: give back jobs whose lease expired on any worker (killed, partitioned, frozen). Every worker
  runs it; ``FOR UPDATE SKIP LOCKED`` shares the work without a leader or an advisory lock, so it keeps
  working behind PgBouncer in transaction mode.

Rescue is what makes delivery at-least-once rather than at-most-once: a job whose worker died after the
task's side effects but before recording success runs again. Tasks must be idempotent.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import TYPE_CHECKING

import psycopg

from . import db, sql
from .errors import DatabaseUnavailable
from .executor import ClaimedJob

if TYPE_CHECKING:
    from .worker import Worker

log = logging.getLogger("pgq.worker")

RESCUE_BATCH = 1000
#: A worker row not refreshed for this long belongs to a dead worker and is deleted.
FORGET_WORKERS_AFTER = 600.0
#: A concurrency key's row in pgq.limits unused by any claim for this long is deleted (see pgq.limits).
FORGET_KEYS_AFTER = 3600.0
PRUNE_KEYS_EVERY = 60.0


def rescue_expired(conn: psycopg.Connection, limit: int = RESCUE_BATCH) -> list[tuple]:
    """Rescue up to *limit* jobs whose lease has expired; returns (id, new status, task, attempt, max)."""
    rows = conn.execute(sql.RESCUE, {"limit": limit}).fetchall()
    for job_id, status, task_name, attempts, max_attempts in rows:
        if status == "failed":
            log.error("job %d %s lost its worker on all %d attempts: failed", job_id, task_name, attempts)
        elif status == "cancelled":
            log.warning("job %d %s: lease expired on attempt %d/%d (worker lost) after its cancellation was "
                        "requested: cancelled", job_id, task_name, attempts, max_attempts)
        else:
            log.warning("job %d %s: lease expired on attempt %d/%d (worker lost); will run again",
                        job_id, task_name, attempts, max_attempts)
    return rows


class Keeper:
    """The worker's heartbeat and rescue service."""

    def __init__(self, worker: Worker):
        self.worker = worker
        self._stop = threading.Event()
        self._poke = threading.Event()  # re-plan the next tick: new jobs may need an earlier one
        self._next_tick = 0.0  # monotonic time of the planned next run_once
        self._conn: psycopg.Connection | None = None
        self._last_rescue = 0.0
        self._last_prune = 0.0

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = db.connect(self.worker.app.database_url, role="worker", autocommit=True)
        return self._conn

    def interval(self) -> float:
        """A third of the shortest lease held (so two heartbeats may fail before a lease runs out),
        between 0.2 s and 10 s, and never longer than the rescue interval."""
        leases = [lease for _, _, lease in self.worker.held_tokens()]
        base = min(leases) / 3 if leases else 10.0
        interval = max(0.2, min(base, 10.0, self.worker.rescue_interval))
        deadline = self.worker.next_deadline()
        if deadline is not None:  # wake when the first running job's timeout runs out
            interval = min(interval, max(0.01, deadline - time.monotonic()))
        return interval

    def run_once(self) -> None:
        self.worker.enforce_timeouts()  # first: it needs no database
        conn = self._connection()
        self.heartbeat(conn)
        if time.monotonic() - self._last_rescue >= self.worker.rescue_interval:
            self._last_rescue = time.monotonic()
            rescued = rescue_expired(conn)
            if rescued:
                self.worker.metrics.leases_rescued(rescued)
                self.worker._wake.set()
            conn.execute(sql.WORKERS_FORGET_STALE, {"after": FORGET_WORKERS_AFTER})
            self.limits_upkeep(conn)

    def limits_upkeep(self, conn: psycopg.Connection) -> None:
        """Mark jobs that slipped into a limited queue unmarked (see sql.LIMITS_SWEEP), and now and
        then forget unused concurrency keys."""
        swept = conn.execute(sql.LIMITS_SWEEP, {"queues": self.worker.queues}).rowcount
        if swept:
            log.warning("%d job(s) entered a limited queue as its limit was declared; they go through the "
                        "limited claim now", swept)
            self.worker._limited_due.set()
            self.worker._wake.set()
        if time.monotonic() - self._last_prune >= PRUNE_KEYS_EVERY:
            self._last_prune = time.monotonic()
            conn.execute(sql.LIMITS_PRUNE, {"keep": FORGET_KEYS_AFTER})

    def heartbeat(self, conn: psycopg.Connection) -> None:
        w = self.worker
        conn.execute(sql.WORKER_HEARTBEAT, {
            "id": w.id, "hostname": db.hostname(), "pid": os.getpid(),
            "queues": json.dumps(w.queues), "concurrency": w.concurrency,
        })
        with w.outcome_lock:  # not while the recorder is between its commit and forgetting the jobs
            self._extend_leases(conn)

    def _extend_leases(self, conn: psycopg.Connection) -> None:
        w = self.worker
        tokens = w.held_tokens()
        if tokens:
            sent = time.monotonic()
            rows = conn.execute(sql.EXTEND_LEASES, {"ids": [t[0] for t in tokens],
                                                    "tokens": [t[1] for t in tokens]}).fetchall()
            kept = {row[0] for row in rows}
            w.leases_renewed([(t[0], t[1]) for t in tokens if t[0] in kept], sent)
            lost = [t[0] for t in tokens if t[0] not in kept]
            if lost:
                w.lost_leases(lost)
            cancelled = [row[0] for row in rows if row[1]]
            if cancelled:
                w.cancel_requested(cancelled)

    def loop(self) -> None:
        backoff = db.Reconnect(log)
        while not self._stop.is_set():
            try:
                self.run_once()
                backoff.reset()
                interval = self.interval()
                self._next_tick = time.monotonic() + interval
                self._poke.wait(interval)
                self._poke.clear()
            except (psycopg.OperationalError, DatabaseUnavailable) as exc:
                self._close()
                backoff.wait(self._stop, "heartbeat", exc)
            except psycopg.Error as exc:
                # Not an outage (a missing grant, a read-only standby): say so loudly, keep trying —
                # a dead keeper would let every lease of this worker expire while it runs.
                self._close()
                backoff.failed(self._stop, "heartbeat", exc)

    def tick_by(self, when: float) -> None:
        """Make sure the next tick comes no later than *when* (monotonic): a job just claimed with a
        short lease, or just started with a timeout, may not wait for a tick planned for idle times."""
        if when < self._next_tick:
            self._poke.set()

    def stop(self) -> None:
        self._stop.set()
        self._poke.set()

    def abandon(self, jobs: list[ClaimedJob]) -> None:
        """Shutdown left these jobs running: record the attempt as failed by the shutdown and schedule
        the next one now, instead of making them wait for their lease to expire."""
        if not jobs:
            self._close()
            return
        message = "the worker shut down before the job finished"
        try:
            conn = self._connection()
            for job in jobs:
                entry = json.dumps({"attempt": job.attempt, "type": "WorkerShutdown", "message": message})
                params = {"id": job.id, "token": job.token, "delay": 0.0, "entry": entry,
                          "error": f"WorkerShutdown: {message}", "error_type": "WorkerShutdown",
                          "error_message": message, "traceback": None}
                # The attempt counts, or a job longer than every deploy's grace would loop forever.
                conn.execute(sql.FAIL if job.attempt >= job.max_attempts else sql.RETRY, params)
            log.warning("handed back %d job(s) still running at shutdown", len(jobs))
        except (psycopg.Error, DatabaseUnavailable) as exc:
            log.warning("could not hand back %d running job(s) (%s); their leases will expire", len(jobs), exc)
        finally:
            self._close()

    def deregister(self) -> None:
        try:
            with db.connect(self.worker.app.database_url, role="worker", autocommit=True) as conn:
                conn.execute(sql.WORKER_DEREGISTER, {"id": self.worker.id})
                conn.execute(sql.WORKERS_FORGET_STALE, {"after": FORGET_WORKERS_AFTER})
        except (psycopg.Error, DatabaseUnavailable) as exc:
            log.warning("could not remove worker row (%s)", exc)

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
