"""Running one claimed job and deciding its outcome. Pure: no database, so it is tested without one.

The outcome is one of four: Succeeded (with the result as JSON text), RetryLater (with a delay),
Failed, or Cancelled. Errors that can never succeed — an unknown task name, arguments that do not fit
the function, a result that is not JSON — fail at once instead of burning the remaining attempts, and so
do the exceptions a task's retry policy discards (see :class:`pgq.retry.RetryPolicy`).
"""

from __future__ import annotations

import traceback as tb_module
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from . import retry, serialization
from .errors import CancelRequested, NotRetryable, Retry, SerializationError, TaskTimeout
from .tasks import CancelFlag, Request, Task, run_with_request

MAX_TRACEBACK_CHARS = 20_000
MAX_MESSAGE_CHARS = 4_000


@dataclass(frozen=True)
class ClaimedJob:
    id: int
    queue: str
    task_name: str
    args: Any
    kwargs: Any
    priority: int
    attempt: int
    max_attempts: int
    retry_backoff: float
    lease_seconds: int
    ignore_result: bool
    token: int = 0  # the claim's fencing token (sql.CLAIM_TOKEN): every write of this attempt names it
    limited: bool = False  # claimed by the limited claim (see pgq.limits)


@dataclass(frozen=True)
class ErrorInfo:
    type_name: str
    message: str
    traceback: str | None

    def summary(self) -> str:
        return f"{self.type_name}: {self.message}" if self.message else self.type_name

    def entry(self, attempt: int) -> str:
        """The JSON of one attempt's error, as kept in ``jobs.errors`` (the database adds ``at``)."""
        return serialization.dumps(
            {"attempt": attempt, "type": self.type_name, "message": self.message, "traceback": self.traceback},
            what="an error record",
        )


@dataclass(frozen=True)
class Succeeded:
    result_json: str | None


@dataclass(frozen=True)
class RetryLater:
    delay: float
    error: ErrorInfo


@dataclass(frozen=True)
class Failed:
    error: ErrorInfo


@dataclass(frozen=True)
class Cancelled:
    message: str

    def entry(self, attempt: int) -> str:
        """The attempt's record in ``jobs.errors``."""
        return ErrorInfo("TaskCancelled", self.message, None).entry(attempt)


Outcome = Succeeded | RetryLater | Failed | Cancelled


def run(tasks: Mapping[str, Task], job: ClaimedJob, worker_id: str | None = None,
        cancel_event: CancelFlag | None = None) -> Outcome:
    """Run *job* with the task registered under its name and say how it ended. Never raises.
    *cancel_event* is what the task's ``is_cancelled()`` reads."""
    task = None
    try:
        task = tasks.get(job.task_name)
        if task is None:
            raise NotRetryable(f"unknown task {job.task_name!r}: no task of that name is registered in this worker")
        call = _bind_call(task, job)
        request = Request(
            id=job.id, task_name=job.task_name, attempt=job.attempt, max_attempts=job.max_attempts,
            queue=job.queue, args=job.args, kwargs=job.kwargs, worker_id=worker_id, cancel_event=cancel_event,
            claim_token=job.token,
        )
        value = run_with_request(request, call)
        if job.ignore_result:
            return Succeeded(None)
        try:
            return Succeeded(serialization.dumps(value, what=f"the result of {job.task_name}"))
        except SerializationError as exc:
            raise NotRetryable(str(exc)) from None
    except NotRetryable as exc:
        return Failed(ErrorInfo("NotRetryable", _safe_str(exc), None))
    except Retry as exc:
        return _after_retry_request(job, exc, task)
    except Exception as exc:  # the task's own failure: retry while attempts are left (and its policy says so)
        return _after_error(job, describe(exc), task, type(exc))
    except CancelRequested:  # the worker interrupted it for a cancellation (or the task cancelled itself)
        return cancelled(job)
    except BaseException as exc:  # SystemExit / KeyboardInterrupt inside a task must not kill the worker
        return _after_error(job, describe(exc), task, type(exc))


