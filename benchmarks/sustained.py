"""Scenario 5, "sustained": a producer at a fixed rate near the drain rate for minutes, with pruning on.

    python benchmarks/sustained.py [--minutes 10] [--rate JOBS_PER_S] [--analyze-empty] [--database-url URL]

Throughput and claim latency must stay flat while finished rows accumulate and are pruned (no bloat
spiral). Targets: last-minute throughput within 10 % of the first minute's; the claim statement's p99
at most 5 ms in every minute; the size of pgq.jobs (table and indexes) and pgq.results bounded.

One real worker process (``python -m pgq.cli ... worker -c 8``, as benchmarks/run.py starts them) with
short retention, so pruning works during the run: ``--keep-succeeded 30s --prune-interval 5``. A
producer thread enqueues ``bench.noop`` jobs on a fixed schedule (``app.enqueue_many`` every 10 ms, as
many jobs as the schedule says are due; it catches up in bigger batches when it falls behind, and the
lag is recorded). Every 10 s a sample, from the database:

- jobs finished = jobs the producer committed - jobs still waiting or running (two partial-index
  counts). Pruning deletes finished rows, so counting them would undercount; this does not.
- the size of pgq.jobs (heap + every index), of jobs_claim_idx alone and of pgq.results (with its index),
  dead row versions and autovacuum runs (pg_stat_user_tables), WAL written, and CPU use.

The claim is timed two ways, both on the server's clock (a timer in this process would also measure the
producer thread's hold on the GIL; pg_stat_statements is not used: the embedded server does not load it):

- the worker's own claims: pg_stat_activity shows each backend's last statement with its query_start
  and, once the backend is idle again, its state_change. A thread polls it every 10 ms and takes each
  claim it finds finished once (and a claim it only saw running at the age it had then, a lower bound).
  It sees a sample of the claims (those followed by a pause long enough to be polled), not all of them.
  The claim is an autocommitted statement, so this includes its commit (the WAL flush).
- a probe twice a second: ``EXPLAIN (ANALYZE, BUFFERS, TIMING OFF)`` of pgq.sql.CLAIM (limit 8, the
  worker's -c) in a transaction that is rolled back, planned afresh each time: its execution time, and
  the buffers its scan of jobs_claim_idx touched (the dead index entries a claim walks over). When the
  worker's claims are slow and the probe's are not, the worker runs a different (cached) plan.

Where the server runs on this machine, each claim's time is split into work and waiting for a CPU, from
/proc/<pid>/schedstat of the backend (time on a CPU, time runnable on a run queue): the probe's backend
is read before and after each probe (its p99 less that wait), the worker's claim backend at every sample
(the share of its busy time spent waiting). On two cores shared by the producer, the worker, pruning,
autovacuum and PostgreSQL, a statement can be ready to run and still wait: at 10,000 jobs/s (git
263fb8c, 3 minutes) the probe's p99 was 6.7-10.7 ms and 1.4-2.3 ms less its wait, its backend waited
51-69 % of the time it was busy, and the machine was 79-84 % busy.

Used from benchmarks/run.py (``sustained(url, rate=..., minutes=..., logdir=..., progress=...)``), or alone:
this file's main starts the embedded server as run.py does, in a fresh database. Without ``--rate`` it first
drains 5,000 no-op jobs three times (run.py's drain scenario, --quick size) and runs at 80 % of the median
rate. That is a burst on an empty table with nothing else running; the rate one worker sustains while a
producer, pruning and autovacuum share the machine is lower.

The tables start emptied by TRUNCATE, which leaves pgq.jobs without statistics, as a fresh migration does.
``--analyze-empty`` runs VACUUM ANALYZE on them first (statistics: 0 rows), the state autovacuum leaves a
queue in once it has been drained and pruned to nothing, and lets the worker poll the empty queue for 15 s
before the producer starts, as an idle worker would: the worker's prepared statements are then planned for
an empty table (before commit 208c028 turned sequential scans off on worker connections, that plan was kept
until the next ANALYZE and the sustained drain fell to 134-621 jobs/s).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import os
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `python benchmarks/sustained.py` puts benchmarks/ first, not the repo root

import psycopg  # noqa: E402

if TYPE_CHECKING:
    from benchmarks.run import Row

CONCURRENCY = 8
KEEP_SUCCEEDED = "30s"  # short retention, so the run reaches its steady size and prunes all along
PRUNE_INTERVAL = 5.0  # seconds between pruning rounds
SAMPLE_SECONDS = 10.0  # database sample (throughput, backlog, sizes, dead tuples)
PROBE_SECONDS = 0.5  # claim probe (EXPLAIN ANALYZE of the claim, rolled back)
WATCH_SECONDS = 0.01  # pg_stat_activity poll for the worker's claims
IDLE_BEFORE = 15.0  # with analyze_empty: seconds the worker polls the empty queue before the producer starts
TICK = 0.010  # the producer enqueues what is due every TICK seconds
MAX_BATCH = 5_000  # at most this many jobs per enqueue_many call (one INSERT) when catching up

# Targets of the issue.
TARGET_THROUGHPUT_RATIO = 0.10  # last minute within 10 % of the first
TARGET_CLAIM_P99_MS = 5.0
TARGET_SIZE_GROWTH = 0.10  # peak size in the second half at most 10 % above the second quarter's peak

SAMPLE_SQL = """
SELECT (SELECT count(*) FROM pgq.jobs WHERE status IN ('queued', 'retrying') AND NOT limited),
       (SELECT count(*) FROM pgq.jobs WHERE status = 'running'),
       pg_total_relation_size('pgq.jobs'), pg_relation_size('pgq.jobs_claim_idx'),
       pg_total_relation_size('pgq.results'), pg_current_wal_lsn() - '0/0'::pg_lsn,
       (SELECT phase FROM pg_stat_progress_vacuum WHERE relid = 'pgq.jobs'::regclass LIMIT 1)
