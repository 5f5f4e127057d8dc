"""Recovery: how long a job whose worker is SIGKILLed waits before it starts again elsewhere.

    python benchmarks/recovery.py [--kills 20] [--workers 3] [--lease 5] [--rescue-interval 1]
                                  [--poll-interval 1] [--skew SECONDS] [--database-url URL]

Real worker processes (``python -m pgq.cli ... worker -c 1 --prefetch 0``, from the repository root as
run.py starts them; without prefetch, so that each holds only the job it runs) run ``bench.hold`` jobs,
one fewer than the workers, that sleep until killed; each job has lease_seconds ``--lease``,
``retry_backoff`` 2 (the task default) and attempts enough for every kill. Each round waits until every
worker is registered and every job is running, then, at a random moment of the next heartbeat cycle
(a third of the lease), SIGKILLs a worker running a job, reads the
database's clock_timestamp() once the process is gone, starts a replacement, and waits for each job the
victim held to start its next attempt. The recovery of a job is its next start (the database time the
task's first statement records) less the kill, both on the database clock, split into kill → rescue (the
rescue's entry in the job's ``errors``) and rescue → start.

What bounds it: the lease runs out at most ``lease`` after the kill (the last heartbeat came before it),
a live worker's rescue sweep finds it within ``--rescue-interval``, and the job is due at once; a worker
with a free slot takes it on the rescue's NOTIFY (or the rescuing worker's own wake-up), or at its next
poll. So the bound is lease + rescue interval + poll interval, and the expected value lower.

``--skew S`` runs the workers with wall clocks off by +S and -S seconds, alternately (tests/skew), to show
that the wall clock plays no part.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `python benchmarks/recovery.py` puts benchmarks/ first, not the repo root

import psycopg  # noqa: E402

import pgq  # noqa: E402
from benchmarks import tasks  # noqa: E402
from benchmarks.run import WorkerProcess, fresh_database, percentile, server, source_revision  # noqa: E402

HOLD_SECONDS = 3600.0  # the jobs run until killed; the run ends by stopping the workers


class Fleet:
    """Worker processes, each replaced when it is killed."""

    def __init__(self, url: str, args: argparse.Namespace, logdir: Path):
        self.url, self.logdir, self.spawned = url, logdir, 0
        self.base = [sys.executable, "-m", "pgq.cli", "--database-url", url, "-A", "benchmarks.tasks", "worker",
                     "-c", "1", "--prefetch", "0", "-l", "warning", "--rescue-interval", str(args.rescue_interval),
                     "--poll-interval", str(args.poll_interval), "--shutdown-grace", "1"]
        self.skew = args.skew
        self.procs = [self.spawn() for _ in range(args.workers)]

    def spawn(self) -> WorkerProcess:
        env = dict(os.environ)
        if self.skew:
            env["PYTHONPATH"] = f"{ROOT / 'tests' / 'skew'}:{ROOT}"
            env["PGQ_TEST_SKEW"] = str(self.skew if self.spawned % 2 == 0 else -self.skew)
        self.spawned += 1
        return WorkerProcess(self.url, self.logdir / f"worker-{self.spawned}.log", self.base, env)

    def kill(self, pid: int) -> None:
        [victim] = [p for p in self.procs if p.pid == pid]
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait(10)
        victim.stop()  # closes its log
        self.procs[self.procs.index(victim)] = self.spawn()

    def stop(self) -> None:
        for proc in self.procs:
            proc.stop()


def wait(condition, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)
    return value


def latest_starts(conn: psycopg.Connection) -> dict[int, tuple[int, int]]:
    """Each running job's current attempt and the pid running it, once that attempt has started."""
    rows = conn.execute(f"""
        SELECT j.id, j.attempts, r.pid FROM pgq.jobs AS j
        JOIN {tasks.RECOVERY_TABLE} AS r ON r.job_id = j.id AND r.attempt = j.attempts
        WHERE j.status = 'running'""").fetchall()
    return {job_id: (attempt, pid) for job_id, attempt, pid in rows}


