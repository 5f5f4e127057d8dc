"""Where the time of one enqueue goes: pgq's INSERT taken apart layer by layer, on one server, in one run.

    python benchmarks/enqueue_anatomy.py [--seconds 5] [--rounds 3] [--database-url URL]

Enqueueing one job per transaction (``delay()``) is the scenario where pgq trails PgQueuer (see the
README's performance section). This measures what each layer of pgq's enqueue costs, so the gap can be
read off instead of guessed. Each table variant is a copy of ``pgq.jobs`` (schema ``anatomy``) with one
more layer than the one before:

  trivial      run.py's pgbench baseline: INSERT INTO (id identity primary key, v int) VALUES (1)
  row          pgq.jobs's columns and defaults, primary key only: INSERT (queue, task_name) VALUES (...)
  + statement  the same table, pgq's own statement: pgq.sql.ENQUEUE with the values delay() binds for a
               no-argument task (13 parameters, the pgq.limits look-up that sets `limited`)
  + indexes    pgq.jobs's partial indexes (a waiting job enters two of them: the primary key and the claim index)
  + checks     pgq.jobs's CHECK constraints
  pgq.jobs     the real table: + the jobs_notify trigger (one NOTIFY per statement and queue, sent at commit)

Two numbers each:

- executor: microseconds per INSERT of a cached plan, run in a PL/pgSQL loop inside one transaction: no
  client, no network, no commit. What the table's shape costs PostgreSQL's executor per statement.
- transaction: ``pgbench -n -M prepared -c 1``, one INSERT per committed transaction (the WAL flush
  included), as transactions per second and average latency: the ceiling for a client with no cost.

Then Python clients, one INSERT per transaction: pgbench's trivial INSERT through psycopg (prepared,
execute + fetchall) and straight through libpq (what any Python client of any queue reaches at best),
pgq's statement through psycopg, and ``delay()`` itself (pgq's pool, validation and its libpq path). Wall
time per call, the rate as a share of pgbench's on the trivial table, and the producer thread's CPU per
call (time.thread_time).

Every measurement runs ``--rounds`` times, the variants interleaved, and the median is shown. Without a
URL it starts an embedded PostgreSQL as run.py does (same settings), in a fresh database.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402

import pgq  # noqa: E402
from benchmarks import run as bench  # noqa: E402
from pgq import sql  # noqa: E402

TASK = "bench.noop"
TRIVIAL = "anatomy.trivial"
TRIVIAL_INSERT = f"INSERT INTO {TRIVIAL} (v) VALUES (1) RETURNING id"
# (label, table): each a copy of pgq.jobs with one more layer; see the module docstring.
VARIANTS = [
    ("+ pgq's statement (parameters, limits look-up)", "anatomy.row"),
    ("+ pgq.jobs's other indexes (all partial)", "anatomy.indexed"),
    ("+ pgq.jobs's CHECK constraints", "anatomy.checked"),
    ("pgq.jobs: + the NOTIFY trigger", "pgq.jobs"),
]
EXECUTOR_LOOP = 20_000  # INSERTs per executor measurement
# (key, label) of the Python measurements: the trivial table first (what any Python client reaches at best),
# then pgq's own statement and delay().
PYTHON_LAYERS = [
    ("trivial-psycopg", "trivial INSERT through psycopg (prepared)"),
    ("trivial-libpq", "trivial INSERT through libpq (no psycopg)"),
    ("psycopg", "pgq's INSERT through psycopg (prepared)"),
    ("delay", "delay(): pgq's INSERT as pgq sends it"),
]


def setup(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA anatomy")
        conn.execute(f"CREATE TABLE {TRIVIAL} (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, v int NOT NULL)")
        conn.execute("CREATE TABLE anatomy.row (LIKE pgq.jobs INCLUDING DEFAULTS INCLUDING IDENTITY)")
        conn.execute("ALTER TABLE anatomy.row ADD PRIMARY KEY (id)")
        conn.execute("CREATE TABLE anatomy.indexed (LIKE pgq.jobs INCLUDING DEFAULTS INCLUDING IDENTITY "
                     "INCLUDING INDEXES)")
        conn.execute("CREATE TABLE anatomy.checked (LIKE pgq.jobs INCLUDING DEFAULTS INCLUDING IDENTITY "
                     "INCLUDING INDEXES INCLUDING CONSTRAINTS)")
        for table in ("anatomy.row", "anatomy.indexed", "anatomy.checked"):  # the same storage settings
            conn.execute(f"ALTER TABLE {table} SET (fillfactor = 80)")
        counts = conn.execute(
            "SELECT (SELECT count(*) FROM pg_index WHERE indrelid = 'pgq.jobs'::regclass),"
            " (SELECT count(*) FROM pg_constraint WHERE conrelid = 'pgq.jobs'::regclass AND contype = 'c'),"
            " (SELECT count(*) FROM pg_trigger WHERE tgrelid = 'pgq.jobs'::regclass AND NOT tgisinternal)"
        ).fetchone()
    print(f"pgq.jobs here: {counts[0]} indexes (with the primary key), {counts[1]} CHECK constraints, "
          f"{counts[2]} trigger(s)")


def executor_us(url: str, insert: str) -> float:
    """Microseconds per execution of *insert* (a cached plan) in a PL/pgSQL loop, one transaction."""
    body = f"""
        DECLARE t0 timestamptz; x bigint;
        BEGIN
            FOR i IN 1..200 LOOP {insert} RETURNING id INTO x; END LOOP;  -- warm the plan and the caches
            t0 := clock_timestamp();
            FOR i IN 1..{EXECUTOR_LOOP} LOOP {insert} RETURNING id INTO x; END LOOP;
            RETURN extract(epoch FROM clock_timestamp() - t0) * 1e6 / {EXECUTOR_LOOP};
        END"""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE OR REPLACE FUNCTION anatomy.loop() RETURNS float8 LANGUAGE plpgsql AS $body$"
                      + body + "$body$")
        with conn.transaction(force_rollback=True):  # nothing is kept, and nothing waits for the disk
            value = conn.execute("SELECT anatomy.loop()").fetchone()[0]
    return float(value)


def pgbench_tps(url: str, binary: str, script: str, seconds: int, logdir: Path) -> tuple[float, float]:
    """(tps, average latency ms) of run.py's pgbench command running *script*."""
    found, returncode, text = bench.pgbench(binary, url, script, bench.enqueue_defines(), seconds, logdir)
    if returncode != 0 or "tps" not in found or "latency" not in found:
        raise RuntimeError(f"pgbench failed (exit {returncode}): {text.strip()[-400:]}")
    return found["tps"], found["latency"]