"""
STATS_SQL = """
SELECT relname, n_live_tup, n_dead_tup, autovacuum_count, n_tup_del
FROM pg_stat_user_tables WHERE schemaname = 'pgq' AND relname IN ('jobs', 'results')
"""
# The worker's claim statements (pgq.sql.CLAIM begins with "WITH picked AS"), running or just finished.
WATCH_SQL = """
SELECT pid, state, query_start, state_change, clock_timestamp() FROM pg_stat_activity
WHERE datname = current_database() AND application_name = 'pgq-worker'
  AND starts_with(ltrim(query, E' \\n'), 'WITH picked AS')
"""
PRUNED_LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}): INFO/pgq\.pruner\] pruned (\d+) finished "
                         r"job\(s\) .* in (\d+) batch\(es\), ([\d.]+) s")


@dataclass
class Sample:
    """The database and the processes at one moment (``t``: seconds since the producer started)."""

    t: float
    nominal: float  # when it was due: a multiple of SAMPLE_SECONDS, or the end of the run
    enqueued: int
    waiting: int
    running: int
    jobs_bytes: int  # pgq.jobs: heap, TOAST and every index
    claim_idx_bytes: int
    results_bytes: int  # pgq.results with its primary key
    wal_bytes: int
    vacuum_phase: str | None  # of a VACUUM of pgq.jobs running now
    live: dict[str, int]
    dead: dict[str, int]
    autovacuums: dict[str, int]
    deleted: int  # pgq.jobs n_tup_del: what pruning deleted
    worker_cpu: float | None
    own_cpu: float | None
    machine_busy: float | None  # CPU seconds spent not idle, all CPUs
    # schedstat() of each server process seen running the worker's claims, when it runs on this machine
    claim_sched: dict[int, tuple[float, float]] = field(default_factory=dict)

    @property
    def finished(self) -> int:
        return self.enqueued - self.waiting - self.running


@dataclass
class Probe:
    t: float
    ms: float  # server-side execution time of the claim
    buffers: int  # shared buffers its scan of jobs_claim_idx touched (index and heap pages, hit + read)
    # What the probe's backend did during the round trip (planning and EXPLAIN's own work included), from
    # /proc/<pid>/schedstat: ms on a CPU, and ms runnable but waiting for one. None: not readable here.
    cpu_ms: float | None = None
    runq_ms: float | None = None

    @property
    def ms_not_waiting(self) -> float:
        """The execution time less the backend's wait for a CPU: what the claim took where it could run."""
        return self.ms if self.runq_ms is None else max(0.0, self.ms - self.runq_ms)


@dataclass
class Minute:
    """One minute of the run, for the table."""

    n: int
    seconds: float
    start: Sample
    end: Sample
    samples: list[Sample]  # the ones taken in the minute (its end included)
    probes: list[Probe]
    claims: list[float]  # the worker's claims seen, ms
    lag_max: float  # seconds the producer was behind its schedule, at most
    prune_rounds: int
    pruned: int
    prune_max_s: float

    @property
    def finished(self) -> int:
        return self.end.finished - self.start.finished

    @property
    def rate(self) -> float:
        return self.finished / self.seconds if self.seconds else 0.0

    @property
    def enqueue_rate(self) -> float:
        return (self.end.enqueued - self.start.enqueued) / self.seconds if self.seconds else 0.0

    def claim_ms(self, q: float) -> float | None:
        from benchmarks.run import percentile

        return percentile(self.claims, q) if self.claims else None

    def probe_ms(self, q: float) -> float | None:
        from benchmarks.run import percentile

        return percentile([p.ms for p in self.probes], q) if self.probes else None

    def probe_not_waiting_ms(self, q: float) -> float | None:
        """Percentile of the probes' execution time less their backend's wait for a CPU."""
        from benchmarks.run import percentile

        timed = [p.ms_not_waiting for p in self.probes if p.runq_ms is not None]
        return percentile(timed, q) if timed else None

    def claim_runq_share(self) -> float | None:
        """The share of the minute's busy time that the worker's claim backend(s) spent runnable but
        waiting for a CPU (schedstat at the first and the last of the minute's samples that saw each)."""
        waited = busy = 0.0
        for pid, (cpu1, wait1) in self.end.claim_sched.items():
            cpu0, wait0 = next(s.claim_sched[pid] for s in [self.start, *self.samples] if pid in s.claim_sched)
            waited, busy = waited + wait1 - wait0, busy + cpu1 - cpu0 + wait1 - wait0
        return waited / busy if busy else None

    def probe_runq_share(self) -> float | None:
        """The share of the probes' round trips their backend spent runnable, waiting for a CPU."""
        timed = [(p.cpu_ms, p.runq_ms) for p in self.probes if p.cpu_ms is not None and p.runq_ms is not None]
        total = sum(cpu + waited for cpu, waited in timed)
        return sum(waited for _, waited in timed) / total if total else None


