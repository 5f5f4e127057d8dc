"""Tasks: a function registered under a name, with its defaults, that can be called now or enqueued."""

from __future__ import annotations

import contextvars
import functools
import hashlib
import inspect
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from . import enqueue, limits, retry
from .errors import EnqueueError, Retry

if TYPE_CHECKING:
    from .app import App
    from .result import AsyncResult


class CancelFlag:
    """What a running task's ``is_cancelled()`` reads. Set once and never waited on, so a plain attribute:
    a threading.Event per claimed job (a Condition and a lock each) was 9 % of the worker's CPU on a
    no-op drain (py-spy --gil)."""

    __slots__ = ("_set",)

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set


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
    cancel_event: CancelFlag | None = field(default=None, repr=False, compare=False)  # see is_cancelled
    # The fencing token of this attempt's claim (pgq.jobs.claim_token): new with every claim, even where a
    # database crash made an attempt number repeat. A task can fence its own writes with it (docs/guarantees.md).
    claim_token: int | None = None

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
        unique: bool = False,
        unique_key: str | Callable[..., str] | None = None,
        unique_for: timedelta | float | None = None,
        retry_on: Mapping[Any, retry.Backoff] | None = None,
        discard_on: Iterable[type[BaseException]] | type[BaseException] = (),
        autoretry_for: Iterable[type[BaseException]] | type[BaseException] | None = None,
        concurrency_key: str | Callable[..., str | None] | None = None,
        key_concurrency: int | None = None,
        rate_limit: str | float | None = None,
        rate_burst: float | None = None,
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
        if unique and unique_key is not None:
            raise ValueError(f"task {name}: give unique=True or unique_key=, not both")
        if unique_key is not None and not callable(unique_key) and not isinstance(unique_key, str):
            raise ValueError(f"task {name}: unique_key must be a string or a function of the task's arguments, "
                             f"got {unique_key!r}")
        if unique_for is not None and not unique and unique_key is None:
            raise ValueError(f"task {name}: unique_for needs unique=True or unique_key=")
        try:
            self.unique_for = enqueue.unique_for_seconds(unique_for)
        except ValueError as exc:
            raise ValueError(f"task {name}: {exc}") from None
        self.unique = bool(unique)
        self.unique_key = unique_key
        self.retry_policy = retry.RetryPolicy(retry_on, discard_on, autoretry_for, owner=f"task {name}")
        # Limits (see pgq.limits and docs/limits.md).
        if concurrency_key is not None and not callable(concurrency_key) and not isinstance(concurrency_key, str):
            raise ValueError(f"task {name}: concurrency_key must be a string or a function of the task's "
                             f"arguments, got {concurrency_key!r}")
        if key_concurrency is not None:
            if concurrency_key is None:
                raise ValueError(f"task {name}: key_concurrency needs concurrency_key= (a string, or a function of "
                                 "the task's arguments), or pass concurrency_key= when enqueueing")
            try:
                limits.check_concurrency(key_concurrency, "key_concurrency")
            except ValueError as exc:
                raise ValueError(f"task {name}: {exc}") from None
        self.concurrency_key = concurrency_key
        self.key_concurrency = key_concurrency
        self.limit = limits.task_limit(name, rate_limit, rate_burst)  # its rate limit, if any
        # Refuse bad defaults when the module is imported, not at the first enqueue.
        self._spec(unique_key=unique_key if isinstance(unique_key, str) else None)
        self.__doc__ = fn.__doc__
        self.__name__ = getattr(fn, "__name__", name)
        self.__module__ = getattr(fn, "__module__", None)  # type: ignore[assignment]
        self.__wrapped__ = fn

    def __repr__(self) -> str:
        return f"<Task {self.name}>"

    @functools.cached_property
    def call_signature(self) -> inspect.Signature:
        """The function's signature, computed once: the worker checks every job's arguments against it
        (recomputing it per job cost 7 % of a no-op drain's worker CPU)."""
        return inspect.signature(self.fn)

    @functools.cached_property
    def bind_problems(self) -> dict[tuple[int, tuple[str, ...]], str | None]:
        """Per shape of arguments (their number, their keyword names): why they do not fit the function,
        or None (see pgq.executor._bind_call)."""
        return {}

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
        unique_key: str | None = None,
        unique_for: timedelta | float | None = None,
        concurrency_key: str | None = None,
        key_concurrency: int | None = None,
    ) -> AsyncResult:
        """Enqueue with options. With ``connection=`` (a psycopg Connection, a SQLAlchemy Connection or
        Session) the job is written in that caller's open transaction and exists only if it commits.

        With a unique key (``unique_key=``, or the task's ``unique``/``unique_key`` default), enqueueing
        while a job with that key is waiting or running returns that job's handle instead (its
        ``deduplicated`` is True); ``unique_for`` (a timedelta or seconds) also returns a job with that key
        that finished (succeeded or failed) that recently. See docs/job-control.md.

        ``concurrency_key`` (default: the task's) with ``key_concurrency`` (default: the task's, else 1): at
        most that many jobs with this key run at once, across all workers. See docs/limits.md."""
        args = () if args is None else args
        options = (countdown, eta, priority, queue, max_attempts, lease_seconds, ignore_result, retry_backoff,
                   unique_key, unique_for, concurrency_key, key_concurrency)
        if options.count(None) == len(options) and self._plain():
            return self.app._enqueue(enqueue.with_arguments(self._default_spec(), args, kwargs), connection)
        spec = self._spec(
            args=args,
            kwargs=kwargs,
            countdown=countdown,
            eta=eta,
            priority=priority,
            queue=queue,
            max_attempts=max_attempts,
            lease_seconds=lease_seconds,
            ignore_result=ignore_result,
            retry_backoff=retry_backoff,
            unique_key=unique_key if unique_key is not None else self.unique_key_for(args, kwargs),
            unique_for=unique_for if unique_for is not None else self.unique_for,
            concurrency_key=concurrency_key if concurrency_key is not None else self.concurrency_key_for(args, kwargs),
            key_concurrency=key_concurrency,
        )
        return self.app._enqueue(spec, connection)

    def concurrency_key_for(self, args: Sequence[Any], kwargs: Mapping[str, Any] | None) -> str | None:
        """The concurrency key a job of this task gets from these arguments by default (None: no key)."""
        if callable(self.concurrency_key):
            try:
                return self.concurrency_key(*args, **(kwargs or {}))
            except Exception as exc:
                raise EnqueueError(f"cannot enqueue {self.name}: its concurrency_key function raised "
                                   f"{type(exc).__name__}: {exc}") from exc
        return self.concurrency_key

    def unique_key_for(self, args: Sequence[Any], kwargs: Mapping[str, Any] | None) -> str | None:
        """The unique key a job of this task gets from these arguments by default (None: not unique).

        ``unique=True``: the task name and a SHA-256 of the JSON of ``[args, kwargs]`` (keys sorted), so
        ``f(1, y=2)`` twice is one job, while ``f(1, 2)`` is another key than ``f(1, y=2)``.
        ``unique_key=function``: what it returns for the call's arguments. ``unique_key="text"``: that.
        """
        if callable(self.unique_key):
            try:
                return self.unique_key(*args, **(kwargs or {}))
            except Exception as exc:
                raise EnqueueError(f"cannot enqueue {self.name}: its unique_key function raised "
                                   f"{type(exc).__name__}: {exc}") from exc
        if isinstance(self.unique_key, str):
            return self.unique_key
        if not self.unique:
            return None
        try:
            text = json.dumps([list(args), dict(kwargs or {})], sort_keys=True, separators=(",", ":"),
                              ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError):
            return None  # build() refuses these arguments, with the message that names the culprit
        return f"{self.name}:{hashlib.sha256(text.encode('utf-8', 'surrogatepass')).hexdigest()}"

    def _plain(self) -> bool:
        """Whether a call without options can take _default_spec(): no unique key (its jobs go through the
        unique write), no concurrency key computed from the arguments."""
        return not self.unique and self.unique_key is None and not callable(self.concurrency_key)

    def _default_spec(self) -> enqueue.JobSpec:
        """The spec of a call without options (no arguments yet), built once per set of the task's defaults
        (they are plain attributes, which code may change after registration)."""
        key = (self.queue, self.priority, self.max_attempts, self.retry_backoff, self.lease_seconds,
               self.ignore_result, self.concurrency_key, self.key_concurrency)
        cached = self.__dict__.get("_default")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_default"] = (key, self._spec())
        return cached[1]

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
        if isinstance(self.concurrency_key, str):
            options["concurrency_key"] = self.concurrency_key
        options.update({k: v for k, v in overrides.items() if v is not None})
        if options.get("concurrency_key") is not None and options.get("key_concurrency") is None \
                and self.key_concurrency is not None:
            options["key_concurrency"] = self.key_concurrency
        return enqueue.build(self.name, **options)

    def s(self, *args: Any, **kwargs: Any) -> Signature:
        """A job description to enqueue later, e.g. in bulk: ``app.enqueue_many(add.s(i, i) for i in …)``."""
        return Signature(self, args, kwargs)

    def signature(self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None,
                  **options: Any) -> Signature:
        """Celery's spelling of :meth:`s`, with apply_async's options (queue, priority, countdown, …)."""
        return Signature(self, tuple(args), dict(kwargs or {}), options)

    # --- inside a running task -----------------------------------------------------------------

    @property
    def request(self) -> Request:
        return _current_request.get()

    def is_cancelled(self) -> bool:
        """Inside a running task: True once its job's cancellation has reached this worker (on the worker's
        next heartbeat after ``cancel()``). The worker also interrupts the task with
        :class:`pgq.CancelRequested` then; check this where that cannot reach (between blocking calls),
        or in ``finally`` to tell a cancellation apart. False outside a worker."""
        event = _current_request.get().cancel_event
        return event is not None and event.is_set()

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


@dataclass(frozen=True)
class Signature:
    """One job to enqueue: a task, its arguments, and apply_async's options. The seam for workflows
    (chain, group, chord) to come; today ``app.enqueue_many`` takes a list of them."""

    task: Task
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)

    def set(self, **options: Any) -> Signature:
        """The same job with these options added (queue=, priority=, countdown=, …)."""
        return Signature(self.task, self.args, self.kwargs, {**self.options, **options})

    def apply_async(self, **options: Any) -> AsyncResult:
        return self.task.apply_async(args=self.args, kwargs=dict(self.kwargs), **{**self.options, **options})

    def delay(self) -> AsyncResult:
        return self.apply_async()
