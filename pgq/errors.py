"""Exceptions users catch. Every one derives from :class:`pgq.Error`."""

from __future__ import annotations


class Error(Exception):
    """Base class of everything pgq raises on purpose."""


class ConfigurationError(Error):
    """pgq is set up wrongly: no usable database, a bad ``-A`` target, a schema not migrated."""


class DatabaseUnavailable(ConfigurationError):
    """The database cannot be reached (down, wrong host, wrong password)."""


class EnqueueError(Error, ValueError):
    """A job was refused before anything was written: the message names the task and the problem."""


class SerializationError(EnqueueError, TypeError):
    """A value is not JSON-serializable (arguments at enqueue, or a task's return value)."""


class TimeoutError(Error, TimeoutError):
    """``get(timeout=…)`` ran out of time before the job finished."""


class JobNotFound(Error, LookupError):
    """No job and no result exist under this id (never committed, or pruned)."""


class TaskFailed(Error):
    """The job ended ``failed``. Keeps the original exception's type name, message and traceback text,
    because the original exception object lived in another process and only its text was stored."""

    def __init__(self, type_name: str, message: str, traceback: str | None = None, job_id: int | None = None):
        super().__init__(f"{type_name}: {message}" if message else type_name)
        self.type_name = type_name
        self.message = message
        self.traceback = traceback
        self.job_id = job_id


class TaskCancelled(Error):
    """The job was cancelled before it could finish."""


class TaskTimeout(BaseException):
    """Raised inside a task that ran past its ``timeout``. A BaseException, so that a task's
    ``except Exception`` does not swallow it: clean up in ``finally`` instead."""


class CancelRequested(BaseException):
    """Raised inside a running task whose job was cancelled (``handle.cancel()``, ``pgq cancel``), the way
    TaskTimeout is: at the task's next Python bytecode once its worker learns of the request. A
    BaseException, so that ``except Exception`` does not swallow it: clean up in ``finally``. The job is
    already recorded ``cancelled`` when it arrives; whatever the task does next is discarded."""


class LeaseLost(CancelRequested):
    """Raised inside a running task whose worker no longer holds its job: the lease ran out and the job
    was rescued (the worker was frozen or cut off from the database for longer than the lease), or a
    database crash undid the claim. Another worker may be running the job already. It arrives at the
    task's next Python bytecode once the worker learns of it on a heartbeat, and whatever the task does
    next is discarded. A CancelRequested, so cleanup written for cancellation runs for it too."""


class Retry(Exception):
    """Raised by ``self.retry()`` inside a bound task: end this attempt and schedule another."""

    def __init__(self, countdown: float | None = None, exc: BaseException | None = None):
        super().__init__(f"retry requested (countdown={countdown})")
        self.countdown = countdown
        self.exc = exc


class NotRetryable(Error):
    """The job can never succeed (unknown task, arguments that do not fit): fail it at once."""