@dataclass
class Producer:
    """Enqueues ``rate`` jobs/s on a monotonic schedule from its own thread; catches up when late."""

    rate: float
    enqueued: int = 0
    lags: list[tuple[float, float]] = field(default_factory=list)  # (t, seconds behind) when behind > 2 ticks
    error: BaseException | None = None
    started: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self.started = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="sustained-producer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)

    def _run(self) -> None:
        from benchmarks import tasks

        noop = tasks.noop
        try:
            tick = 0
            while not self._stop.is_set():
                due = int(self.rate * (time.monotonic() - self.started)) - self.enqueued
                if due > 0:
                    n = min(due, MAX_BATCH)
                    tasks.app.enqueue_many(noop.s() for _ in range(n))
                    self.enqueued += n
                    behind = (self.rate * (time.monotonic() - self.started) - self.enqueued) / self.rate
                    if behind > 2 * TICK:
                        self.lags.append((time.monotonic() - self.started, behind))
                tick += 1
                pause = self.started + tick * TICK - time.monotonic()
                if pause > 0:
                    self._stop.wait(pause)
                else:
                    tick = math.ceil((time.monotonic() - self.started) / TICK)  # skip ticks, not jobs
        except BaseException as exc:
            self.error = exc


class ClaimWatcher:
    """The worker's claims as pg_stat_activity shows them: (t, ms) of each one seen, t on the database clock
    since *db_t0*. A claim seen finished (its backend idle) has its exact duration (state_change -
    query_start); one only seen running, the age it had then (a lower bound)."""

    def __init__(self, url: str):
        self.url = url
        self.claims: dict[tuple[int, datetime], tuple[float, float, bool]] = {}  # -> (t, ms, exact)
        self.pids: set[int] = set()  # the server processes seen running them
        self.polls = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, db_t0: datetime) -> None:
        self._thread = threading.Thread(target=self._run, args=(db_t0,), name="sustained-claims", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self, db_t0: datetime) -> None:
        try:
            with psycopg.connect(self.url, autocommit=True) as conn:
                while not self._stop.is_set():
                    for pid, state, started, changed, now in conn.execute(WATCH_SQL):
                        if started is None or started < db_t0:
                            continue
                        key = (pid, started)
                        self.pids.add(pid)
                        if state == "active":
                            ms, exact = (now - started).total_seconds() * 1000, False
                        elif changed is not None and changed >= started:
                            ms, exact = (changed - started).total_seconds() * 1000, True
                        else:
                            continue
                        seen = self.claims.get(key)
                        if seen is None or (not seen[2] and (exact or ms > seen[1])):
                            self.claims[key] = ((started - db_t0).total_seconds(), ms, exact)
                    self.polls += 1
                    self._stop.wait(WATCH_SECONDS)
        except BaseException as exc:
            self.error = exc


