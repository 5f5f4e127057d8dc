"""Global concurrency and rate limits, enforced by the database when jobs are claimed.

Three kinds of limit, each a row of ``pgq.limits``:

- ``queue:<name>``: at most ``concurrency`` jobs of the queue running at once, and/or at most ``rate``
  claims per second (``app.queue("reports", concurrency=2, rate_limit="10/s")``);
- ``task:<name>``: at most ``rate`` claims per second of the task (``@app.task(rate_limit="100/m")``);
- ``key:<key>``: at most ``key_concurrency`` running jobs carrying ``concurrency_key=<key>``. The limit
  travels with each job (a task option, or apply_async's), so keys need no declaration: their rows
  are created by the first claim that needs one, and pruned when unused.

Which path claims a job. A job is ``limited`` when it carries a concurrency key, or when a limit of its
queue or task existed as it was enqueued (the enqueue statement looks it up). The ordinary claim
(``sql.CLAIM``, the hot path) never takes a limited job: its index excludes them. It also skips every
queue that has a ``queue:`` row, so a job that slipped in unmarked while its queue's limit was being
declared waits for :data:`sql.LIMITS_SWEEP` to mark it rather than run past the limit. Limited jobs are
claimed by :func:`claim`, in a short transaction of its own:

1. ``LIMITED_LOCK``: pick the due limited jobs that look claimable (their queue, task and key not at
   their limit) and lock them ``FOR UPDATE SKIP LOCKED``; lock every limits row they depend on (row
   locks, released at commit: nothing of it outlives the transaction, so it works through PgBouncer in
   transaction mode, unlike a session advisory lock). Rows are locked in key order, by every claimer,
   so two claimers never deadlock; a key's row is created on the fly.
2. ``LIMITS_STATE``: a NEW statement, because under READ COMMITTED each statement takes its snapshot
   when it starts. Step 1's snapshot was taken before it waited for the limits rows: the claimer that
   held them may have committed claims that snapshot cannot see, and counting ``running`` rows in it
   would let both claimers fill the same slot. Taken after the locks are held, step 2's snapshot sees
   every claim of every earlier holder, and no claim of these limits can commit until we do. Counts
   can only fall meanwhile (jobs finish without taking the lock), so they never undercount.
3. :func:`admit` (pure Python) picks, in claim order, the jobs every one of their limits has room for.
4. ``LIMITED_TAKE``: mark them running and take their tokens; commit.

Counts come from ``status = 'running'`` rows, never from counters: completion, failure, retry, rescue,
release and cancellation need no change to give a slot back, and nothing can drift.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import psycopg

from . import sql

if TYPE_CHECKING:
    from .app import App

log = logging.getLogger("pgq.worker")

MAX_CONCURRENCY = 2**31 - 1  # the column is an integer
UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_RATE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:/\s*([a-zA-Z]+))?\s*$")


def parse_rate(value: Any, what: str = "rate_limit") -> float:
    """Celery's rate notation in jobs per second: ``"10/s"``, ``"100/m"``, ``"1000/h"``; a bare number
    (``5``, ``"5"``, ``0.5``) is per second. Raises ValueError saying what is wrong."""
    hint = (f"{what} must look like '10/s', '100/m' or '1000/h' (jobs per second, minute or hour), "
            f"or a number of jobs per second; got {value!r}")
    if isinstance(value, bool):
        raise ValueError(hint)
    if isinstance(value, (int, float)):
        number, unit = float(value), "s"
    elif isinstance(value, str):
        match = _RATE.match(value)
        if not match:
            raise ValueError(hint)
        number, unit = float(match.group(1)), (match.group(2) or "s")
        if unit not in UNITS:
            raise ValueError(f"{hint}: unknown unit {unit!r}")
    else:
        raise ValueError(hint)
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"{what} must be more than 0 jobs per unit of time (to stop jobs, stop their workers); "
                         f"got {value!r}")
    return number / UNITS[unit]


def check_concurrency(value: Any, what: str = "concurrency") -> int:
    """*value* if it is an integer from 1 to 2**31-1, else ValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_CONCURRENCY:
        raise ValueError(f"{what} must be an integer >= 1 (to stop jobs, stop their workers), got {value!r}")
    return value