def _bind_call(task: Task, job: ClaimedJob) -> Any:
    if not isinstance(job.args, list) or not isinstance(job.kwargs, dict):
        raise NotRetryable(
            f"malformed job: args must be a JSON array and kwargs a JSON object, got "
            f"{type(job.args).__name__} and {type(job.kwargs).__name__}"
        )
    args, kwargs = job.args, job.kwargs
    # Whether arguments fit depends on their number and keyword names only, so the answer is kept per
    # task and shape: binding every job was 6 % of a no-op drain's worker CPU (py-spy --gil).
    shape = (len(args), tuple(sorted(kwargs)))
    problem = task.bind_problems.get(shape, _UNKNOWN)
    if problem is _UNKNOWN:
        problem = _bind_problem(task, args, kwargs)
        if len(task.bind_problems) < 256:  # keyword names come from the jobs: bound the memory they take
            task.bind_problems[shape] = problem
    if problem is not None:
        raise NotRetryable(f"arguments do not match {job.task_name}{task.call_signature}: {problem}")
    return lambda: task(*args, **kwargs)


_UNKNOWN = object()


def _bind_problem(task: Task, args: list, kwargs: dict) -> str | None:
    """Why these arguments cannot be passed to *task*'s function, or None when they can."""
    try:
        task.call_signature.bind(*([task, *args] if task.bind else args), **kwargs)
    except TypeError as exc:
        return str(exc)
    except ValueError:  # no signature to check (some builtins): let the call itself decide
        pass
    return None


def timed_out(job: ClaimedJob, seconds: float, task: Task | None = None) -> Outcome:
    """The outcome of an attempt that ran past its timeout: retried like any error while attempts remain
    (and the task's retry policy, for pgq.TaskTimeout, allows)."""
    return _after_error(job, ErrorInfo("TaskTimeout", f"exceeded its timeout of {seconds:g} s", None), task,
                        TaskTimeout)


def cancelled(job: ClaimedJob) -> Cancelled:
    """The outcome of an attempt ended by its job's cancellation."""
    return Cancelled(f"cancelled while running (attempt {job.attempt})")


def _after_error(job: ClaimedJob, error: ErrorInfo, task: Task | None = None,
                 exc_type: type[BaseException] | None = None) -> Outcome:
    if job.attempt >= job.max_attempts:
        return Failed(error)
    if task is None or exc_type is None or not task.retry_policy:
        return RetryLater(retry.backoff_seconds(job.attempt, job.retry_backoff), error)
    delay = task.retry_policy.delay_for(exc_type, job.attempt, job.retry_backoff)
    return Failed(error) if delay is None else RetryLater(delay, error)


def _after_retry_request(job: ClaimedJob, request: Retry, task: Task | None = None) -> Outcome:
    if request.exc is not None:
        error = describe(request.exc)
    else:
        error = ErrorInfo("Retry", "the task asked to be retried", None)
    if job.attempt >= job.max_attempts:
        return Failed(ErrorInfo(error.type_name, f"{error.message} (no attempts left: {job.max_attempts} used)",
                                error.traceback))
    if request.countdown is not None:
        delay = request.countdown
    elif task is not None and task.retry_policy:
        delay = task.retry_policy.requested_delay(type(request.exc) if request.exc is not None else None,
                                                  job.attempt, job.retry_backoff)
    else:
        delay = retry.backoff_seconds(job.attempt, job.retry_backoff)
    return RetryLater(max(0.0, float(delay)), error)


def describe(exc: BaseException) -> ErrorInfo:
    """Type name, message and traceback text of *exc*, even when its ``__str__`` itself raises."""
    try:
        text = "".join(tb_module.format_exception(type(exc), exc, exc.__traceback__))
    except Exception:
        text = None
    return ErrorInfo(_storable(type(exc).__name__), _safe_str(exc)[:MAX_MESSAGE_CHARS],
                     _storable(text[-MAX_TRACEBACK_CHARS:]) if text else None)


def _safe_str(exc: BaseException) -> str:
    try:
        return _storable(str(exc))
    except Exception:
        return f"<unprintable {type(exc).__name__}>"


def _storable(text: str) -> str:
    """*text* as PostgreSQL can store it: NUL characters and lone surrogates are written as escapes
    (an error message must never make its own recording fail)."""
    return text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")
