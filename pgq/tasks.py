"""Tasks: a function registered under a name, with its defaults, that can be called now or enqueued."""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from . import enqueue
from .errors import Retry

if TYPE_CHECKING:
    from .app import App
    from .result import AsyncResult


@dataclass(frozen=True)
class Request:
    """What a running task knows about its job (``self.request`` in a ``bind=True`` task)."""

    id: int | None = None
    task_name: str | None = None
    attempt: int = 0  # 1 on the first run, 2 on the first retry, …
    max_attempts: int = 1
    queue: str | None = None
    args: Sequence[Any] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    worker_id: str | None = None

    @property
    def retries(self) -> int:
        """Celery's name: how many times this job has been retried so far."""
        return max(0, self.attempt - 1)


_current_request: contextvars.ContextVar[Request] = contextvars.ContextVar(
    "pgq_request", default=Request()  # noqa: B039 - Request is frozen; the default is never mutated
)


class Task:
    """A registered task. Calling it runs the function here and now; ``delay``/``apply_async`` enqueue."""

    def __init__(
        self,
        app: App,
        fn: Callable[..., Any],
        *,
        name: str,
        queue: str = "default",
        max_attempts: int = 3,
        retry_backoff: float = 2.0,
        lease_seconds: int = 30,
        priority: int = 0,
        bind: bool = False,
        ignore_result: bool = False,
        timeout: float | None = None,
    ):
        self.app = app
        self.fn = fn
        self.name = name
        self.queue = queue
        self.max_attempts = max_attempts
        self.retry_backoff = retry_backoff
        self.lease_seconds = lease_seconds
        self.priority = priority
        self.bind = bind
        self.ignore_result = ignore_result
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not timeout > 0):
            raise ValueError(f"task {name}: timeout must be a number of seconds > 0, got {timeout!r}")
        self.timeout = timeout
        # Refuse bad defaults when the module is imported, not at the first enqueue.
        self._spec()
        self.__doc__ = fn.__doc__
        self.__name__ = getattr(fn, "__name__", name)
        self.__module__ = getattr(fn, "__module__", None)  # type: ignore[assignment]
        self.__wrapped__ = fn

    def __repr__(self) -> str:
        return f"<Task {self.name}>"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.bind:
            return self.fn(self, *args, **kwargs)
        return self.fn(*args, **kwargs)

    # --- enqueue -------------------------------------------------------------------------------

    def delay(self, *args: Any, **kwargs: Any) -> AsyncResult:
        """Enqueue with these arguments in a short transaction of pgq's own, committed on return."""
        return self.apply_async(args=args, kwargs=kwargs)

    def apply_async(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        *,
        countdown: float | None = None,
        eta: datetime | None = None,
        priority: int | None = None,
        queue: str | None = None,
        connection: Any = None,
        max_attempts: int | None = None,
        lease_seconds: int | None = None,
        ignore_result: bool | None = None,
        retry_backoff: float | None = None,
    ) -> AsyncResult:
        """Enqueue with options. With ``connection=`` (a psycopg Connection, a SQLAlchemy Connection or
        Session) the job is written in that caller's open transaction and exists only if it commits."""
        spec = self._spec(
            args=() if args is None else args,
            kwargs=kwargs,
            countdown=countdown,
            eta=eta,
            priority=priority,
            queue=queue,
            max_attempts=max_attempts,
            lease_seconds=lease_seconds,
            ignore_result=ignore_result,
            retry_backoff=retry_backoff,
        )
        return self.app._enqueue(spec, connection)

    def _spec(self, **overrides: Any) -> enqueue.JobSpec:
        options = {
            "args": (),
            "kwargs": None,
            "queue": self.queue,
            "priority": self.priority,
            "max_attempts": self.max_attempts,
            "retry_backoff": self.retry_backoff,
            "lease_seconds": self.lease_seconds,
            "ignore_result": self.ignore_result,
        }
        options.update({k: v for k, v in overrides.items() if v is not None})
        return enqueue.build(self.name, **options)

    # --- inside a running task -----------------------------------------------------------------

    @property
    def request(self) -> Request:
        return _current_request.get()

    def retry(self, countdown: float | None = None, exc: BaseException | None = None) -> Retry:
        """End this attempt and schedule another after *countdown* seconds (default: the task's
        backoff). Raises; Celery's ``raise self.retry(...)`` spelling works too. When no attempt is
        left the job fails with *exc* (or a note that a retry was refused)."""
        raise Retry(countdown=countdown, exc=exc)


def run_with_request(request: Request, fn: Callable[[], Any]) -> Any:
    """Call *fn* with *request* as the current task request."""
    token = _current_request.set(request)
    try:
        return fn()
    finally:
        _current_request.reset(token)
