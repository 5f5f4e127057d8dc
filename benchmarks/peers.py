"""The peers of pgq's benchmark: PgQueuer and procrastinate, driven through their own documented APIs.

This module runs in two places:

- in pgq's environment, ``benchmarks/run.py`` imports it for the settings and the commands below (the
  module level needs nothing but the standard library, and never imports pgq);
- in the peers' own virtual environment (``benchmarks/.venv-peers``, made by run.py from
  ``benchmarks/requirements-peers.txt``), where run.py starts it as a subprocess from the repository root:

      python benchmarks/peers.py LIB install|enqueue|bulk|wake --dsn CONNINFO [...]

  Each command prints one JSON object as its last line on stdout.

Workers are the libraries' own runners, started from the repository root with the database in the
environment variable ``PGQ_BENCH_PEER_DSN`` (see :func:`worker_command`):

    python benchmarks/peers.py pgqueuer worker        (pgqueuer.run(factory, batch_size=...), as `pgq run`)
    python -m procrastinate --app=benchmarks.peers.procrastinate_app --log-level=warning worker \
        --concurrency=... --name=bench

Both peers get their no-op and wake-up tasks as ``async def`` functions, which is what each library runs
best (sync functions go to a thread pool in both).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

LIBS = ("pgqueuer", "procrastinate")
DISPLAY = {"pgqueuer": "PgQueuer", "procrastinate": "procrastinate"}
DSN_ENV = "PGQ_BENCH_PEER_DSN"

#: The table both peers' wake-up tasks write to when they are entered (run.py creates it).
WAKE_TABLE = "bench_peer_wake"
NOOP = "bench_noop"
WAKE = "bench_wake"

# --- the peers' settings ---------------------------------------------------------------------------
#
# PgQueuer (docs: guides/performance-tuning, comparisons/benchmarks, getting-started/quickstart): a factory
# yielding a manager over ONE asyncpg connection (`AsyncpgDriver`; "asyncpg achieves roughly 1.7x the
# throughput of psycopg"; "use a direct asyncpg connection (not a pool) for the QueueManager"), run by
# pgqueuer.run under uvloop, as `pgq run` does. "Increase batch_size when jobs are short-lived (< 1 s)": its
# own benchmark uses 10, the tuning guide shows 20-25; here drain throughput kept growing with the batch
# (10: 6.5k, 50: 17k, 100: 16.4-17.2k, 300: 19.9k, 1000: 20.3-20.7k jobs/s with one worker; 100: 23.0-23.5k,
# 300: 27.8-29.8k, 1000: 29.5-30.0k with two; see benchmarks/README.md). 1000 is used: about the 1,024 jobs
# pgq's adaptive prefetch holds for no-op jobs, so both claim in batches of the same order.
# max_concurrent_tasks: unset = unlimited, the default (a cap must be >= 2 x batch size and only throttles).
# Durability: the default, `durable` (logged tables), like pgq.
PGQUEUER_BATCH_SIZE = int(os.environ.get("PGQ_BENCH_PGQUEUER_BATCH_SIZE", "1000"))
PGQUEUER_MAX_CONCURRENT_TASKS: int | None = int(os.environ.get("PGQ_BENCH_PGQUEUER_MAX_CONCURRENT_TASKS", "0")) or None

# procrastinate (docs: howto/basics/worker, howto/concurrency, howto/basics/connector): the async
# `PsycopgConnector` (psycopg 3 + psycopg_pool.AsyncConnectionPool, which takes the pool's own arguments),
# `procrastinate worker --concurrency=N` with async tasks ("the main idea behind asynchronous code is to have
# concurrency"; the docs' example is 30; on this machine 4, 8, 16 and 30 drained at 400-820 jobs/s, best around
# 16). Every sub-worker needs a pool connection for its fetch and finish queries and the listener holds one
# for LISTEN, so the pool may grow to concurrency + 2 (psycopg_pool's default max_size is min_size, 4).
# delete_jobs: the default, `never` (succeeded jobs stay, like pgq's rows). listen_notify: on (default);
# fetch_job_polling_interval: the default 5 s.
PROCRASTINATE_CONCURRENCY = int(os.environ.get("PGQ_BENCH_PROCRASTINATE_CONCURRENCY", "16"))
PROCRASTINATE_POOL = {"max_size": int(os.environ.get("PGQ_BENCH_PROCRASTINATE_POOL_MAX", "0"))
                      or max(4, PROCRASTINATE_CONCURRENCY + 2)}


def settings(lib: str) -> str:
    """The configuration used, in words, for the report."""
    if lib == "pgqueuer":
        cap = PGQUEUER_MAX_CONCURRENT_TASKS
        run = f"batch_size={PGQUEUER_BATCH_SIZE}" + (f", max_concurrent_tasks={cap}" if cap else "")
        return (f"uvloop.run(pgqueuer.run(factory, {run})) - what `pgq run --batch-size {PGQUEUER_BATCH_SIZE}` "
                "does (its CLI fails in 1.6.0, see peers.py); QueueManager over one asyncpg connection "
                f"(AsyncpgDriver); batch_size={PGQUEUER_BATCH_SIZE}; max_concurrent_tasks="
                f"{cap or 'unlimited (default)'}; dequeue_timeout 30 s, heartbeat_timeout 30 s, durability "
                "'durable' (defaults); async entrypoints; producers use Queries(AsyncpgDriver(conn))")
    return (f"procrastinate --app=benchmarks.peers.procrastinate_app worker "
            f"--concurrency={PROCRASTINATE_CONCURRENCY}; PsycopgConnector (psycopg 3, AsyncConnectionPool "
            f"max_size={PROCRASTINATE_POOL['max_size']}, min_size 4); listen_notify on, "
            "fetch_job_polling_interval 5 s, delete_jobs 'never' (defaults); async tasks; producers use "
            "task.defer() / task.batch_defer() on the sync connector procrastinate picks for sync code")


def worker_command(lib: str, python: str) -> list[str]:
    """The peer's worker process (run it from the repository root, with PGQ_BENCH_PEER_DSN set)."""
    if lib == "pgqueuer":
        # `pgq run benchmarks.peers:pgqueuer_factory --batch-size N` is PgQueuer's CLI for this, but in 1.6.0
        # under typer 0.29 it dies before starting (its --log-level parser hands a str where an enum is
        # expected: "AttributeError: 'str' object has no attribute 'name'"), so the worker calls
        # `pgqueuer.run(factory, batch_size=...)`, which the CLI wraps, under uvloop as the CLI does.
        return [python, "benchmarks/peers.py", "pgqueuer", "worker"]
    return [python, "-m", "procrastinate", "--app=benchmarks.peers.procrastinate_app", "--log-level=warning",
            "worker", f"--concurrency={PROCRASTINATE_CONCURRENCY}", "--name=bench"]


