"""Scale: the claim and the drain on an empty pgq.jobs, then beside a backlog and a long history.

    python benchmarks/scale.py [--quick] [--finished N] [--waiting N] [--drain N] [--rounds N]
                               [--vacuum-threshold ROWS] [--index-cleanup] [--database-url URL]

Two phases on one fresh database (an embedded PostgreSQL in a temp dir, or ``--database-url``, as
benchmarks/run.py does):

1. **empty**: pgq.jobs holds only the jobs of each measurement.
2. **loaded**: first ``--finished`` jobs (10,000,000) that succeeded long ago, kept (workers run with
   ``--keep-succeeded forever``), each with its ``pgq.results`` row, and ``--waiting`` jobs (1,000,000)
   due in the queue ``backlog``, which no worker serves, so they stay. Both are written with one
   ``INSERT … SELECT generate_series`` per million rows, in the shape workers leave behind (status,
   attempts, started_at, finished_at, worker_id, claim_token; a result of ``null``), and then
   ``VACUUM (ANALYZE)`` as autovacuum would have. The finished jobs are in the measured queue
   (``default``), the waiting ones beside it.

In each phase, ``--rounds`` times (3; the table shows the median):

- **claim latency**: ``--drain`` (50,000) no-op jobs are queued in ``default``, then pgq's CLAIM (8 jobs,
  queue ``default``) runs 1,000 times, each in a transaction rolled back, on a connection set up as a
  worker's claim connection (prepared, generic plan, sequential scans off), timed by this process (a
  round trip and the statement). In the loaded phase also from the queue ``backlog`` (1,000,000 deep).
- **drain rate**: one worker process (``pgq worker -c 8``, as run.py) drains those jobs. jobs/s = jobs /
  (last finished_at − first started_at), on the database clock. The connections it opens are counted
  in pg_stat_activity by application_name while it drains.

Then the size of pgq.jobs and pgq.results (pg_total_relation_size; the heap and each index), and what
``pgq doctor`` says. Target: the loaded phase's claim p99 and drain rate within 20 % of the empty
phase's.

``--vacuum-threshold`` and ``--index-cleanup`` change pgq.jobs's vacuum settings before the loaded phase:
with pgq's own, the claim's buffers grow with every drain on a large table (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `python benchmarks/scale.py` puts benchmarks/ first, not the repo root

import psycopg  # noqa: E402

import pgq  # noqa: E402
from benchmarks import tasks  # noqa: E402
from benchmarks.run import (  # noqa: E402
    CONCURRENCY,
    checkpoint,
    fresh_database,
    percentile,
    prefill,
    server,
    source_revision,
    sql_one,
    wait_for,
    workers,
)
from pgq import db  # noqa: E402
from pgq import sql as pgq_sql  # noqa: E402

PROBES = 1000
_CLAIM_KEYS = ("claim p50", "claim p99", "server p50", "server p99", "buffers")
KEYS = (*_CLAIM_KEYS, "drain", *("backlog " + key for key in _CLAIM_KEYS))
CHUNK = 1_000_000  # rows per INSERT … SELECT: one transaction each, so progress shows and WAL recycles
WORKER_CMD = ["-A", "benchmarks.tasks", "worker", "-c", str(CONCURRENCY), "-l", "warning",
              "--keep-succeeded", "forever"]

# The history: jobs that succeeded over the last 30 days, one every few ms, in the shape a worker leaves.
FINISHED_SQL = """
INSERT INTO pgq.jobs (queue, task_name, args, kwargs, status, attempts, worker_id, claim_token,
                      run_at, created_at, started_at, finished_at)
SELECT 'default', 'bench.noop', '[]', '{}', 'succeeded', 1, 'bench-host:' || (i %% 50) || ':0000abcd',
       floor(random() * 4503599627370496)::bigint, t, t, t + interval '3 ms', t + interval '5 ms'
FROM generate_series(%(first)s::bigint, %(last)s::bigint) AS g(i)
CROSS JOIN LATERAL (SELECT now() - interval '30 days'
                           + make_interval(secs => i * 2592000.0 / %(total)s) AS t) AS s
