"""The worker: claims due jobs, runs them on a pool, records outcomes, keeps its leases alive.

Threads, and what each owns:
- the main loop claims jobs into free slots and sleeps until woken (NOTIFY, a freed slot, or the poll
  interval for jobs whose run_at arrives and for notifications lost in an outage);
- the listener holds the LISTEN connection and wakes the main loop;
- the runners (``concurrency`` of them; none with ``pool="solo"``, where the main loop runs the job)
  execute tasks — no transaction is open while user code runs;
- the recorder writes outcomes, many successes in one fenced statement;
- the keeper heartbeats: extends the leases of running jobs, refreshes the worker row, and rescues
  jobs whose lease expired anywhere (see :mod:`pgq.maintenance`);
- the watchdog needs no database: it ends attempts at their timeout, and stops the tasks whose lease ran
  out by the worker's own clock while the keeper could not reach the database (see expire_leases);
- the pruner asks for the pruning round once a minute and, when it gets it, deletes finished jobs past
  their retention in short batches (see :mod:`pgq.pruner`). Its own thread: a round over a large backlog
  takes seconds, which the keeper's heartbeats cannot wait for.

Every thread survives a lost database: it logs, backs off, reconnects, and carries on.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import queue as queue_mod
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg.types.json import set_json_loads

from . import db, executor, limits, maintenance, migrate, pruner, sql
from .errors import CancelRequested, DatabaseUnavailable, LeaseLost, TaskTimeout
from .executor import ClaimedJob, RetryLater, Succeeded
from .metrics import worker_metrics
from .recorder import Recorder
from .tasks import CancelFlag

if TYPE_CHECKING:
    from .app import App

log = logging.getLogger("pgq.worker")

NOTIFY_CHANNEL = "pgq_jobs"


def _claimed_json(data: bytes) -> Any:
    """json.loads for the args and kwargs a claim returns, with the empty ones (many tasks take no
    arguments, or no keyword arguments) answered without a parse."""
    if data == b"[]":
        return []
    if data == b"{}":
        return {}
    return json.loads(data)


class _Ready(queue_mod.Queue):
    """The jobs claimed for the runners, first in first out, except limited jobs, which go first: a
    limited job holds one of its limit's slots from its claim, so it must not wait behind prefetched
    jobs."""

    def put_front(self, item: ClaimedJob) -> None:
        with self.not_full:
            self.queue.appendleft(item)
            self.unfinished_tasks += 1
            self.not_empty.notify()

    def put_many(self, items: list[ClaimedJob]) -> None:
        """A claimed batch under one lock. It wakes one runner; each runner that takes a job while more
        wait wakes the next (see get). Waking a runner per job at once had them all fight for this
        queue's lock and the GIL: a third of the worker's CPU on a no-op drain (py-spy --gil)."""
        with self.not_full:
            self.queue.extend(items)
            self.unfinished_tasks += len(items)
            self.not_empty.notify()

    def get(self, block: bool = True, timeout: float | None = None) -> ClaimedJob | None:
        with self.not_empty:
            while not self.queue:
                if not block:
                    raise queue_mod.Empty
                if not self.not_empty.wait(timeout):
                    raise queue_mod.Empty
            item = self.queue.popleft()
            if self.queue:
                self.not_empty.notify()
            return item


@dataclass(slots=True)
class _Held:
    """A job this worker claimed and has not yet recorded the outcome of."""

    job: ClaimedJob
    started: float | None = None  # monotonic time the task began, None while waiting for a runner
    thread_id: int | None = None  # the thread running it
    timeout: float | None = None  # seconds it may run
    timed_out: bool = False  # its timeout outcome is recorded; whatever the thread returns is discarded
    cancelled: bool = False  # its cancellation is recorded; likewise
    finished: bool = False  # the task returned: too late to time out or cancel, its own outcome stands
    # Monotonic time by which the lease has run out in the database, for sure: when the statement that set
    # it (the claim, the last heartbeat that renewed it) was sent, plus the lease. See expire_leases.
    lease_until: float = float("inf")
    cancel_event: CancelFlag = field(default_factory=CancelFlag)  # the task's is_cancelled()


class Worker:
    """Runs the tasks of *app* from *queues*.

    Settings (each is also a ``pgq worker`` flag with a ``PGQ_*`` environment twin):

    - ``concurrency``: jobs run at once (threads). Too low leaves the CPU or I/O idle; too high holds
      more leases than the worker can heartbeat promptly and, for CPU-bound tasks, gains nothing
      under the GIL. Default: the CPU count.
    - ``prefetch``: jobs claimed ahead of free runners, so a runner that finishes finds its next job
      waiting instead of waiting for a claim round trip. Too low idles runners between claims on short
      jobs; too high holds leases on jobs that wait here while other workers sit idle. Default: adaptive,
      about 20 ms of work per runner from the moving average of job run times (1x to 128x the
      concurrency, at most 1,024 jobs beyond it; 0 with ``pool="solo"``). Prefetched jobs are handed
      back at once on shutdown.
    - ``poll_interval``: seconds between polls when no NOTIFY arrives. It bounds how late a job with a
      future ``run_at`` (eta, countdown, retry backoff) starts. Too low costs a query per interval per
      worker; too high delays scheduled jobs, and all jobs when ``listen`` is off. Default 1 s.
    - ``shutdown_grace``: seconds running jobs get to finish after SIGTERM. Jobs still running then are
      handed back as a failed attempt. Too low interrupts long jobs on every deploy; too high makes
      deploys slow. Default 30 s.
    - ``listen``: wake on NOTIFY. Off behind PgBouncer in transaction mode, which cannot LISTEN.
    - ``task_timeout``: seconds a job may run when its task sets no ``timeout`` of its own (None: no
      limit). See :meth:`enforce_timeouts` for what can and cannot be interrupted.
    - ``rescue_interval``: seconds between sweeps for jobs whose lease expired on a dead worker. Lost
      jobs restart after their lease plus up to this much. Default 5 s.
    - ``retention``: how long finished jobs and their results are kept, per state, e.g.
      ``{"succeeded": timedelta(hours=6), "failed": None}`` (None: forever); states not given keep
      :data:`pgq.pruner.DEFAULT_RETENTION` (succeeded 1 day, cancelled 7 days, failed 30 days).
    - ``prune_interval``: seconds between pruning rounds; each round one worker, whichever asks first,
      prunes. None (or 0) turns pruning off in this worker. Default 60 s.
    - ``non_durable_claims``: commit claims without waiting for the disk (``synchronous_commit = off`` on
      the claim connection). A job then starts one disk flush sooner (wake-up p50 0.4-0.5 ms lower on
      this project's virtual disk; benchmarks/README.md), but a database crash can undo a claim made in the last
      moments before it (up to 3 x ``wal_writer_delay``, 600 ms by default), and another worker may run
      the job while this one still does, for up to one heartbeat (a third of the lease), until this
      worker learns of it and interrupts the task. Off by default. No effect with prepared statements
      off (``--no-prepare``), where pgq sets no session setting.
    """

    def __init__(
        self,
        app: App,
        *,
        queues: Iterable[str] | str = ("default",),
        concurrency: int | None = None,
        pool: str = "threads",
        poll_interval: float = 1.0,
        shutdown_grace: float = 30.0,
        listen: bool = True,
        rescue_interval: float = 5.0,
        task_timeout: float | None = None,
        prefetch: int | None = None,
        worker_id: str | None = None,
        retention: Any = None,
        prune_interval: float | None = pruner.INTERVAL,
        metrics: tuple[str, int] | None = None,
        non_durable_claims: bool = False,
    ):
        if isinstance(queues, str):
            queues = [q.strip() for q in queues.split(",") if q.strip()]
        self.queues = list(dict.fromkeys(queues)) or ["default"]
        if pool not in ("threads", "solo"):
            raise ValueError(f"pool must be 'threads' or 'solo', got {pool!r}")
        self.pool = pool
        self.concurrency = 1 if pool == "solo" else max(1, concurrency or os.cpu_count() or 1)
        # None: adapt to how long jobs take (see _prefetch_now); a number: fixed.
        self.prefetch = 0 if pool == "solo" else (None if prefetch is None else max(0, prefetch))
        self._job_seconds = 0.05  # moving average of task run time, seeded as "not short"
        self.poll_interval = poll_interval
        self.shutdown_grace = shutdown_grace
        self.listen = listen
        self.rescue_interval = rescue_interval
        self.task_timeout = task_timeout or None
        self.non_durable_claims = non_durable_claims
        self.app = app
        self.id = worker_id or f"{db.hostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

        self._held: dict[int, _Held] = {}
        # How many of them have not returned from their task (busy_count), kept as entries are added,
        # finish and are removed: counting on every freed slot walked the whole held set, up to 2x the
        # capacity (runners and prefetch). Changed only under _held_lock.
        self._unfinished = 0
        self._held_lock = threading.Lock()
        self.outcome_lock = threading.Lock()  # recorder's commit+forget vs keeper's heartbeat
        self._ready: _Ready = _Ready()
        self._wake = threading.Event()
        self._stopping = threading.Event()  # stop claiming
        self._hurry = threading.Event()  # second signal: stop waiting for running jobs
        self._watch_stop = threading.Event()
        self._watch_poke = threading.Event()  # a job with an earlier lease end or deadline than planned
        self._watch_next = 0.0  # monotonic time the watchdog plans to look next
        self._threads: list[threading.Thread] = []
        self._runners: list[threading.Thread] = []
        self._claim_conn: psycopg.Connection | None = None
        self._next_due: float | None = None  # monotonic time a retry this worker scheduled falls due
        # The limited claim (see _claim_limited) runs when one of these says so: an event that may have
        # freed a slot or brought a job (NOTIFY, a limited job of ours recorded), or its next planned
        # time (the poll interval, or when a token is due); not on every freed runner like the ordinary one.
        self._limited_due = threading.Event()
        self._limited_due.set()
        self._limited_next = 0.0  # monotonic
        self._limited_waiting = True  # limited jobs were due at the last look: skip the cheap probe
        self._rate_keys: list[str] = []  # see limits.rate_keys
        self.keeper = maintenance.Keeper(self)
        self.recorder = Recorder(self)
        self.pruner: pruner.Pruner | None = pruner.Pruner(app, keep=retention, interval=prune_interval,
                                                          owner=self.id) if prune_interval else None
        if self.pruner is not None and not self.pruner.enabled:
            self.pruner = None  # every state kept forever
        # Runner threads replaced after their job's timeout, cancellation or lost claim, until they exit.
        self._retired: set[int] = set()
        self.metrics_address = metrics  # (host, port) to serve Prometheus metrics on, or None
        self.metrics = worker_metrics(self)  # hooks; no-ops (and no prometheus_client) without an address

    # --- lifecycle -----------------------------------------------------------------------------

    def run(self, *, install_signals: bool = True) -> None:
        """Run until stop() or SIGTERM/SIGINT, then shut down gracefully."""
        url = self.app.database_url
        with db.connect(url, role="worker", autocommit=True) as conn:
            migrate.check(conn)
            limits.declare(conn, limits.declared(self.app))
        self._rate_keys = limits.rate_keys(self.app, self.queues)
        if install_signals and threading.current_thread() is threading.main_thread():
            self._install_signals()
        log.info("worker %s started: queues=%s concurrency=%d pool=%s listen=%s",
                 self.id, ",".join(self.queues), self.concurrency, self.pool, self.listen)
        if self.non_durable_claims:
            if db.prepare_threshold() is None:
                log.warning("--non-durable-claims has no effect with prepared statements off (--no-prepare): "
                            "claims wait for the disk as the server is configured to")
            else:
                log.warning("claims do not wait for the disk (--non-durable-claims): a database crash can undo "
                            "the last moments' claims, and their jobs may run twice at once for up to a third "
                            "of their lease")
        self.metrics.start()
        self._start_threads()
        try:
            self._claim_loop()
        finally:
            self._shutdown()
            self.metrics.stop()

    @contextmanager
    def running(self) -> Iterator[Worker]:
        """Run in a background thread for the duration of a ``with`` block (examples, tests)."""
        errors: list[BaseException] = []

        def target() -> None:
            try:
                self.run(install_signals=False)
            except BaseException as exc:  # surfaced to the caller below
                errors.append(exc)

        thread = threading.Thread(target=target, name="pgq-worker", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.stop()
            thread.join()
        if errors:
            raise errors[0]

    def stop(self, *, hurry: bool = False) -> None:
        """Stop claiming and shut down; running jobs get ``shutdown_grace`` seconds unless *hurry*."""
        self._stopping.set()
        if hurry:
            self._hurry.set()
        self._wake.set()

    def _install_signals(self) -> None:
        def handler(signum: int, frame: Any) -> None:
            if self._stopping.is_set():
                log.warning("second %s: not waiting for running jobs any longer", signal.Signals(signum).name)
                self.stop(hurry=True)
            else:
                log.info("%s received: finishing running jobs (up to %.0f s), claiming no more",
                         signal.Signals(signum).name, self.shutdown_grace)
                self.stop()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def _start_threads(self) -> None:
        specs: list[tuple[str, Callable[[], None]]] = [("pgq-recorder", self.recorder.loop),
                                                       ("pgq-keeper", self.keeper.loop),
                                                       ("pgq-watchdog", self._watch_loop)]
        if self.listen:
            specs.append(("pgq-listener", self._listen_loop))
        if self.pruner is not None:
            specs.append(("pgq-pruner", self.pruner.loop))
        for name, target in specs:
            self._threads.append(threading.Thread(target=target, name=name, daemon=True))
        for thread in self._threads:
            thread.start()
        if self.pool == "threads":
            for _ in range(self.concurrency):
                self._add_runner()

    def _add_runner(self) -> None:
        thread = threading.Thread(target=self._runner_loop, name=f"pgq-runner-{len(self._runners)}", daemon=True)
        self._runners.append(thread)
        thread.start()

    # --- claiming ------------------------------------------------------------------------------

    def _claim_loop(self) -> None:
        backoff = db.Reconnect()
        while not self._stopping.is_set():
            self._wake.clear()
            # Slots free up when a task returns, not when its outcome is recorded: the recorder's round
            # trip overlaps the next claim instead of idling the runners (on no-op jobs, claiming only
            # after recording gave one claim and one outcome batch per 8 jobs, and idle runners).
            capacity, free = self._room()
            claimed: list[ClaimedJob] = []
            full = False  # a claim got all it asked for: there may be more due jobs
            if self._worth_claiming(capacity, free):
                try:
                    if self._limited_wanted():
                        # Limited jobs first, for idle runners only (one at least, or a worker busy with
                        # unlimited work would never take any): each holds a slot of its limit until it ends.
                        idle = self.concurrency - self.busy_count()
                        claimed = self._claim_limited(min(free, max(1, idle)))
                    full = len(claimed) == free
                    if free > len(claimed):
                        asked = min(free - len(claimed), self.MAX_CLAIM)
                        ordinary = self._claim(asked)
                        claimed += ordinary
                        full = len(ordinary) == asked
                    backoff.reset()
                except (psycopg.OperationalError, DatabaseUnavailable) as exc:
                    self._drop_claim_conn()
                    backoff.wait(self._stopping, "claim", exc)
                    continue
                except psycopg.Error as exc:  # not an outage (a missing grant…): loud, but the worker lives on
                    self._drop_claim_conn()
                    backoff.failed(self._stopping, "claim", exc)
                    continue
                self._dispatch(claimed)
            if full:
                continue  # there may be more due jobs; claim again as slots free
            self._wake.wait(self._sleep_time())

    def _sleep_time(self) -> float:
        """Until the next poll, or sooner when a retry this worker scheduled falls due before it, or the
        limited claim's next look (a token a limited job waits for; once past, a freed slot wakes us)."""
        sleep = self.poll_interval
        limited_in = self._limited_next - time.monotonic()
        if self._limited_waiting and limited_in > 0:
            sleep = min(sleep, limited_in)
        due = self._next_due
        if due is None:
            return sleep
        # 5 ms past the due time, so the database's now() has passed run_at when we claim.
        remaining = due + 0.005 - time.monotonic()
        if remaining <= 0:
            self._next_due = None  # the claim just made came after it: the retry was claimable
            return 0.0
        return min(sleep, remaining)

    def _due_in(self, delay: float) -> None:
        due = time.monotonic() + delay
        if self._next_due is None or due < self._next_due:
            self._next_due = due

    def _claim_connection(self) -> psycopg.Connection:
        if self._claim_conn is None or self._claim_conn.closed:
            # A claim commits like every other write: it waits for the disk as the server is configured to
            # (synchronous_commit, on by default), so once a worker starts a job, a database crash cannot
            # undo its claim. It used not to wait (synchronous_commit = off here): a claim lost in
            # a crash put its job back under the same attempt number, and the next claim's worker and
            # this one ran it side by side, each passing the other's fence. The claim token (sql.CLAIM_TOKEN)
            # now fences such a claim off wherever commits do not wait for the disk (non_durable_claims, or
            # the server's own setting), and its worker stops the task at its next heartbeat (_lose).
            # Waiting costs one disk flush per claim: wake-up p50 1.45 against 0.96 ms without it on the embedded
            # server, 1.76 against 1.32 on Debian's 15 (benchmarks/README.md, 2026-12-08).
            #
            # The claims are planned once per connection (generic plans, as on every worker connection:
            # db.GENERIC_PLAN_ROLES), not once per claim. Left to itself PostgreSQL kept planning CLAIM
            # afresh on every execution (pg_prepared_statements: 266 custom plans, 0 generic, in a
            # 6,000-job drain): a custom plan, which sees one queue in the array, is estimated cheaper
            # than the generic one, which assumes ten. The plans are the same (index scans; sequential
            # scans are off on this connection, see db.INDEX_ONLY_ROLES), and the planning cost about
            # 0.3 ms of server CPU per claim: a claim that finds nothing took 0.42 ms hot and 1.03 ms
            # after 5 ms idle, 0.09 and 0.50 ms planned once (same loop).
            settings = {"synchronous_commit": "off"} if self.non_durable_claims else None
            self._claim_conn = db.connect(self.app.database_url, role="worker", autocommit=True,
                                          settings=settings)
            set_json_loads(_claimed_json, self._claim_conn)
        return self._claim_conn

    def _claim(self, limit: int) -> list[ClaimedJob]:
        conn = self._claim_connection()
        sent = time.monotonic()
        rows = conn.execute(sql.CLAIM, {"queues": self.queues, "limit": limit, "worker_id": self.id}).fetchall()
        return self._hold([ClaimedJob(*row) for row in rows], sent)

    def _limited_wanted(self) -> bool:
        if self._limited_due.is_set():
            self._limited_due.clear()
            return True
        return time.monotonic() >= self._limited_next

    def _claim_limited(self, limit: int) -> list[ClaimedJob]:
        """Claim up to *limit* jobs under limits (see :mod:`pgq.limits`). When none was due at the last
        look, a one-statement probe comes first, so that workers without limited work pay one index
        probe per poll interval or NOTIFY, not a transaction."""
        conn = self._claim_connection()
        sent = time.monotonic()
        self._limited_next = sent + self.poll_interval
        if not self._limited_waiting:
            if not conn.execute(sql.LIMITED_DUE, {"queues": self.queues}).fetchone()[0]:
                return []
            self._limited_waiting = True
        rows, retry_in, more = limits.claim(conn, self.queues, limit, self.id, self._rate_keys)
        self._limited_waiting = bool(rows) or more or retry_in is not None
        if len(rows) == limit:
            self._limited_due.set()  # there may be more: look again when slots free
        elif more:  # jobs this claim's own picks crowded out; others may be claimable behind them
            self._limited_due.set()
            self._wake.set()
        if retry_in is not None:  # a job waits for a token: come back when it is there (5 ms late)
            self._limited_next = min(self._limited_next, time.monotonic() + retry_in + 0.005)
        # Reversed: each goes to the front of the runners' queue (see _Ready), so the first ends up first.
        return self._hold([ClaimedJob(*row, limited=True) for row in rows], sent)[::-1]

    def _hold(self, jobs: list[ClaimedJob], sent: float | None = None) -> list[ClaimedJob]:
        """Hold *jobs*, claimed by a statement sent at monotonic time *sent* (None: now)."""
        sent = time.monotonic() if sent is None else sent
        jobs.sort(key=lambda j: (-j.priority, j.id))
        with self._held_lock:
            for job in jobs:
                old = self._held.get(job.id)  # an earlier claim not yet forgotten (see _held_for)
                if old is not None and not old.finished:
                    self._unfinished -= 1
                    if not (old.timed_out or old.cancelled):  # its outcome is not written: the claim was lost
                        self._lose(old)
                self._held[job.id] = _Held(job, lease_until=sent + job.lease_seconds)
            self._unfinished += len(jobs)
        if jobs:  # their leases need a heartbeat within a third of the shortest
            self.keeper.tick_by(time.monotonic() + min(j.lease_seconds for j in jobs) / 3)
            self._watch_by(sent + min(j.lease_seconds for j in jobs))
        return jobs

    def _drop_claim_conn(self) -> None:
        if self._claim_conn is not None:
            self._claim_conn.close()
            self._claim_conn = None

    def _dispatch(self, jobs: list[ClaimedJob]) -> None:
        if self.pool == "solo":
            for job in jobs:
                with contextlib.suppress(TaskTimeout, CancelRequested):  # delivered just after the task returned
                    self._execute(job)
            return
        ordinary = [job for job in jobs if not job.limited]
        for job in jobs:
            if job.limited:
                self._ready.put_front(job)
        if ordinary:
            self._ready.put_many(ordinary)

    def held_count(self) -> int:
        """Jobs this worker holds a lease on (claimed, outcome not yet recorded)."""
        with self._held_lock:
            return len(self._held)

    #: Adaptive prefetch keeps about this much work waiting per runner.
    PREFETCH_SECONDS = 0.02
    #: Adaptive prefetch holds at most this many jobs (or 1x the concurrency, if more).
    MAX_PREFETCH = 1024
    #: Jobs one claim statement takes at most; more free slots take more statements. A claim's time grows
    #: with its rows (about 10 us each): with up to 1,000 free slots a worker that fell a few hundred jobs
    #: behind took them in one statement. benchmarks/sustained.py at 10,000 jobs/s (autovacuum_naptime
    #: 10s, 3 minutes): worker's claim p99 per minute 7.5 / 6.7 / 6.3 ms unbounded, 4.9 / 4.7 / 2.9 ms at
    #: 256, 3.0 / 5.0 / 4.1 ms at 128. Drain of 50,000 no-op jobs: 35-40k jobs/s at 256, 33-37k at 128.
    MAX_CLAIM = 256

    def _prefetch_now(self) -> int:
        """Jobs to hold beyond the runners: fixed when set; else enough to keep each runner busy for
        PREFETCH_SECONDS, from 1x to 128x the concurrency and at most MAX_PREFETCH. The worker claims
        once a third of the capacity is free (MAX_CLAIM jobs per statement at most), so short jobs get
        big batches, and the claim, the runners and the recorder overlap instead of taking turns.
        Draining 50,000 no-op jobs with -c 8 (steady state, 3 runs each; before MAX_CLAIM): prefetch
        128 (the old cap, 16x), 26,300-26,700 jobs/s; 600, 32,300-34,300; 1,000, 38,900-41,900; 1,400,
        39,900-41,800. CPU per job hardly moved (worker 18-21 us, PostgreSQL 17-23 us): the gain is
        overlap. Jobs of 20 ms or more prefetch 1x, so a long job never waits here while another worker
        idles; jobs of 1 ms prefetch 20x."""
        if self.prefetch is not None:
            return self.prefetch
        per_runner = int(self.PREFETCH_SECONDS / max(self._job_seconds, 1e-4))
        return min(self.concurrency * max(1, min(128, per_runner)), max(self.concurrency, self.MAX_PREFETCH))

    def busy_count(self) -> int:
        """Jobs claimed whose task has not returned yet (waiting for a runner, or running)."""
        return self._unfinished

    def _recount_busy(self) -> int:
        """busy_count the slow way, to check the kept count (tests, shutdown)."""
        with self._held_lock:
            return sum(1 for h in self._held.values() if not h.finished)

    def _room(self) -> tuple[int, int]:
        """(capacity, free slots): jobs this worker may hold unfinished (runners plus prefetch), and how
        many more it may claim now. Also bounded by the jobs held at all: a finished job stays held until
        the recorder has written its outcome, and a recorder that falls behind (a saturated machine: at
        18,700 jobs/s offered, 165,000 jobs were claimed and waited for their outcome to be written, every
        one heartbeated) must slow the claiming down, not the other way round."""
        capacity = self.concurrency + self._prefetch_now()
        return capacity, min(capacity - self._unfinished, 2 * capacity - len(self._held))

    def _worth_claiming(self, capacity: int, free: int) -> bool:
        """Claim in batches (a third of the capacity) once the runners have work."""
        return free > 0 and (free >= capacity // 3 or self._ready.empty())

    def _claim_wanted(self) -> bool:
        """Whether the claim loop would claim now: a freed slot wakes it only then. Waking it on every
        returned task cost a thread switch per job on short jobs."""
        return self._worth_claiming(*self._room())

    def _drop_held(self, job_id: int) -> _Held | None:
        """Remove a held entry (with _held_lock held), keeping the busy count."""
        held = self._held.pop(job_id, None)
        if held is not None and not held.finished:
            self._unfinished -= 1
        return held

    def held_tokens(self) -> list[tuple[int, int, int]]:
        """(id, claim token, lease_seconds) of every job this worker holds a lease on."""
        with self._held_lock:
            return [(h.job.id, h.job.token, h.job.lease_seconds) for h in self._held.values()]

    def leases_renewed(self, renewed: Iterable[tuple[int, int]], sent: float) -> None:
        """The keeper's heartbeat, sent at monotonic time *sent*, extended the leases of these (id, claim
        token): in the database they now last at least until *sent* plus the lease."""
        with self._held_lock:
            for job_id, token in renewed:
                held = self._held.get(job_id)
                if held is not None and held.job.token == token:
                    held.lease_until = sent + held.job.lease_seconds

    def expire_leases(self) -> int:
        """Give up the jobs whose lease has run out by this worker's own clock: no heartbeat has renewed it
        for a whole lease, because the keeper could not reach the database (a partition, an outage, a
        connection that hangs). In the database the lease may outlast this moment but never precedes it
        (the statement that set it was sent before the database read its clock), so from here on any
        worker may rescue the job and start it again. A task still running here is stopped now, before
        that can happen, rather than when the heartbeat gets through and finds the claim gone; a job still
        waiting for a runner never starts. Whatever the task returns is discarded, and the job runs again
        after its rescue. An outcome already waiting for the recorder is kept: the fence decides it.
        Called by the watchdog thread; returns how many jobs were given up."""
        now = time.monotonic()
        with self._held_lock:
            expired = [h for h in self._held.values()
                       if h.lease_until <= now and not (h.finished or h.timed_out or h.cancelled)]
            for held in expired:
                self._drop_held(held.job.id)
                self._lose(held, f"its {held.job.lease_seconds} s lease ran out by this worker's clock: the claim "
                                 f"or heartbeat that last set it was sent "
                                 f"{now - held.lease_until + held.job.lease_seconds:.1f} s ago")
        return len(expired)

    def _watch_loop(self) -> None:
        """The watchdog: timeouts and leases by this worker's clock, at the first moment one may run out,
        and at least once a second. Each look walks the held jobs once; a claim or a job's start wakes it
        only when it brings an earlier moment (see _watch_by), not on every claim of a busy worker."""
        while not self._watch_stop.is_set():
            self._watch_next = float("inf")  # looking now: a job held meanwhile pokes, for another look
            self._watch_poke.clear()
            self.enforce_timeouts()
            self.expire_leases()
            with self._held_lock:
                due = min((h.lease_until for h in self._held.values()
                           if not (h.finished or h.timed_out or h.cancelled)), default=float("inf"))
            deadline = self.next_deadline()
            if deadline is not None:
                due = min(due, deadline)
            now = time.monotonic()
            self._watch_next = min(due, now + 1.0)
            self._watch_poke.wait(max(0.0, self._watch_next - now))

    def _watch_by(self, when: float) -> None:
        """Make sure the watchdog looks no later than *when* (monotonic)."""
        if when < self._watch_next:
            self._watch_poke.set()

    def lost_leases(self, ids: Iterable[int]) -> None:
        """The keeper's heartbeat found these jobs' claims gone: stop heartbeating them, and stop their
        tasks (see _lose)."""
        with self._held_lock:
            for job_id in ids:
                held = self._drop_held(job_id)
                if held is not None:
                    self._lose(held)

    def _lose(self, held: _Held, why: str = "its lease expired and it was rescued, or a database crash undid "
                                            "the claim") -> None:
        """*held*'s claim is no longer in the database, or may not be for long: its lease ran out and the
        job was rescued (this worker was frozen, or cut off from the database, for longer than the lease),
        a database crash undid the claim, or the lease ran out by this worker's clock (expire_leases).
        Another worker may be running the job already, so a task still running here is interrupted at
        once (LeaseLost, the way a cancellation is; its is_cancelled() turns True first), and whatever it
        returns is discarded. Called with _held_lock held, once per lost claim."""
        job = held.job
        self.metrics.lease_lost(job)
        running = held.started is not None and not (held.finished or held.timed_out or held.cancelled)
        log.warning("job %d %s attempt %d: claim lost (%s); another worker may run it now%s", job.id,
                    job.task_name, job.attempt, why,
                    ": interrupting the task, its outcome will be discarded" if running else "")
        if running:
            held.cancel_event.set()
            self._interrupt(held, LeaseLost)

    # --- running -------------------------------------------------------------------------------

    def _runner_loop(self) -> None:
        me = threading.get_ident()
        while True:
            job = self._ready.get()
            if job is None:
                return
            with contextlib.suppress(TaskTimeout, CancelRequested):  # delivered just after the task returned
                self._execute(job)  # (CancelRequested includes LeaseLost)
            if me in self._retired:  # a fresh runner took this one's place when its job timed out or was cancelled
                # Forget its ident on the way out: the system hands idents of ended threads to new ones, and a
                # new runner that inherited one still in this set would leave after its first job, unreplaced
                # (a worker whose link flapped, losing claims at every cut, ended with a runner short).
                self._retired.discard(me)
                return

    def _execute(self, job: ClaimedJob) -> None:
        task = self.app.tasks.get(job.task_name)
        timeout = (task.timeout if task is not None else None) or self.task_timeout
        started = time.monotonic()
        with self._held_lock:
            held = self._held_for(job)
            if held is not None and not held.cancelled:
                held.started, held.thread_id, held.timeout = started, threading.get_ident(), timeout
        if held is None or held.cancelled:  # cancelled, or lost, while it waited for a runner
            log.info("job %d %s attempt %d/%d not started: %s", job.id, job.task_name, job.attempt, job.max_attempts,
                     "claim lost" if held is None else "cancelled")
            return
        if timeout:
            self.keeper.tick_by(started + timeout)
            self._watch_by(started + timeout)
        log.debug("job %d %s attempt %d/%d started", job.id, job.task_name, job.attempt, job.max_attempts)
        self.metrics.job_started(job)
        outcome = executor.run(self.app.tasks, job, self.id, held.cancel_event)
        elapsed = time.monotonic() - started
        self._job_seconds += 0.05 * (elapsed - self._job_seconds)  # races between runners only blur it
        elapsed_ms = elapsed * 1000
        with self._held_lock:
            held = self._held_for(job)
            late = held is None or held.timed_out or held.cancelled
            if held is not None:
                held.timeout = None  # finished: the watchdog leaves it alone
                if not held.finished:
                    held.finished = True
                    self._unfinished -= 1
        if self._claim_wanted():
            self._wake.set()  # slots are free: the claim loop may fetch more
        if late:
            why = ("after its cancellation" if held is not None and held.cancelled else
                   "past its timeout" if held is not None and held.timed_out else "after its attempt had ended")
            log.warning("job %d %s returned after %.1f ms, %s: outcome discarded", job.id, job.task_name,
                        elapsed_ms, why)
            return
        if isinstance(outcome, RetryLater):
            log.warning("job %d %s attempt %d/%d failed in %.1f ms (%s); retrying in %.1f s", job.id,
                        job.task_name, job.attempt, job.max_attempts, elapsed_ms, outcome.error.summary(),
                        outcome.delay)
        elif not isinstance(outcome, Succeeded):  # a success's line is the recorder's (see Recorder.loop)
            log.error("job %d %s failed for good on attempt %d/%d in %.1f ms: %s", job.id, job.task_name,
                      job.attempt, job.max_attempts, elapsed_ms, outcome.error.summary())
        self.metrics.job_finished(job, outcome, elapsed)
        self.recorder.put(job, outcome, elapsed_ms)

    # --- timeouts ------------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """The monotonic time the first running job's timeout runs out."""
        with self._held_lock:
            deadlines = [h.started + h.timeout for h in self._held.values()
                         if h.started is not None and h.timeout and not h.timed_out and not h.cancelled]
        return min(deadlines, default=None)

    def enforce_timeouts(self) -> int:
        """End the attempts that ran past their timeout (called by the keeper).

        The attempt is recorded at once as failed by timeout (retried while attempts remain), so the
        job never waits on the stuck code. The thread is then interrupted with TaskTimeout, which
        stops Python code at its next bytecode but cannot break into a blocking C call (a sleep, a
        read on a socket with no timeout): such a thread is abandoned, its eventual outcome
        discarded, and a fresh runner takes its slot.
        """
        now = time.monotonic()
        # (job, its timeout) read under the lock: the runner clears held.timeout when the task returns.
        expired: list[tuple[ClaimedJob, float]] = []
        with self._held_lock:
            for held in self._held.values():
                if held.started is not None and held.timeout and not held.timed_out and not held.cancelled \
                        and now >= held.started + held.timeout:
                    held.timed_out = True
                    expired.append((held.job, held.timeout))
                    self._interrupt(held, TaskTimeout)
        for job, timeout in expired:
            log.error("job %d %s attempt %d/%d exceeded its timeout of %g s", job.id, job.task_name, job.attempt,
                      job.max_attempts, timeout)
            outcome = executor.timed_out(job, timeout, self.app.tasks.get(job.task_name))
            self.metrics.job_finished(job, outcome, timeout)
            self.recorder.put(job, outcome)
        return len(expired)

    def _interrupt(self, held: _Held, exc: type[BaseException]) -> None:
        """Raise *exc* in the thread running *held*'s task, whose outcome is recorded (or, for a lost claim,
        never will be); with the thread pool, a fresh runner takes the slot (the thread may be stuck in C,
        out of reach).

        Called with _held_lock held, before _execute marks the task finished (under that lock): so the
        exception lands in this task, or in _execute just after it, and never in the next job the thread
        would take."""
        if held.thread_id is not None:
            interrupt(held.thread_id, exc)
            if self.pool == "threads" and not self._stopping.is_set():
                self._retired.add(held.thread_id)
                self._add_runner()

    # --- cancellation --------------------------------------------------------------------------

    def cancel_requested(self, ids: Iterable[int]) -> int:
        """The keeper's heartbeat found these held jobs' cancellation requested: end their attempts now.

        As with a timeout, the job is recorded ``cancelled`` at once and the task is interrupted, with
        CancelRequested; its ``is_cancelled()`` turns True first. A job still waiting for a runner never
        starts. A task that already returned keeps its own outcome: the request came too late.
        """
        ended: list[_Held] = []
        with self._held_lock:
            for job_id in ids:
                held = self._held.get(job_id)
                if held is None or held.cancelled or held.timed_out or held.finished:
                    continue
                held.cancelled = True
                held.cancel_event.set()
                ended.append(held)
                self._interrupt(held, CancelRequested)
        for held in ended:
            job = held.job
            log.warning("job %d %s attempt %d/%d cancelled%s", job.id, job.task_name, job.attempt, job.max_attempts,
                        "" if held.started is not None else " before it started")
            outcome = executor.cancelled(job)
            self.metrics.job_finished(job, outcome, None if held.started is None else time.monotonic() - held.started)
            self.recorder.put(job, outcome)
        return len(ended)

    # --- recording outcomes (see pgq.recorder) ----------------------------------------------

    def _held_for(self, job: ClaimedJob) -> _Held | None:
        """*job*'s entry, if it is still this claim's: once an attempt's outcome is committed (a retry
        due at once, a timeout), or its claim was lost, this worker may claim the job again before the
        old attempt is done."""
        held = self._held.get(job.id)
        return held if held is not None and held.job.token == job.token else None

    def _forget(self, jobs: list[ClaimedJob]) -> None:
        with self._held_lock:
            for job in jobs:
                if self._held_for(job) is not None:
                    self._drop_held(job.id)
        if any(job.limited for job in jobs):
            self._limited_due.set()  # a slot of a limit is free (its job is no longer `running`)
        self._wake.set()  # slots are free: claim more

    # --- listening -----------------------------------------------------------------------------

    def _listen_loop(self) -> None:
        backoff = db.Reconnect()
        wanted = set(self.queues)
        while not self._stopping.is_set():
            try:
                with db.connect(self.app.database_url, role="listener", autocommit=True) as conn:
                    conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    backoff.reset()
                    self._limited_due.set()
                    self._wake.set()  # anything enqueued while we were not listening is due now
                    while not self._stopping.is_set():
                        # A short timeout: the stop flag is checked 4 times a second (no query, no wake).
                        for notify in conn.notifies(timeout=0.25):
                            # The payload is the queue, or 'limited <queue>' (see migration 0007): only
                            # limited jobs need the limited claim's look, a round trip before the claim.
                            payload = notify.payload
                            if payload in wanted:
                                self._wake.set()
                            elif payload.startswith("limited ") and payload[8:] in wanted:
                                self._limited_due.set()
                                self._wake.set()
                            if self._stopping.is_set():
                                break
            except (psycopg.OperationalError, DatabaseUnavailable) as exc:
                backoff.wait(self._stopping, "listen", exc)
            except psycopg.Error as exc:  # not an outage; without a listener we still poll, so keep trying
                backoff.failed(self._stopping, "listener", exc)

    # --- shutdown ------------------------------------------------------------------------------

    def _shutdown(self) -> None:
        # 1. Jobs claimed but not started go back at once, so another worker can take them now.
        unstarted: list[ClaimedJob] = []
        while True:
            try:
                job = self._ready.get_nowait()
            except queue_mod.Empty:
                break
            if job is not None:
                unstarted.append(job)
        active = [r for r in self._runners if r.is_alive() and r.ident not in self._retired]
        for _ in active:
            self._ready.put(None)
        if unstarted:
            self._release(unstarted)

        # 2. Running jobs get the grace period (a second signal cuts it short).
        deadline = time.monotonic() + self.shutdown_grace
        for runner in active:
            while runner.is_alive() and not self._hurry.is_set() and time.monotonic() < deadline:
                runner.join(timeout=0.1)

        # 3. Record every outcome we have, then stop the other threads.
        self.recorder.done.set()
        self.keeper.stop()
        self._watch_stop.set()
        self._watch_poke.set()
        if self.pruner is not None:
            self.pruner.stop()  # a round in progress ends after its current batch
        for thread in self._threads:
            if thread.name == "pgq-recorder":
                thread.join(timeout=None if not self._hurry.is_set() else 2.0)
            else:  # the keeper, the pruner, and the listener, which sees the stop within 0.25 s
                thread.join(timeout=2.0)

        kept, counted = self._unfinished, self._recount_busy()
        if kept != counted:  # a bug in the busy count's bookkeeping: claiming too much or too little
            log.error("busy count drifted: kept %d, counted %d", kept, counted)

        # 4. What still runs is abandoned: hand it back as a failed attempt (or leave it to lease expiry
        #    when the database is unreachable).
        abandoned = [h.job for h in list(self._held.values())]
        self.keeper.abandon(abandoned)
        self.keeper.deregister()
        self._drop_claim_conn()
        log.info("worker %s stopped", self.id)

    def _release(self, jobs: list[ClaimedJob]) -> None:
        try:
            with db.connect(self.app.database_url, role="worker", autocommit=True) as conn:
                rows = conn.execute(sql.RELEASE, {"ids": [j.id for j in jobs],
                                                  "tokens": [j.token for j in jobs]}).fetchall()
            log.info("released %d claimed but unstarted job(s)", len(rows))
        except Exception as exc:
            log.warning("could not release %d unstarted job(s) (%s); their leases will expire", len(jobs), exc)
        with self._held_lock:
            for job in jobs:
                self._drop_held(job.id)


def interrupt(thread_id: int, exc: type[BaseException] = TaskTimeout) -> bool:
    """Raise *exc* (TaskTimeout, CancelRequested) in the thread *thread_id* at its next Python bytecode."""
    done = ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(exc))
    return bool(done == 1)