def versions() -> dict[str, str]:
    """Installed versions of the peers and their drivers (in the environment this runs in)."""
    from importlib import metadata

    found = {}
    for dist in ("pgqueuer", "procrastinate", "asyncpg", "psycopg", "psycopg-binary", "psycopg-pool", "uvloop"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[dist] = metadata.version(dist)
    return found


# --- connections -----------------------------------------------------------------------------------


def dsn() -> str:
    value = os.environ.get(DSN_ENV)
    if not value:
        raise RuntimeError(f"{DSN_ENV} is not set")
    return value


def asyncpg_kwargs(conninfo: str) -> dict[str, Any]:
    """asyncpg takes URLs only; the benchmark's conninfo may be key=value (a Unix socket directory)."""
    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(conninfo)
    out: dict[str, Any] = {}
    for key, target in (("host", "host"), ("port", "port"), ("user", "user"), ("password", "password"),
                        ("dbname", "database")):
        if params.get(key) not in (None, ""):
            out[target] = int(params[key]) if key == "port" else params[key]  # type: ignore[arg-type]
    return out


async def asyncpg_connect(conninfo: str) -> Any:
    import asyncpg

    return await asyncpg.connect(**asyncpg_kwargs(conninfo))


class _Probe:
    """The connection a wake-up task records its entry on: opened by the first task (the warm-up jobs), like
    pgq's task pool, so measured jobs pay one round trip and no connect. Tasks take turns on it (an asyncpg
    connection runs one statement at a time); wake-up jobs arrive 10 ms apart, so measured jobs never wait."""

    def __init__(self, opener: Callable[[], Any]):
        self._opener = opener
        self.conn: Any = None
        self._lock: asyncio.Lock | None = None

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Any]:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self.conn is None:
                self.conn = await self._opener()
            yield self.conn