def check_burst(value: Any, what: str = "rate_burst") -> float:
    """The token bucket's capacity: a number >= 1 (1, the default, spaces claims evenly)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 1:
        raise ValueError(f"{what} must be a number >= 1 (how many claims may come at once after a quiet spell), "
                         f"got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Limit:
    """One declared limit: a row of ``pgq.limits`` as the app says it should be."""

    key: str  # 'queue:<name>' or 'task:<name>'
    concurrency: int | None = None
    rate: float | None = None  # claims per second
    burst: float = 1.0

    def describe(self) -> str:
        parts = []
        if self.concurrency is not None:
            parts.append(f"concurrency={self.concurrency}")
        if self.rate is not None:
            parts.append(f"rate={_rate_text(self.rate)} burst={self.burst:g}")
        return f"{self.key} " + " ".join(parts)


def queue_limit(name: Any, concurrency: Any = None, rate_limit: Any = None, rate_burst: Any = None) -> Limit:
    """Validate ``app.queue(name, …)``; raise ValueError naming the queue and the problem."""
    from .enqueue import QUEUE_NAME

    if not isinstance(name, str) or not QUEUE_NAME.match(name):
        raise ValueError(f"queue name {name!r} must be 1-100 characters of letters, digits, '_', '.', ':' or '-'")
    try:
        if concurrency is None and rate_limit is None:
            raise ValueError("give concurrency=, rate_limit= or both")
        if rate_burst is not None and rate_limit is None:
            raise ValueError("rate_burst needs rate_limit=")
        return Limit(
            key=f"queue:{name}",
            concurrency=None if concurrency is None else check_concurrency(concurrency),
            rate=None if rate_limit is None else parse_rate(rate_limit),
            burst=1.0 if rate_burst is None else check_burst(rate_burst),
        )
    except ValueError as exc:
        raise ValueError(f"queue {name!r}: {exc}") from None


def task_limit(name: str, rate_limit: Any, rate_burst: Any = None) -> Limit | None:
    """The limit a task's options declare (None without rate_limit); ValueError on bad options."""
    if rate_limit is None:
        if rate_burst is not None:
            raise ValueError(f"task {name}: rate_burst needs rate_limit=")
        return None
    try:
        return Limit(key=f"task:{name}", rate=parse_rate(rate_limit),
                     burst=1.0 if rate_burst is None else check_burst(rate_burst))
    except ValueError as exc:
        raise ValueError(f"task {name}: {exc}") from None


def rate_keys(app: App, queues: Iterable[str]) -> list[str]:
    """The rate limits a worker of *queues* wakes up for when their next token is due: its queues' and
    its app's tasks' (the rows that exist and have a rate count)."""
    keys = {f"queue:{q}" for q in queues}
    keys.update(task.limit.key for task in app.tasks.values() if task.limit is not None and task.limit.rate)
    return sorted(keys)


def declared(app: App) -> list[Limit]:
    """Every limit *app* declares (its queues', its tasks'), by key."""
    out = {limit.key: limit for limit in app.queues.values()}
    for task in app.tasks.values():
        if task.limit is not None:
            out[task.limit.key] = task.limit
    return [out[key] for key in sorted(out)]


def declare(conn: psycopg.Connection, limits: Sequence[Limit]) -> list[str]:
    """Write *limits* to ``pgq.limits`` (rows whose values are unchanged are left alone) and mark the
    jobs already waiting in a queue or of a task whose limit is new. One transaction, so the limit and
    the marks become visible together. Returns the keys written."""
    if not limits:
        return []
    limits = sorted(limits, key=lambda lim: lim.key)  # the order every claimer locks rows in
    with conn.transaction():
        rows = conn.execute(sql.LIMITS_DECLARE, {
            "keys": [lim.key for lim in limits],
            "concurrency": [lim.concurrency for lim in limits],
            "rate": [lim.rate for lim in limits],
            "burst": [lim.burst for lim in limits],
        }).fetchall()
        written = [row[0] for row in rows]
        queues = [key.removeprefix("queue:") for key in written if key.startswith("queue:")]
        tasks = [key.removeprefix("task:") for key in written if key.startswith("task:")]
        marked = 0
        if queues:
            marked += conn.execute(sql.LIMITS_MARK_QUEUES, {"queues": queues}).rowcount
        if tasks:
            marked += conn.execute(sql.LIMITS_MARK_TASKS, {"tasks": tasks}).rowcount
    by_key = {lim.key: lim for lim in limits}
    for key in written:
        log.info("limit declared: %s", by_key[key].describe())
    if marked:
        log.info("%d waiting job(s) now go through the limited claim", marked)
    return written


# --- claiming -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """A due limited job, locked by the claim's first statement."""

    id: int
    queue: str
    task_name: str
    concurrency_key: str | None
    key_concurrency: int | None