def machine_busy_seconds() -> float | None:
    """CPU time of the whole machine spent not idle (all CPUs; /proc/stat), in seconds."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def schedstat(pid: int | None) -> tuple[float, float] | None:
    """(ms on a CPU, ms runnable but waiting for a CPU) of process *pid* since it started, from
    /proc/<pid>/schedstat; None where that cannot be read (not Linux, or not this machine's process)."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            on_cpu, waiting = f.read().split()[:2]
    except (OSError, ValueError):
        return None
    return int(on_cpu) / 1e6, int(waiting) / 1e6


def probe_claim(conn: psycopg.Connection, t: float, pid: int | None = None) -> Probe:
    """EXPLAIN ANALYZE of the claim of CONCURRENCY jobs, planned afresh and rolled back: nothing stays claimed.
    With *pid* (the local server process of *conn*), also its CPU time and its wait for a CPU meanwhile."""
    from pgq import sql as pgq_sql

    before = schedstat(pid)
    try:
        doc = conn.execute("EXPLAIN (ANALYZE, BUFFERS, TIMING OFF, FORMAT JSON) " + pgq_sql.CLAIM,
                           {"queues": ["default"], "limit": CONCURRENCY, "worker_id": "sustained-probe"}).fetchone()[0]
    finally:
        conn.rollback()
    top = doc[0] if isinstance(doc, list) else doc

    def scan(node: dict[str, Any]) -> dict[str, Any] | None:
        if node.get("Index Name") == "jobs_claim_idx":
            return node
        return next((found for child in node.get("Plans", []) if (found := scan(child)) is not None), None)

    after = schedstat(pid)
    walk = scan(top["Plan"]) or top["Plan"]
    probe = Probe(t, float(top["Execution Time"]),
                  int(walk.get("Shared Hit Blocks", 0)) + int(walk.get("Shared Read Blocks", 0)))
    if before is not None and after is not None:
        probe.cpu_ms, probe.runq_ms = after[0] - before[0], after[1] - before[1]
    return probe


def take_sample(conn: psycopg.Connection, t: float, nominal: float, enqueued: int, worker_pid: int,
                claim_pids: Iterable[int] = ()) -> Sample:
    from benchmarks.run import cpu_seconds, is_local_backend

    waiting, running, jobs_b, claim_b, results_b, wal, phase = conn.execute(SAMPLE_SQL).fetchone()
    live: dict[str, int] = {}
    dead: dict[str, int] = {}
    vacs: dict[str, int] = {}
    deleted = 0
    for relname, n_live, n_dead, n_vac, n_del in conn.execute(STATS_SQL):
        live[relname], dead[relname], vacs[relname] = n_live, n_dead, n_vac
        if relname == "jobs":
            deleted = n_del
    sched = {pid: got for pid in claim_pids
             if is_local_backend(pid, conn.info.dbname) and (got := schedstat(pid)) is not None}
    return Sample(t, nominal, enqueued, waiting, running, jobs_b, claim_b, results_b, int(wal), phase, live, dead,
                  vacs, deleted, cpu_seconds(worker_pid), cpu_seconds(os.getpid()), machine_busy_seconds(), sched)


def prune_rounds(log_path: Path) -> list[tuple[datetime, int, int, float]]:
    """(when, jobs deleted, batches, seconds) of every pruning round the worker logged (at -l info)."""
    out = []
    with contextlib.suppress(OSError):
        for line in log_path.read_text(errors="replace").splitlines():
            m = PRUNED_LINE.match(line)
            if m:
                when = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").replace(microsecond=int(m.group(2)) * 1000)
                out.append((when, int(m.group(3)), int(m.group(4)), float(m.group(5))))
    return out


def empty_tables(url: str, analyze: bool) -> None:
    """Empty pgq's tables. TRUNCATE leaves pgq.jobs with no statistics (reltuples -1), as a fresh migration
    does; *analyze* records "0 rows" instead, as VACUUM or ANALYZE of an emptied table would."""
    from benchmarks.run import checkpoint

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("TRUNCATE pgq.jobs, pgq.results, pgq.workers, pgq.maintenance_runs")
        if analyze:
            conn.execute("VACUUM ANALYZE pgq.jobs, pgq.results")
    checkpoint(url)


def sustained(url: str, *, rate: float, minutes: float, logdir: Path,
              progress: Callable[[str], None] = lambda text: None, keep_succeeded: str = KEEP_SUCCEEDED,
              prune_interval: float = PRUNE_INTERVAL, analyze_empty: bool = False) -> list[Row]:
    """Run the scenario: print its per-minute table, return summary rows for run.py's table.

    *analyze_empty*: start from a VACUUM ANALYZE of the emptied tables (statistics saying "0 rows"), not
    from none (see :func:`empty_tables`), and with a worker that has been idle for IDLE_BEFORE seconds."""
    from benchmarks import tasks
    from benchmarks.run import Row, WorkerProcess, is_local_backend, wait_for

    if rate <= 0 or minutes <= 0:
        raise ValueError("rate and minutes must be positive")
    empty_tables(url, analyze_empty)
    tasks.app.set_database_url(url)
    duration = minutes * 60.0
    label = f"sustained: {minutes:g} min at {rate:,.0f} jobs/s"
    cmd = [sys.executable, "-m", "pgq.cli", "--database-url", url, "-A", "benchmarks.tasks", "worker",
           "-c", str(CONCURRENCY), "-l", "info", "--keep-succeeded", keep_succeeded,
           "--prune-interval", str(prune_interval)]
    proc = WorkerProcess(url, logdir / "sustained-0.log", cmd)
    producer = Producer(rate)
    watcher = ClaimWatcher(url)
    samples: list[Sample] = []
    probes: list[Probe] = []
    wall_started = datetime.now()
    try:
        with psycopg.connect(url, autocommit=True) as stats, psycopg.connect(url) as probe_conn:
            wait_for(lambda: bool(stats.execute(
                "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE datname = current_database() "
                "AND application_name = 'pgq-listener' AND query ILIKE 'LISTEN%%')").fetchone()[0]),
                30, [proc], what="the worker's LISTEN")
            if analyze_empty:
                # An idle worker on an empty (0 pages), analyzed queue: it polls once a second, and its claim is a
                # prepared statement that gets its generic plan after 10 executions (psycopg prepares on the
                # 6th, PostgreSQL tries 5 custom plans first), planned for a table of 0 rows.
                progress(f"sustained: the worker idles {IDLE_BEFORE:g} s on the empty queue first")
                time.sleep(IDLE_BEFORE)
                proc.check_alive()
            tasks.app.enqueue_many(tasks.noop.s() for _ in range(10))  # opens the pool before the clock starts
            wait_for(lambda: stats.execute("SELECT count(*) FROM pgq.jobs WHERE status = 'succeeded'"
                                           ).fetchone()[0] == 10, 30, [proc], what="warm-up jobs")
            base = 10  # the warm-up jobs count as enqueued: finished = enqueued - backlog
            probe_pid = probe_conn.info.backend_pid
            if not is_local_backend(probe_pid, probe_conn.info.dbname):
                probe_pid = None  # the server is elsewhere: no /proc to read
            db_t0 = stats.execute("SELECT clock_timestamp()").fetchone()[0]
            wall_started = datetime.now()
            producer.start()
            watcher.start(db_t0)
            t0 = producer.started
            samples.append(take_sample(stats, 0.0, 0.0, base, proc.pid))
            next_probe, next_sample, next_report = t0 + PROBE_SECONDS, t0 + SAMPLE_SECONDS, 60.0
            while True:
                now = time.monotonic()
                proc.check_alive()
                for name, failed in (("producer", producer.error), ("claim watcher", watcher.error)):
                    if failed is not None:
                        raise RuntimeError(f"the {name} failed: {failed!r}") from failed
                if now >= next_sample or now - t0 >= duration:
                    nominal = min(next_sample - t0, duration)
                    samples.append(take_sample(stats, now - t0, nominal, base + producer.enqueued, proc.pid,
                                               set(watcher.pids)))
                    next_sample += SAMPLE_SECONDS
                    if nominal >= next_report or nominal >= duration:
                        last = samples[-1]
                        progress(f"sustained: {last.t / 60:.1f} of {minutes:g} min, {last.finished - base:,} "
                                 f"finished, backlog {last.waiting + last.running:,}, pgq.jobs "
                                 f"{last.jobs_bytes / 2**20:.0f} MB")
                        next_report += 60.0
                    if now - t0 >= duration:
                        break
                if now >= next_probe:
                    probes.append(probe_claim(probe_conn, time.monotonic() - t0, probe_pid))
                    next_probe = max(next_probe + PROBE_SECONDS, time.monotonic())
                pause = min(next_probe, next_sample, t0 + duration) - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
            producer.stop()
            watcher.stop()
            end_backlog = stats.execute("SELECT count(*) FROM pgq.jobs WHERE status IN ('queued', 'retrying', "
                                        "'running')").fetchone()[0]
            states = dict(stats.execute("SELECT status, count(*) FROM pgq.jobs GROUP BY status").fetchall())
            rerun = stats.execute("SELECT count(*) FROM pgq.jobs WHERE attempts > 1").fetchone()[0]
    finally:
        producer.stop()
        watcher.stop()
        proc.stop()
        tasks.app.close()
    rounds = prune_rounds(proc.log_path)
    problems = [line for line in proc.log_tail(10_000).splitlines()
                if "WARNING" in line or "ERROR" in line or "Traceback" in line]
    if problems:
        print(f"  [{label}] worker {proc.pid} logged:\n    " + "\n    ".join(problems[:30]), file=sys.stderr)

    claims = sorted(watcher.claims.values())
    table = minutes_of(samples, probes, claims, producer, rounds, wall_started)
    print()
    print("\n".join(render_minutes(label, table)))
    return summary(label, rate, duration, samples, probes, claims, watcher.polls, table, producer, end_backlog,
                   states, rerun, rounds, Row)


def minutes_of(samples: list[Sample], probes: list[Probe], claims: list[tuple[float, float, bool]],
               producer: Producer, rounds: list[tuple[datetime, int, int, float]],
               wall_started: datetime) -> list[Minute]:
    out = []
    bounds = [s for s in samples if s.nominal % 60 == 0]
    if samples[-1] is not bounds[-1]:
        bounds.append(samples[-1])  # a partial last minute
    for n, (a, b) in enumerate(itertools.pairwise(bounds), start=1):
        lo, hi = a.nominal, b.nominal
        mine = [r for r in rounds if lo < (r[0] - wall_started).total_seconds() <= hi]
        out.append(Minute(
            n, b.t - a.t, a, b, [s for s in samples if lo < s.nominal <= hi],
            [p for p in probes if lo < p.t <= hi], [ms for t, ms, _ in claims if lo < t <= hi],
            max((lag for t, lag in producer.lags if lo < t <= hi), default=0.0),
            len(mine), sum(r[1] for r in mine), max((r[3] for r in mine), default=0.0)))
    return out


def render_minutes(label: str, table: list[Minute]) -> list[str]:
    def mb(n: int) -> str:
        return f"{n / 2**20:.1f}"

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}" if v < 100 else f"{v:,.0f}"

    def cpu(m: Minute, attr: str) -> str:
        a, b = getattr(m.start, attr), getattr(m.end, attr)
        return "-" if a is None or b is None else f"{(b - a) / m.seconds * 100:.0f}"

    def grew(m: Minute, what: str) -> int:
        return m.end.autovacuums.get(what, 0) - m.start.autovacuums.get(what, 0)

    header = ["min", "jobs/s", "enq/s", "lag s", "backlog", "claim p50", "p99", "max", "n", "wait %", "probe p50",
              "p99", "p99 -wait", "wait %", "bufs p50/max", "jobs MB", "claim idx MB", "results MB", "dead k j/r",
              "autovac j/r", "vac", "pruned", "prune max s", "WAL MB", "cpu% wkr/prod/all"]
    rows = [header]
    for m in table:
        bufs = sorted(p.buffers for p in m.probes)
        rows.append([
            f"{m.n}" + ("" if abs(m.seconds - 60) < 1 else f" ({m.seconds:.0f} s)"),
            f"{m.rate:,.0f}", f"{m.enqueue_rate:,.0f}", f"{m.lag_max:.2f}",
            f"{max(s.waiting + s.running for s in m.samples):,}",
            ms(m.claim_ms(50)), ms(m.claim_ms(99)), ms(max(m.claims, default=None)), f"{len(m.claims):,}",
            "-" if (share := m.claim_runq_share()) is None else f"{share * 100:.0f}",
            ms(m.probe_ms(50)), ms(m.probe_ms(99)), ms(m.probe_not_waiting_ms(99)),
            "-" if (share := m.probe_runq_share()) is None else f"{share * 100:.0f}",
            f"{bufs[len(bufs) // 2]}/{bufs[-1]}" if bufs else "-",
            mb(m.end.jobs_bytes), mb(m.end.claim_idx_bytes), mb(m.end.results_bytes),
            f"{m.end.dead.get('jobs', 0) / 1000:,.0f}/{m.end.dead.get('results', 0) / 1000:,.0f}",
            f"{grew(m, 'jobs')}/{grew(m, 'results')}",
            f"{sum(1 for s in m.samples if s.vacuum_phase)}/{len(m.samples)}",
            f"{m.pruned:,}", f"{m.prune_max_s:.2f}", f"{(m.end.wal_bytes - m.start.wal_bytes) / 2**20:,.0f}",
            f"{cpu(m, 'worker_cpu')}/{cpu(m, 'own_cpu')}/{cpu(m, 'machine_busy')}",
        ])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    out = [f"{label}: per minute", ""]
    for k, r in enumerate(rows):
        out.append("  ".join(c.rjust(widths[i]) for i, c in enumerate(r)))
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    out += [
        "",
        "  jobs/s = (jobs the producer committed - waiting and running jobs) per second; enq/s = what the producer "
        "committed; lag s = how far the producer was behind its schedule, at most; backlog = waiting + running, at "
        "most",
        "  claim ms = the worker's own claim statements (pg_stat_activity: state_change - query_start), n = how many "
        "were seen, wait % = the share of their backend's busy time (on a CPU or runnable) spent waiting for a CPU; "
        "probe ms = EXPLAIN (ANALYZE, TIMING OFF) of pgq.sql.CLAIM (limit "
        f"{CONCURRENCY}, planned afresh, rolled back) every {PROBE_SECONDS:g} s, server-side execution time; "
        "p99 -wait = p99 of that time less the probe backend's wait for a CPU meanwhile, wait % = the share of "
        "the probes' round trips their backend spent runnable but waiting for a CPU (/proc/<pid>/schedstat; "
        "'-' when the server is not on this machine)",
        "  bufs = shared buffers the probe's scan of jobs_claim_idx touched (index and heap pages: the dead entries it "
        "walks over)",
        "  sizes, dead row versions (pg_stat_user_tables, thousands) at the end of the minute; jobs MB = pgq.jobs "
        "with all its indexes; autovac = autovacuum runs that ended in the minute (jobs/results); vac = samples "
        "that found a VACUUM of pgq.jobs running; pruned = jobs deleted by the worker's pruning rounds, prune max s "
        "= its longest round",
        "  cpu% = CPU of the worker process / of this process (producer, sampler and watcher) / of the whole machine "
        f"({os.cpu_count()} CPUs = {100 * (os.cpu_count() or 1)}%)",
    ]
    return out


