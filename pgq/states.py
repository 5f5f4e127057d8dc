"""The states of a job's life, and which of them a worker may claim.

    queued ──claim──▶ running ──ok──────────────▶ succeeded
      ▲                 │  │
      │                 │  ├─error, attempts left─▶ retrying ──(run_at arrives)──claim──▶ running
      │                 │  ├─error, no attempts / never retryable─▶ failed
      │                 │  └─lease expired (worker lost): rescued like an error
      └──released on shutdown (the claim is undone, the attempt is not counted)
    queued / retrying ──cancel──▶ cancelled

The values are plain lowercase words because operators read and filter them in SQL.
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