# --- PgQueuer --------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def pgqueuer_factory() -> AsyncIterator[Any]:
    """The worker's factory for ``pgq run`` (PgQueuer's quickstart shape), over one asyncpg connection."""
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.models import Job
    from pgqueuer.qm import QueueManager
    from pgqueuer.queries import Queries

    conninfo = dsn()
    connection = await asyncpg_connect(conninfo)
    probe = _Probe(lambda: asyncpg_connect(conninfo))
    qm = QueueManager(Queries(AsyncpgDriver(connection)))

    @qm.entrypoint(NOOP)
    async def noop(job: Job) -> None:
        """Does nothing."""

    @qm.entrypoint(WAKE)
    async def wake(job: Job) -> None:
        async with probe.connection() as conn:
            await conn.execute(f"INSERT INTO {WAKE_TABLE} (lib, job_id, entered_at) "
                               "VALUES ('pgqueuer', $1, clock_timestamp())", job.id)

    try:
        yield qm
    finally:
        if probe.conn is not None:
            await probe.conn.close()
        await connection.close()


async def pgqueuer_worker() -> None:
    """PgQueuer's programmatic equivalent of ``pgq run benchmarks.peers:pgqueuer_factory``: SIGTERM and
    SIGINT stop it gracefully."""
    import pgqueuer
    from pgqueuer.core import logconfig

    logconfig.setup_fancy_logger(logconfig.LogLevel.WARNING)  # as `pgq run --log-level WARNING` would
    await pgqueuer.run(pgqueuer_factory, batch_size=PGQUEUER_BATCH_SIZE,
                       max_concurrent_tasks=PGQUEUER_MAX_CONCURRENT_TASKS)


async def pgqueuer_install(conninfo: str) -> dict[str, Any]:
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.queries import Queries

    conn = await asyncpg_connect(conninfo)
    try:
        await Queries(AsyncpgDriver(conn)).install()
    finally:
        await conn.close()
    return {"installed": "pgqueuer"}


async def pgqueuer_enqueue(conninfo: str, jobs: int, cap: float) -> dict[str, Any]:
    """``Queries.enqueue(entrypoint, payload)`` one at a time: one statement, one transaction per job."""
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.queries import Queries

    conn = await asyncpg_connect(conninfo)
    try:
        queries = Queries(AsyncpgDriver(conn))
        for _ in range(20):  # warm-up: statement preparation, not counted
            await queries.enqueue(NOOP, None)
        latencies = []
        began = time.perf_counter()
        deadline = began + cap
        for _ in range(jobs):
            t = time.perf_counter()
            await queries.enqueue(NOOP, None)
            done = time.perf_counter()
            latencies.append((done - t) * 1000)
            if done > deadline:
                break
        seconds = time.perf_counter() - began
    finally:
        await conn.close()
    return {"jobs": len(latencies), "seconds": seconds, "latencies_ms": latencies, "warmup": 20}


async def pgqueuer_bulk(conninfo: str, jobs: int) -> dict[str, Any]:
    """One ``Queries.enqueue`` call with lists: PgQueuer's batch insert (one statement, one transaction)."""
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.queries import Queries

    conn = await asyncpg_connect(conninfo)
    try:
        queries = Queries(AsyncpgDriver(conn))
        began = time.perf_counter()
        ids = await queries.enqueue([NOOP] * jobs, [None] * jobs, [0] * jobs)
        seconds = time.perf_counter() - began
    finally:
        await conn.close()
    return {"jobs": len(ids), "seconds": seconds}