def one_round(conn: psycopg.Connection, fleet: Fleet, jobs: int, lease: float) -> list[tuple[float, float]]:
    """Kill a worker running a job; (kill → rescue, kill → next start) in seconds for each job it held."""

    def ready() -> dict[int, tuple[int, int]] | None:
        pids = {p.pid for p in fleet.procs}
        registered = {r[0] for r in conn.execute("SELECT pid FROM pgq.workers")}
        running = latest_starts(conn)
        return running if len(running) == jobs and pids <= registered else None

    running = wait(ready, 60, "every worker registered and every job running")
    time.sleep(random.uniform(0, lease / 3))  # a random moment between two heartbeats, not a wait
    victim = random.choice(sorted({pid for _, pid in running.values()}))
    fleet.kill(victim)
    killed_at: datetime = conn.execute("SELECT clock_timestamp()").fetchone()[0]  # type: ignore[index]
    lost = [(job_id, attempt) for job_id, (attempt, pid) in running.items() if pid == victim]
    query = (f"SELECT r.started_at, (SELECT (e->>'at')::timestamptz FROM jsonb_array_elements(j.errors) AS e "
             f"WHERE (e->>'attempt')::int = %s AND e->>'type' = 'LeaseExpired') "
             f"FROM {tasks.RECOVERY_TABLE} AS r JOIN pgq.jobs AS j ON j.id = r.job_id "
             f"WHERE r.job_id = %s AND r.attempt = %s")
    results = []
    for job_id, attempt in lost:
        started, rescued = wait(lambda j=job_id, a=attempt: conn.execute(query, (a, j, a + 1)).fetchone(),
                                120, f"job {job_id} attempt {attempt + 1}")
        results.append(((rescued - killed_at).total_seconds(), (started - killed_at).total_seconds()))
    return results


def summary(label: str, values: list[float]) -> str:
    return (f"  {label:<22} p50 {statistics.median(values):6.2f} s   p95 {percentile(values, 95):6.2f} s   "
            f"max {max(values):6.2f} s")


def main(argv: list[str] | None = None) -> int:
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs [default: 20]")
    parser.add_argument("--workers", type=int, default=3, help="worker processes, -c 1 each [default: 3]")
    parser.add_argument("--lease", type=int, default=5, help="the jobs' lease_seconds [default: 5]")
    parser.add_argument("--rescue-interval", type=float, default=1.0, help="the workers' [default: 1]")
    parser.add_argument("--poll-interval", type=float, default=1.0, help="the workers' [default: 1]")
    parser.add_argument("--skew", type=float, default=0.0, metavar="SECONDS",
                        help="run the workers with wall clocks off by +S and -S seconds, alternately [default: 0]")
    parser.add_argument("--database-url", default=os.environ.get("PGQ_BENCH_DATABASE_URL"),
                        help="server to use (a fresh database is created on it) [env: PGQ_BENCH_DATABASE_URL; "
                             "default: an embedded PostgreSQL in a temp dir]")
    args = parser.parse_args(argv)
    jobs = args.workers - 1  # a worker is always free to take a rescued job at once
    bound = args.lease + args.rescue_interval + args.poll_interval
    print(f"recovery: {args.kills} SIGKILLs, {args.workers} workers -c 1, {jobs} jobs, lease {args.lease} s, "
          f"--rescue-interval {args.rescue_interval} --poll-interval {args.poll_interval}, skew ±{args.skew:g} s, "
          f"{source_revision()}; bound lease + rescue + poll = {bound:g} s")
    kill_to_rescue: list[float] = []
    kill_to_start: list[float] = []
    with tempfile.TemporaryDirectory(prefix="pgq-recovery-logs-") as logs, \
            server(args.database_url) as (admin_url, _), fresh_database(admin_url) as url:
        pgq.App(url).migrate()
        tasks.app.set_database_url(url)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"CREATE TABLE {tasks.RECOVERY_TABLE} (job_id bigint NOT NULL, attempt int NOT NULL, "
                         "pid int NOT NULL, started_at timestamptz NOT NULL)")
            for _ in range(jobs):
                tasks.hold.apply_async(args=(HOLD_SECONDS,), lease_seconds=args.lease, retry_backoff=2.0,
                                       max_attempts=args.kills + 5)
            fleet = Fleet(url, args, Path(logs))
            try:
                for n in range(1, args.kills + 1):
                    for rescue, start in one_round(conn, fleet, jobs, args.lease):
                        kill_to_rescue.append(rescue)
                        kill_to_start.append(start)
                        print(f"  kill {n:>2}: rescued after {rescue:5.2f} s, started after {start:5.2f} s")
            except TimeoutError:
                for proc in fleet.procs:
                    print(f"  worker {proc.pid} logged:\n{proc.log_tail()}", file=sys.stderr)
                raise
            finally:
                fleet.stop()
            rescues = [r[0] for r in conn.execute(
                "SELECT jsonb_array_length(errors) FROM pgq.jobs ORDER BY id").fetchall()]
        tasks.app.close()
    print(f"  rescues per job (with the hand-back at the end): {rescues}")
    print(summary("kill -> rescue", kill_to_rescue))
    print(summary("rescue -> next start", [s - r for r, s in zip(kill_to_rescue, kill_to_start, strict=True)]))
    print(summary("kill -> next start", kill_to_start))
    over = [s for s in kill_to_start if s > bound]
    print(f"  {len(over)} of {len(kill_to_start)} over the bound of {bound:g} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