def python_call(fn: Callable[[], object], seconds: float) -> tuple[float, float]:
    """(wall us, this thread's CPU us) per call of *fn*, called for *seconds*."""
    for _ in range(100):
        fn()
    calls = 0
    wall0, cpu0 = time.perf_counter(), time.thread_time()
    deadline = wall0 + seconds
    while time.perf_counter() < deadline:
        fn()
        calls += 1
    return (time.perf_counter() - wall0) / calls * 1e6, (time.thread_time() - cpu0) / calls * 1e6


def libpq_call(conn: psycopg.Connection, statement: str) -> Callable[[], object]:
    """*statement* as a named prepared statement, executed through libpq with psycopg's wait loop only:
    the least a Python client can do per call (pgq's PreparedEnqueue does this for delay())."""
    from psycopg import generators, pq

    conn.pgconn.prepare(b"anatomy", statement.encode())

    def call() -> object:
        conn.pgconn.send_query_prepared(b"anatomy", [])
        result = conn.wait(generators.execute(conn.pgconn))[-1]
        if result.status != pq.ExecStatus.TUPLES_OK:
            raise RuntimeError(result.error_message.decode())
        return result.get_value(0, 0)

    return call


def empty(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"TRUNCATE {TRIVIAL}, anatomy.row, anatomy.indexed, anatomy.checked, pgq.jobs")