async def pgqueuer_wake(conninfo: str, jobs: int, interval: float, warmup: int) -> dict[str, Any]:
    """Enqueue wake-up jobs one by one in an explicit transaction on an asyncpg connection, then send
    ``COMMIT; SELECT set_config(..., clock_timestamp())`` as ONE simple-protocol message: the timestamp is
    taken by the server right after the commit (as pgq's benchmark does), then read back."""
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.queries import Queries

    conn = await asyncpg_connect(conninfo)
    try:
        queries = Queries(AsyncpgDriver(conn))

        async def enqueue_one() -> tuple[int, float]:
            await conn.execute("BEGIN")
            (job_id,) = await queries.enqueue(WAKE, None)
            await conn.execute("COMMIT; SELECT set_config('pgq_bench.commit_at', "
                               "extract(epoch FROM clock_timestamp())::text, false)")
            at = await conn.fetchval("SELECT current_setting('pgq_bench.commit_at')::float8")
            return int(job_id), float(at)

        return await _wake_loop(conninfo, "pgqueuer", enqueue_one, jobs, interval, warmup)
    finally:
        await conn.close()


# --- procrastinate ---------------------------------------------------------------------------------


def _make_procrastinate_app() -> Any:
    import procrastinate

    conninfo = dsn()
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=conninfo, **PROCRASTINATE_POOL))

    async def open_probe() -> Any:
        import psycopg

        return await psycopg.AsyncConnection.connect(conninfo, autocommit=True)

    probe = _Probe(open_probe)

    @app.task(name=NOOP)
    async def noop() -> None:
        """Does nothing."""

    @app.task(name=WAKE, pass_context=True)
    async def wake(context: Any) -> None:
        async with probe.connection() as conn:
            await conn.execute(f"INSERT INTO {WAKE_TABLE} (lib, job_id, entered_at) "
                               "VALUES ('procrastinate', %s, clock_timestamp())", (context.job.id,))

    return app


def __getattr__(name: str) -> Any:
    """``procrastinate_app`` is built on first access (the procrastinate CLI's ``--app``), so importing this
    module needs neither procrastinate nor a database."""
    if name == "procrastinate_app":
        app = _make_procrastinate_app()
        globals()[name] = app
        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def procrastinate_install(conninfo: str) -> dict[str, Any]:
    os.environ[DSN_ENV] = conninfo
    app = _make_procrastinate_app()

    async def apply() -> None:
        async with app.open_async():
            await app.schema_manager.apply_schema_async()

    asyncio.run(apply())
    return {"installed": "procrastinate"}


def procrastinate_enqueue(conninfo: str, jobs: int, cap: float) -> dict[str, Any]:
    """``task.defer()`` from one thread of a sync program, one job per call (procrastinate's function
    ``procrastinate_defer_jobs_v1`` in its own transaction)."""
    os.environ[DSN_ENV] = conninfo
    app = _make_procrastinate_app()
    task = app.tasks[NOOP]
    with app.open():
        for _ in range(20):  # warm-up: the pool's connections, not counted
            task.defer()
        latencies = []
        began = time.perf_counter()
        deadline = began + cap
        for _ in range(jobs):
            t = time.perf_counter()
            task.defer()
            done = time.perf_counter()
            latencies.append((done - t) * 1000)
            if done > deadline:
                break
        seconds = time.perf_counter() - began
    return {"jobs": len(latencies), "seconds": seconds, "latencies_ms": latencies, "warmup": 20}


def procrastinate_bulk(conninfo: str, jobs: int) -> dict[str, Any]:
    """``task.batch_defer(*kwargs)``: procrastinate's batch defer, one statement and one transaction."""
    os.environ[DSN_ENV] = conninfo
    app = _make_procrastinate_app()
    task = app.tasks[NOOP]
    with app.open():
        app.connector.get_sync_connector().execute_query_one("SELECT 1 AS one")  # a pooled connection is up
        began = time.perf_counter()
        ids = task.batch_defer(*({} for _ in range(jobs)))
        seconds = time.perf_counter() - began
    return {"jobs": len(ids), "seconds": seconds}