def summary(label: str, rate: float, duration: float, samples: list[Sample], probes: list[Probe],
            claims: list[tuple[float, float, bool]], polls: int, table: list[Minute], producer: Producer,
            end_backlog: int, states: dict[str, int], rerun: int, rounds: list[tuple[datetime, int, int, float]],
            Row: Any) -> list[Row]:
    """Rows for run.py's table (latency columns: the worker's claims, ms) with pass/fail notes."""
    from benchmarks.run import latency_row

    finished = samples[-1].finished - samples[0].finished
    whole = latency_row(Row(f"{label}, whole run", jobs=finished, seconds=samples[-1].t,
                            rate=finished / samples[-1].t if samples[-1].t else None), [ms for _, ms, _ in claims])
    full = [m for m in table if abs(m.seconds - 60) < 1] or table
    first, last = full[0], full[-1]
    rows = [whole]
    for name, m in (("first minute", first), ("last minute", last)):
        rows.append(latency_row(Row(f"{label}, {name}", jobs=m.finished, seconds=m.seconds, rate=m.rate), m.claims))
    notes = whole.notes

    def mark(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    notes.append("latency columns: the worker's claim statements, ms (pg_stat_activity; "
                 f"{len(claims):,} claims seen in {polls:,} polls, {sum(1 for c in claims if not c[2]):,} of them only "
                 "while running: their age then)")
    ratio = last.rate / first.rate if first.rate else 0.0
    notes.append(("n/a " if first is last else f"{mark(abs(ratio - 1) <= TARGET_THROUGHPUT_RATIO)} ")
                 + f"throughput: last minute {last.rate:,.0f} jobs/s / first minute {first.rate:,.0f} = {ratio:.3f} "
                 f"(target: within {TARGET_THROUGHPUT_RATIO:.0%}{'; one minute only' if first is last else ''}); "
                 f"the producer wanted {rate:,.0f}/s")
    for what, per_minute in (("worker's claim", Minute.claim_ms), ("probe's claim", Minute.probe_ms),
                             ("probe's claim less its wait for a CPU", Minute.probe_not_waiting_ms)):
        p99s = [(m.n, v) for m in table if (v := per_minute(m, 99)) is not None]
        worst = max(p99s, key=lambda x: x[1], default=(0, 0.0))
        notes.append(f"{mark(all(v <= TARGET_CLAIM_P99_MS for _, v in p99s)) if what.startswith('worker') else '    '}"
                     f" {what} p99 per minute: " + " / ".join(f"{v:.2f}" for _, v in p99s)
                     + f" ms; worst {worst[1]:.2f} ms in minute {worst[0]} (target: <= {TARGET_CLAIM_P99_MS:g} ms "
                     "every minute)")
    diverged = [m.n for m in table if (w := m.claim_ms(50)) is not None and (p := m.probe_ms(50)) is not None
                and w > 20 and w > 10 * p]
    if diverged:
        notes.append(f"minutes {', '.join(map(str, diverged))}: the worker's claims took over 10x as long as the "
                     "freshly planned probe's (median): its cached (generic) plan of the claim is not the probe's")
    # The first quarter is the ramp (one retention window, then vacuum's first visits): the second quarter is
    # the reference the second half must not outgrow.
    end = samples[-1].nominal
    size = [(s.nominal, s.jobs_bytes + s.results_bytes) for s in samples]
    reference = max((b for t, b in size if end / 4 < t <= end / 2), default=0)
    later = max((b for t, b in size if t > end / 2), default=0)
    growth = later / reference - 1 if reference else 0.0
    verdict = mark(growth <= TARGET_SIZE_GROWTH) if reference and end >= 120 else "n/a (a run under 2 min is ramp)"
    notes.append(f"{verdict} size (pgq.jobs with indexes + pgq.results): peak "
                 f"{reference / 2**20:.1f} MB in the second quarter of the run, {later / 2**20:.1f} MB in the second "
                 f"half ({growth:+.1%}), {size[-1][1] / 2**20:.1f} MB at the end (target: the second half's peak at "
                 f"most {TARGET_SIZE_GROWTH:.0%} above the second quarter's; the first quarter is the ramp)")
    enqueued = producer.enqueued
    behind = max((lag for _, lag in producer.lags), default=0.0)
    notes.append(f"producer: {enqueued:,} jobs enqueued ({enqueued / duration:,.0f}/s of {rate:,.0f}/s wanted); "
                 + (f"behind schedule at {len(producer.lags)} ticks, at most {behind:.2f} s"
                    if producer.lags else "never behind schedule"))
    notes.append(f"backlog (waiting + running) at the end: {end_backlog:,}; "
                 f"max {max(s.waiting + s.running for s in samples):,} over the samples")
    notes.append(f"pruning: {len(rounds)} rounds logged deleted {sum(r[1] for r in rounds):,} jobs "
                 f"(n_tup_del {samples[-1].deleted - samples[0].deleted:,}); longest round "
                 f"{max((r[3] for r in rounds), default=0.0):.2f} s; jobs left at the end: "
                 + ", ".join(f"{n:,} {s}" for s, n in sorted(states.items())))
    if states.get("failed"):
        notes.append(f"{states['failed']} jobs FAILED")
    if rerun:
        notes.append(f"{rerun} jobs ran more than once (attempts > 1)")
    return rows


# --- alone: python benchmarks/sustained.py ----------------------------------------------------------


def drain_rate(url: str, logdir: Path, progress: Callable[[str], None]) -> float:
    """The median of 3 drains of 5,000 no-op jobs by one worker (run.py's drain scenario, --quick size)."""
    from benchmarks import run as bench
    from benchmarks import tasks

    tasks.app.set_database_url(url)
    plan = bench.Plan.make(True)
    try:
        rates = []
        for n in range(3):
            progress(f"drain rate, run {n + 1} of 3")
            rates.append(bench.drain(url, plan, tasks.noop, 1, "drain-rate", logdir).rate or 0.0)
    finally:
        tasks.app.close()
    rate = sorted(rates)[1]
    print(f"drain:      {' / '.join(f'{r:,.0f}' for r in rates)} jobs/s (1 worker, {plan.drain_jobs:,} no-op jobs "
          f"queued first); 80% of the median: {0.8 * rate:,.0f} jobs/s")
    return rate


def main(argv: list[str] | None = None) -> int:
    from benchmarks import run as bench

    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long the producer runs [default: 10]")
    parser.add_argument("--rate", type=float, default=None,
                        help="jobs/s the producer enqueues [default: 80%% of the drain rate of one worker, "
                             "measured first: 3 drains of 5,000 no-op jobs, the median]")
    parser.add_argument("--keep-succeeded", default=KEEP_SUCCEEDED, help="the worker's --keep-succeeded")
    parser.add_argument("--prune-interval", type=float, default=PRUNE_INTERVAL, help="the worker's --prune-interval")
    parser.add_argument("--analyze-empty", action="store_true",
                        help="start from a VACUUM ANALYZE of the emptied tables (statistics: 0 rows) instead of none")
    parser.add_argument("--database-url", default=os.environ.get("PGQ_BENCH_DATABASE_URL"),
                        help="server to use (a fresh database is created on it) [default: an embedded PostgreSQL]")
    args = parser.parse_args(argv)
    began = time.monotonic()

    def progress(text: str) -> None:
        print(f"  ... {text}", file=sys.stderr, flush=True)

    import pgq
    from benchmarks import tasks

    with tempfile.TemporaryDirectory(prefix="pgq-bench-logs-") as logs, \
            bench.server(args.database_url) as (admin_url, where), bench.fresh_database(admin_url) as url:
        pgq.App(url).migrate()
        with psycopg.connect(url, autocommit=True) as conn:
            # run.py's reset() (its drain scenario, for the drain rate) empties the wake-up table too
            conn.execute(f"CREATE TABLE {tasks.WAKE_TABLE} (job_id bigint PRIMARY KEY, "
                         "entered_at timestamptz NOT NULL)")
            version = conn.execute("SHOW server_version").fetchone()[0]
            settings = ", ".join(f"{s}={conn.execute(f'SHOW {s}').fetchone()[0]}" for s in
                                 ("fsync", "synchronous_commit", "shared_buffers", "autovacuum_naptime",
                                  "max_wal_size"))
        print(f"pgq sustained benchmark - pgq {pgq.__version__} ({bench.source_revision()}), "
              f"PostgreSQL {version}, {where}")
        print(f"            {settings}")
        print(f"worker:     python -m pgq.cli ... worker -c {CONCURRENCY} -l info "
              f"--keep-succeeded {args.keep_succeeded} --prune-interval {args.prune_interval:g}")
        rate = args.rate
        if rate is None:
            rate = 0.8 * drain_rate(url, Path(logs), progress)
        print(f"producer:   {rate:,.0f} bench.noop jobs/s for {args.minutes:g} min (app.enqueue_many every "
              f"{TICK * 1000:.0f} ms); tables emptied with TRUNCATE"
              + (", then VACUUM ANALYZE" if args.analyze_empty else ""))
        print(f"machine:    nproc={len(os.sched_getaffinity(0))}; {bench.load_average()} at the start; the producer, "
              "the worker and PostgreSQL share these CPUs (and so may other work)")
        rows = sustained(url, rate=rate, minutes=args.minutes, logdir=Path(logs), progress=progress,
                         keep_succeeded=args.keep_succeeded, prune_interval=args.prune_interval,
                         analyze_empty=args.analyze_empty)
        print()
        print("\n".join(bench.render(rows)))
        print(f"\n  {bench.load_average()} at the end; total time {time.monotonic() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
