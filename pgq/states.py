"""The states of a job's life, and which of them a worker may claim.

    queued ──claim──▶ running ──returned─────────────────────────────▶ succeeded
                        │
                        ├─raised, attempts left ───────────────▶ retrying ──run_at due, claim──▶ running
                        ├─raised on the last attempt, or can never succeed ─▶ failed
                        ├─lease expired (worker lost): rescued, due at once (▶ retrying, or failed on the last attempt)
                        ├─timeout: like a raise
                        ├─worker shut down before starting it: claim undone (▶ queued, or
                        │ retrying if it had failed before), the attempt not counted
                        └─cancel() requested, seen on the worker's heartbeat ─▶ cancelled
    queued / retrying ──cancel()──▶ cancelled
    failed / cancelled ──retried by hand (app.retry, pgq retry)──▶ queued, with a fresh budget of attempts

A running job whose cancellation was requested never waits again: where it would go back to retrying
or queued (raised, lease expired, shut down) it ends cancelled instead. The values are plain lowercase
words because operators read and filter them in SQL.
"""

from __future__ import annotations

from enum import Enum


class JobStatus(str, Enum):
    QUEUED = "queued"  # fresh, never started; run_at may lie in the future (eta / countdown)
    RETRYING = "retrying"  # failed at least once and waits for its next attempt at run_at
    RUNNING = "running"  # claimed by a worker that holds a lease on it
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value


WAITING = (JobStatus.QUEUED, JobStatus.RETRYING)
TERMINAL = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)
ALL = tuple(JobStatus)