@dataclass
class State:
    """A locked limits row, as the claim's second statement saw it."""

    key: str
    concurrency: int | None  # queues only; a key's limit comes with each job
    running: int  # jobs running under it (0 when nothing counts them)
    rate: float | None
    tokens: float | None  # available now, refill included
    taken: int = 0  # admitted by this claim so far

    def room_for(self, job: Candidate) -> bool:
        if self.key.startswith("key:"):
            return self.running + self.taken < (job.key_concurrency or 1)
        if self.concurrency is not None and self.running + self.taken >= self.concurrency:
            return False
        return self.tokens is None or self.tokens - self.taken >= 1.0

    def wait_for_token(self) -> float | None:
        """Seconds until the next token, if a missing token is what stops this limit."""
        if self.rate is None or self.tokens is None or self.tokens - self.taken >= 1.0:
            return None
        if self.concurrency is not None and self.running + self.taken >= self.concurrency:
            return None  # full anyway: a finished job, not time, frees it
        return (1.0 - (self.tokens - self.taken)) / self.rate


@dataclass
class Admission:
    ids: list[int] = field(default_factory=list)
    taken: dict[str, int] = field(default_factory=dict)  # tokens per rate-limited key
    retry_in: float | None = None  # a job waits only for a token: try again this many seconds from now
    more: bool = False  # a job was held back by a limit this admission filled: look behind it again


def keys_of(job: Candidate) -> list[str]:
    """The limits rows *job* may depend on (the rows that exist are the limits that apply)."""
    keys = [f"queue:{job.queue}", f"task:{job.task_name}"]
    if job.concurrency_key is not None:
        keys.append(f"key:{job.concurrency_key}")
    return keys


def admit(candidates: Iterable[Candidate], states: dict[str, State], limit: int) -> Admission:
    """Greedy, in claim order: take a job when every limit over it has room, up to *limit* jobs.

    A limit with no row applies nothing, except a key's, whose row must be locked (its count needs
    the lock): a keyed job whose row is missing waits for the next claim."""
    out = Admission()
    waits: list[float] = []
    for job in candidates:
        if len(out.ids) >= limit:
            break
        if job.concurrency_key is not None and f"key:{job.concurrency_key}" not in states:
            continue
        over = [states[key] for key in keys_of(job) if key in states]
        blocking = [s for s in over if not s.room_for(job)]
        if blocking:
            out.more = out.more or any(s.taken for s in blocking)
            token_waits = [s.wait_for_token() for s in blocking]
            if all(w is not None for w in token_waits):  # only tokens missing: time will let it in
                waits.append(max(w for w in token_waits if w is not None))
            continue
        out.ids.append(job.id)
        for state in over:
            state.taken += 1
            if state.rate is not None:
                out.taken[state.key] = out.taken.get(state.key, 0) + 1
    out.retry_in = min(waits, default=None)
    return out


def claim(conn: psycopg.Connection, queues: Sequence[str], limit: int, worker_id: str,
          rate_keys: Sequence[str] = ()) -> tuple[list[tuple], float | None, bool]:
    """Claim up to *limit* limited jobs of *queues*: returns the claimed rows (as sql.CLAIM returns
    them), seconds until a token would let a waiting job in (or None), and whether a claim right away
    may find more (this one's own picks filled a limit that held back jobs of its window: jobs of other
    keys may wait behind them). *rate_keys*: rate limits whose next token is worth waking for even when
    the jobs they hold back were not candidates (the worker's queues and its app's tasks)."""
    with conn.transaction():
        rows = conn.execute(sql.LIMITED_LOCK, {"queues": list(queues), "limit": limit,
                                               "rate_keys": list(rate_keys)}).fetchall()
        token_wait = rows[0][6] if rows else None
        if not rows or rows[0][0] is None:
            return [], token_wait, False
        locked = rows[0][5] or []
        candidates = [Candidate(*row[:5]) for row in rows]
        states = {
            key: State(key, concurrency, int(running or 0), rate, tokens)
            for key, concurrency, running, rate, tokens in conn.execute(sql.LIMITS_STATE, {"keys": locked})
        }
        admission = admit(candidates, states, limit)
        if token_wait is not None:
            admission.retry_in = min(token_wait, admission.retry_in or token_wait)
        if not admission.ids:
            return [], admission.retry_in, False
        taken = sorted(admission.taken.items())
        claimed = conn.execute(sql.LIMITED_TAKE, {
            "ids": admission.ids, "worker_id": worker_id,
            "keys": [key for key, _ in taken], "taken": [n for _, n in taken],
        }).fetchall()
    return claimed, admission.retry_in, admission.more


def _rate_text(rate: float) -> str:
    for unit, seconds in (("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        per = rate * seconds
        if per >= 1 and abs(per - round(per)) < 1e-9:
            return f"{round(per)}/{unit}"
    return f"{rate:g}/s"
