"""pgq: a durable job queue for Python whose only infrastructure is PostgreSQL."""

from .app import App
from .errors import (
    CancelRequested,
    ConfigurationError,
    DatabaseUnavailable,
    EnqueueError,
    Error,
    JobNotFound,
    LeaseLost,
    Retry,
    SerializationError,
    TaskCancelled,
    TaskFailed,
    TaskTimeout,
    TimeoutError,
)
from .result import AsyncResult
from .retry import Backoff
from .states import JobStatus
from .tasks import Request, Signature, Task
from .worker import Worker

__all__ = [
    "App",
    "AsyncResult",
    "Backoff",
    "CancelRequested",
    "ConfigurationError",
    "DatabaseUnavailable",
    "EnqueueError",
    "Error",
    "JobNotFound",
    "JobStatus",
    "LeaseLost",
    "Request",
    "Retry",
    "SerializationError",
    "Signature",
    "Task",
    "TaskCancelled",
    "TaskFailed",
    "TaskTimeout",
    "TimeoutError",
    "Worker",
]

__version__ = "0.1.0"