def measure(url: str, seconds: int, rounds: int, logdir: Path, embedded: bool) -> None:
    binary = bench.pgbench_binary(embedded)
    if binary is None:
        raise SystemExit("no pgbench found (the embedded server's bin/ or PATH)")
    rows: list[tuple[str, str, str]] = [
        ("trivial: (id identity primary key, v int)", TRIVIAL, f"INSERT INTO {TRIVIAL} (v) VALUES (1)"),
        ("row: pgq.jobs's columns, primary key only", "anatomy.row",
         "INSERT INTO anatomy.row (queue, task_name) VALUES ('default', 'bench.noop')"),
    ]
    rows += [(label, table, "") for label, table in VARIANTS]
    executor: dict[str, list[float]] = {label: [] for label, _, _ in rows}
    tps: dict[str, list[tuple[float, float]]] = {label: [] for label, _, _ in rows}
    python: dict[str, list[tuple[float, float]]] = {key: [] for key, _ in PYTHON_LAYERS}

    app = pgq.App(url)
    noop = app.task(name=TASK)(lambda: None)
    params = bench.delay_params()
    for r in range(rounds):
        print(f"round {r + 1}/{rounds}", flush=True)
        for label, table, trivial in rows:
            empty(url)
            executor[label].append(executor_us(url, trivial or bench.enqueue_statement(table, "literal")))
            empty(url)
            tps[label].append(pgbench_tps(url, binary, trivial or bench.enqueue_statement(table), seconds, logdir))
        calls: dict[str, Callable[[psycopg.Connection], Callable[[], object]]] = {
            "trivial-psycopg": lambda c: lambda: c.execute(TRIVIAL_INSERT).fetchall(),
            "trivial-libpq": lambda c: libpq_call(c, TRIVIAL_INSERT),
            "psycopg": lambda c: lambda: c.execute(sql.ENQUEUE, params).fetchall(),
        }
        for key, _ in PYTHON_LAYERS:
            empty(url)
            bench.checkpoint(url)
            if key == "delay":
                python[key].append(python_call(noop.delay, seconds))
                continue
            with psycopg.connect(url, autocommit=True, prepare_threshold=0) as conn:
                python[key].append(python_call(calls[key](conn), seconds))
    app.close()
    empty(url)

    print()
    print(f"{'table / layer':48s}  {'executor us':>11s}  {'+us':>5s}  {'pgbench tps':>11s}  {'latency ms':>10s}  "
          f"{'+us':>5s}")
    before: tuple[float, float] | None = None
    for label, _, _ in rows:
        ex = statistics.median(executor[label])
        t = statistics.median(x[0] for x in tps[label])
        lat = statistics.median(x[1] for x in tps[label])
        step = "" if before is None else f"{ex - before[0]:+5.0f}"
        lat_step = "" if before is None else f"{(lat - before[1]) * 1000:+5.0f}"
        print(f"{label:48s}  {ex:11.1f}  {step:>5s}  {t:11,.0f}  {lat:10.3f}  {lat_step:>5s}")
        before = (ex, lat)
    floor = statistics.median(x[0] for x in tps[rows[0][0]])
    print()
    print(f"{'Python, one INSERT per transaction':48s}  {'wall us':>11s}  {'calls/s':>11s}  {'% of pgbench':>12s}  "
          f"{'client CPU us':>13s}")
    for key, label in PYTHON_LAYERS:
        wall = statistics.median(x[0] for x in python[key])
        cpu = statistics.median(x[1] for x in python[key])
        print(f"{label:48s}  {wall:11.0f}  {1e6 / wall:11,.0f}  {100 * 1e6 / wall / floor:11.0f}%  {cpu:13.0f}")
    print()
    print("  executor: per INSERT, cached plan, PL/pgSQL loop in one transaction (no client, no commit); "
          f"{EXECUTOR_LOOP:,} per run")
    print(f"  pgbench: -n -M prepared -c 1 -T {seconds}, one INSERT per committed transaction; "
          "+us: latency added by the layer")
    print(f"  % of pgbench: calls/s against pgbench's {floor:,.0f} tps on the trivial table (run.py's baseline)")
    print(f"  medians of {rounds} rounds; every measurement starts from empty tables")


def main(argv: list[str] | None = None) -> int:
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=5, help="pgbench -T, and seconds per Python measurement")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the median is shown [default: 3]")
    parser.add_argument("--database-url", default=None, help="server to use (a fresh database is created on it) "
                        "[default: an embedded PostgreSQL in a temp dir]")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pgq-anatomy-") as logs, \
            bench.server(args.database_url) as (admin_url, where), bench.fresh_database(admin_url) as url:
        pgq.App(url).migrate()
        print(f"server: {where}")
        with contextlib.suppress(Exception), psycopg.connect(url) as conn:
            print("PostgreSQL", conn.execute("SHOW server_version").fetchone()[0], "| fsync",
                  conn.execute("SHOW fsync").fetchone()[0], "| synchronous_commit",
                  conn.execute("SHOW synchronous_commit").fetchone()[0], "|", bench.load_average())
        setup(url)
        measure(url, args.seconds, args.rounds, Path(logs), embedded=not args.database_url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