"""
RESULTS_SQL = """
INSERT INTO pgq.results (job_id, status, result, created_at)
SELECT id, 'succeeded', 'null'::jsonb, finished_at FROM pgq.jobs
WHERE status = 'succeeded' AND id > %(after)s AND id <= %(upto)s
"""
# A due backlog in a queue no worker serves.
WAITING_SQL = """
INSERT INTO pgq.jobs (queue, task_name, args, kwargs, run_at, created_at)
SELECT 'backlog', 'bench.noop', '[]', '{}', now() - interval '1 hour', now() - interval '1 hour'
FROM generate_series(1, %(n)s::bigint)
"""
SIZES_SQL = """
SELECT c.relname, pg_relation_size(c.oid), pg_total_relation_size(c.oid) FROM pg_class AS c
JOIN pg_namespace AS n ON n.oid = c.relnamespace
WHERE n.nspname = 'pgq' AND c.relname IN ('jobs', 'results')
UNION ALL
SELECT i.indexrelid::regclass::text, pg_relation_size(i.indexrelid), NULL FROM pg_index AS i
WHERE i.indrelid IN ('pgq.jobs'::regclass, 'pgq.results'::regclass)
ORDER BY 3 DESC NULLS LAST, 2 DESC
"""
SESSIONS_SQL = """
SELECT application_name, count(*) FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'
GROUP BY 1 ORDER BY 1
"""


def mb(n: int | None) -> str:
    return "" if n is None else f"{n / 2**20:,.1f} MB"


def load(url: str, finished: int, waiting: int) -> None:
    """Write the history and the backlog, then vacuum and analyze."""
    with psycopg.connect(url, autocommit=True) as conn:
        began = time.monotonic()
        for first in range(1, finished + 1, CHUNK):
            last = min(finished, first + CHUNK - 1)
            after = conn.execute("SELECT coalesce(max(id), 0) FROM pgq.jobs").fetchone()[0]  # type: ignore[index]
            conn.execute(FINISHED_SQL, {"first": first, "last": last, "total": finished})
            upto = conn.execute("SELECT max(id) FROM pgq.jobs").fetchone()[0]  # type: ignore[index]
            conn.execute(RESULTS_SQL, {"after": after, "upto": upto})
            print(f"    {last:,} finished jobs and their results ({time.monotonic() - began:.0f} s)")
        for done in range(0, waiting, CHUNK):
            conn.execute(WAITING_SQL, {"n": min(CHUNK, waiting - done)})
        print(f"    {waiting:,} waiting jobs in 'backlog' ({time.monotonic() - began:.0f} s)")
        conn.execute("VACUUM (ANALYZE) pgq.jobs")
        conn.execute("VACUUM (ANALYZE) pgq.results")
        print(f"    vacuumed and analyzed ({time.monotonic() - began:.0f} s)")
    checkpoint(url)


def claim_probe(url: str, queue: str) -> tuple[list[float], list[float], list[int]]:
    """PROBES claims of 8 jobs from *queue*, each rolled back, on a worker-like connection: milliseconds
    each took as this process saw it; then as many under EXPLAIN (ANALYZE, BUFFERS, TIMING OFF): the
    server's execution time (no round trip, no client) and the buffers each touched, which no load on
    the machine changes."""
    times, server, buffers = [], [], []
    with db.connect(url, role="worker", settings={"plan_cache_mode": "force_generic_plan"}) as conn:
        params = {"queues": [queue], "limit": CONCURRENCY, "worker_id": "probe"}
        for _ in range(PROBES):
            began = time.perf_counter()
            rows = conn.execute(pgq_sql.CLAIM, params).fetchall()
            times.append((time.perf_counter() - began) * 1000)
            conn.rollback()
            assert len(rows) == CONCURRENCY, f"the probe claimed {len(rows)} jobs from {queue}"
        for _ in range(PROBES):
            [[doc]] = conn.execute("EXPLAIN (ANALYZE, BUFFERS, TIMING OFF, FORMAT JSON) " + pgq_sql.CLAIM,
                                   params).fetchall()
            conn.rollback()
            top = doc[0] if isinstance(doc, list) else doc
            server.append(top["Execution Time"])
            buffers.append(top["Plan"].get("Shared Hit Blocks", 0) + top["Plan"].get("Shared Read Blocks", 0))
    return times[10:], server[10:], buffers[10:]  # the first ones plan and warm the connection


def drain(url: str, n: int, logdir: Path, label: str) -> tuple[float, dict[str, int]]:
    """jobs/s of one worker draining the *n* jobs queued in 'default', and the most sessions it held by
    application_name."""
    after = int(sql_one(url, "SELECT coalesce(max(id), 0) - %s FROM pgq.jobs WHERE queue = 'default'", (n,)))
    sessions: dict[str, int] = {}
    with psycopg.connect(url, autocommit=True) as conn:
        def drained() -> bool:
            for name, count in conn.execute(SESSIONS_SQL):
                sessions[name] = max(sessions.get(name, 0), count)
            return not conn.execute("SELECT EXISTS (SELECT 1 FROM pgq.jobs WHERE queue = 'default' "
                                    "AND status IN ('queued', 'retrying', 'running'))").fetchone()[0]  # type: ignore[index]

        cmd = [sys.executable, "-m", "pgq.cli", "--database-url", url, *WORKER_CMD]
        with workers(url, 1, logdir, label, cmd) as procs:
            wait_for(drained, 600, procs, interval=0.05, what=f"{label}: {n} jobs to drain")
        done, seconds = conn.execute(
            "SELECT count(*), extract(epoch FROM max(finished_at) - min(started_at))::float8 FROM pgq.jobs "
            "WHERE queue = 'default' AND id > %s AND status = 'succeeded'", (after,)).fetchone()  # type: ignore[misc]
    assert done == n, f"{label}: {done} of {n} jobs succeeded"
    return done / seconds, sessions


def phase(url: str, label: str, args: argparse.Namespace, logdir: Path) -> dict[str, list[float]]:
    found: dict[str, list[float]] = {key: [] for key in KEYS}
    queues = {"": "default", "backlog ": "backlog"} if label == "loaded" else {"": "default"}
    for r in range(1, args.rounds + 1):
        prefill(url, tasks.noop, args.drain)
        for prefix, queue in queues.items():
            times, server, buffers = claim_probe(url, queue)
            found[prefix + "claim p50"].append(statistics.median(times))
            found[prefix + "claim p99"].append(percentile(times, 99))
            found[prefix + "server p50"].append(statistics.median(server))
            found[prefix + "server p99"].append(percentile(server, 99))
            found[prefix + "buffers"].append(statistics.median(buffers))
            print(f"  {label} round {r}, claim from '{queue}': p50 {statistics.median(times):.2f} ms, "
                  f"p99 {percentile(times, 99):.2f} ms; on the server p50 {statistics.median(server):.3f} ms, "
                  f"p99 {percentile(server, 99):.3f} ms, {statistics.median(buffers):.0f} buffers")
        rate, sessions = drain(url, args.drain, logdir, f"{label}-{r}")
        found["drain"].append(rate)
        print(f"  {label} round {r}: drain {rate:,.0f} jobs/s")
        if r == 1:
            print("    sessions of the draining worker (most seen at once): "
                  + ", ".join(f"{name or '(none)'} {count}" for name, count in sorted(sessions.items())))
    return found


def report_sizes(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        live = dict(conn.execute("SELECT status, count(*) FROM pgq.jobs GROUP BY 1").fetchall())
        print(f"  rows: {', '.join(f'{s} {c:,}' for s, c in sorted(live.items()))}")
        for name, own, total in conn.execute(SIZES_SQL):
            print(f"    {name:<40} {mb(own):>14}" + (f"   total {mb(total)}" if total is not None else ""))


def doctor(url: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "pgq.cli", "--database-url", url, "doctor"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False)
    print(f"  pgq doctor (exit {proc.returncode}):")
    print("    " + (proc.stdout + proc.stderr).strip().replace("\n", "\n    "))


def main(argv: list[str] | None = None) -> int:
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="100,000 finished, 100,000 waiting, drains of 5,000, 1 round: about a minute")
    parser.add_argument("--finished", type=int, help="finished jobs kept [default: 10,000,000]")
    parser.add_argument("--waiting", type=int, help="jobs waiting in another queue [default: 1,000,000]")
    parser.add_argument("--drain", type=int, help="jobs per drain and claim probe [default: 50,000]")
    parser.add_argument("--rounds", type=int, help="measurements per phase [default: 3]")
    parser.add_argument("--vacuum-threshold", type=int, metavar="ROWS",
                        help="before the loaded phase, make autovacuum of pgq.jobs start after ROWS dead rows "
                             "whatever the table's size (autovacuum_vacuum_scale_factor = 0) instead of after "
                             "2 %% of the table [default: pgq's migration's settings]")
    parser.add_argument("--index-cleanup", action="store_true",
                        help="before the loaded phase, ALTER TABLE pgq.jobs SET (vacuum_index_cleanup = on): "
                             "vacuum cleans the indexes even when few heap pages hold dead rows [default: "
                             "PostgreSQL's auto]")
    parser.add_argument("--database-url", default=None,
                        help="server to use (a fresh database is created on it) [default: an embedded "
                             "PostgreSQL in a temp dir]")
    args = parser.parse_args(argv)
    quick = {"finished": 100_000, "waiting": 100_000, "drain": 5_000, "rounds": 1}
    full = {"finished": 10_000_000, "waiting": 1_000_000, "drain": 50_000, "rounds": 3}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    print(f"scale: {args.finished:,} finished jobs kept, {args.waiting:,} waiting in another queue, drains of "
          f"{args.drain:,} with `pgq worker -c {CONCURRENCY}`, {args.rounds} round(s), {source_revision()}")
    began = time.monotonic()
    results = {}
    with tempfile.TemporaryDirectory(prefix="pgq-scale-logs-") as logs, \
            server(args.database_url) as (admin_url, where), fresh_database(admin_url) as url:
        print(f"  server: {where}")
        pgq.App(url).migrate()
        tasks.app.set_database_url(url)
        # A first drain, not counted: a cold server and a worker's first plans would weigh on the empty phase.
        prefill(url, tasks.noop, min(args.drain, 5_000))
        drain(url, min(args.drain, 5_000), Path(logs), "warm-up")
        results["empty"] = phase(url, "empty", args, Path(logs))
        report_sizes(url)
        print(f"  loading ({time.monotonic() - began:.0f} s in):")
        load(url, args.finished, args.waiting)
        if args.vacuum_threshold is not None:
            with psycopg.connect(url, autocommit=True) as conn:  # a storage parameter cannot be bound: an int
                conn.execute(f"ALTER TABLE pgq.jobs SET (autovacuum_vacuum_scale_factor = 0, "
                             f"autovacuum_vacuum_threshold = {int(args.vacuum_threshold)})")
            print(f"  pgq.jobs: autovacuum after {args.vacuum_threshold:,} dead rows, whatever its size")
        if args.index_cleanup:
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("ALTER TABLE pgq.jobs SET (vacuum_index_cleanup = on)")
            print("  pgq.jobs: vacuum_index_cleanup = on")
        results["loaded"] = phase(url, "loaded", args, Path(logs))
        report_sizes(url)
        doctor(url)
        tasks.app.close()
    print("\n  median of the rounds             empty       loaded          loaded / empty")
    for key in KEYS:
        unit = "jobs/s" if key == "drain" else "" if key.endswith("buffers") else "ms"
        loaded = statistics.median(results["loaded"][key])
        if key.startswith("backlog"):
            print(f"  {key:<29} {'':>10} {loaded:>12,.3f} {unit:<7}")
            continue
        empty = statistics.median(results["empty"][key])
        print(f"  {key:<29} {empty:>10,.3f} {loaded:>12,.3f} {unit:<7} {loaded / empty:8.2f}")
    print(f"\n  total {time.monotonic() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