def procrastinate_wake(conninfo: str, jobs: int, interval: float, warmup: int) -> dict[str, Any]:
    """``task.configure(connection=conn).defer()`` in the producer's own psycopg transaction (procrastinate's
    documented way to defer atomically with your writes), then ``COMMIT; SELECT clock_timestamp()`` in ONE
    message: the same method as pgq's benchmark."""
    import psycopg

    os.environ[DSN_ENV] = conninfo
    app = _make_procrastinate_app()
    task = app.tasks[WAKE]
    with app.open(), psycopg.connect(conninfo) as producer:

        def enqueue_one() -> tuple[int, float]:
            job_id = task.configure(connection=producer).defer()
            cur = producer.execute("COMMIT; SELECT extract(epoch FROM clock_timestamp())::float8", prepare=False)
            cur.nextset()
            return int(job_id), float(cur.fetchone()[0])  # type: ignore[index]

        async def enqueue_async() -> tuple[int, float]:
            return enqueue_one()

        return asyncio.run(_wake_loop(conninfo, "procrastinate", enqueue_async, jobs, interval, warmup))


async def _wake_loop(conninfo: str, lib: str, enqueue_one: Callable[[], Any], jobs: int, interval: float,
                     warmup: int) -> dict[str, Any]:
    """Warm-up jobs (waited for: the worker is up, listening and its task connection is open), 1.5 s idle,
    then *jobs* enqueues *interval* apart. Returns the measured jobs' ids and post-commit timestamps."""
    import psycopg

    with psycopg.connect(conninfo, autocommit=True) as clock:

        def entered(ids: list[int]) -> int:
            return int(clock.execute(f"SELECT count(*) FROM {WAKE_TABLE} WHERE lib = %s AND job_id = ANY(%s)",
                                     (lib, ids)).fetchone()[0])  # type: ignore[index]

        warm = [(await enqueue_one())[0] for _ in range(warmup)]
        deadline = time.monotonic() + 60
        while entered(warm) < len(warm):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{lib}: the warm-up jobs were not run within 60 s")
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.5)  # idle: nothing due, the worker waits on NOTIFY / its poll
        ids, commit_at = [], []
        began = time.monotonic()
        for i in range(jobs):
            pause = began + i * interval - time.monotonic()
            if pause > 0:
                await asyncio.sleep(pause)
            job_id, at = await enqueue_one()
            ids.append(job_id)
            commit_at.append(at)
    return {"ids": ids, "commit_at": commit_at, "warmup": warmup}


# --- command line ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="One peer scenario; prints a JSON object on its last line.")
    parser.add_argument("lib", choices=(*LIBS, "versions"))
    parser.add_argument("command", nargs="?", choices=("install", "enqueue", "bulk", "wake", "worker"))
    parser.add_argument("--dsn", default=os.environ.get(DSN_ENV))
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--cap", type=float, default=30.0, help="seconds an enqueue run may take")
    parser.add_argument("--interval", type=float, default=0.010)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args(argv)
    if args.lib == "versions":
        print(json.dumps(versions()))
        return 0
    if not args.dsn or not args.command:
        parser.error("give a command and --dsn (or PGQ_BENCH_PEER_DSN)")
    os.environ[DSN_ENV] = args.dsn
    if args.lib == "pgqueuer":
        import uvloop

        runners: dict[str, Callable[[], Any]] = {
            "install": lambda: uvloop.run(pgqueuer_install(args.dsn)),
            "enqueue": lambda: uvloop.run(pgqueuer_enqueue(args.dsn, args.jobs, args.cap)),
            "bulk": lambda: uvloop.run(pgqueuer_bulk(args.dsn, args.jobs)),
            "wake": lambda: uvloop.run(pgqueuer_wake(args.dsn, args.jobs, args.interval, args.warmup)),
            "worker": lambda: uvloop.run(pgqueuer_worker()),
        }
    else:
        runners = {
            "install": lambda: procrastinate_install(args.dsn),
            "enqueue": lambda: procrastinate_enqueue(args.dsn, args.jobs, args.cap),
            "bulk": lambda: procrastinate_bulk(args.dsn, args.jobs),
            "wake": lambda: procrastinate_wake(args.dsn, args.jobs, args.interval, args.warmup),
        }
    if args.command not in runners:
        parser.error(f"{args.lib} has no {args.command!r} command here (its worker is its own CLI)")
    result = runners[args.command]()
    if args.command != "worker":
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    # Run as the module benchmarks.peers rather than __main__: the workers import it under that name, and
    # procrastinate warns about an App created in a __main__ module.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks import peers

    sys.exit(peers.main())
