"""Periodic tasks, on the embedded PostgreSQL unless PGQ_DATABASE_URL/DATABASE_URL is set.

    pip install -e '.[embedded]' && python examples/periodic.py

1. defines schedules the three ways pgq offers (the decorator, add_periodic, a Celery-style beat schedule);
2. runs, for about ten seconds, a worker and TWO schedulers, as two machines each running
   `pgq worker -B` would;
3. prints every periodic job as it finishes, and at the end shows that each tick was enqueued once, although
   both schedulers saw every tick fall due.

Run it twice: the second run first enqueues the latest tick each schedule missed while nothing ran (the
default skip policy; `catch_up=N` would enqueue up to N more).
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta, timezone

import pgq

app = pgq.App()


@app.periodic(every=timedelta(seconds=2))
@app.task(name="example.heartbeat")
def heartbeat() -> str:
    return f"alive at {datetime.now(timezone.utc):%H:%M:%S}"


@app.task(name="example.report")
def report(kind: str) -> str:
    return f"{kind} report written"


@app.task(name="example.add")
def add(x: int, y: int) -> int:
    return x + y


app.add_periodic(report, every=timedelta(seconds=5), args=("five-second",), name="report-5s")
# Fires at 02:30 Paris time, once, even on the nights clocks change (see docs/periodic.md).
app.add_periodic(report, cron="30 2 * * *", tz="Europe/Paris", args=("nightly",), name="nightly-report")
app.add_beat_schedule({
    "add-every-3s": {"task": "example.add", "schedule": 3, "args": (2, 3)},
})

RUN_SECONDS = 10.0

NEW_TICKS = """
SELECT t.schedule, t.tick_at, t.job_id, t.enqueued_by FROM pgq.periodic_ticks t
WHERE t.created_at >= %(since)s AND t.job_id IS NOT NULL AND NOT (t.job_id = ANY(%(seen)s))
ORDER BY t.job_id
"""

PER_SCHEDULE = """
SELECT t.schedule, count(*) AS ticks, count(DISTINCT j.id) AS jobs,
       count(DISTINCT t.enqueued_by) AS schedulers
FROM pgq.periodic_ticks t LEFT JOIN pgq.jobs j ON j.id = t.job_id
WHERE t.created_at >= %(since)s GROUP BY t.schedule ORDER BY t.schedule
"""


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="  log: %(message)s")
    app.migrate()
    with app.connection() as conn:
        since = conn.execute("SELECT now()").fetchone()[0]
    print("schedules:")
    for schedule in app.schedules.values():
        print(f"  {schedule.name:17} {schedule.task_name:18} {schedule.describe()}")

    two_schedulers = [app.scheduler(scheduler_id=f"machine-{n}") for n in (1, 2)]
    seen: list[int] = []
    print(f"\nrunning a worker and {len(two_schedulers)} schedulers for {RUN_SECONDS:.0f} s:")
    with app.worker(concurrency=4).running(), two_schedulers[0].running(), two_schedulers[1].running():
        deadline = time.monotonic() + RUN_SECONDS
        while time.monotonic() < deadline:
            with app.connection() as conn:
                rows = conn.execute(NEW_TICKS, {"since": since, "seen": seen}).fetchall()
            for name, tick, job_id, enqueued_by in rows:
                seen.append(job_id)
                value = app.result(job_id).get(timeout=30)
                print(f"  {name:17} tick {tick:%H:%M:%S}  job {job_id:<4} by {enqueued_by}: {value!r}")
            time.sleep(0.2)  # an example's polling; the tests wait on conditions instead

    print("\neach tick, enqueued exactly once (two schedulers raced for every one of them):")
    with app.connection() as conn:
        for name, ticks, jobs, schedulers in conn.execute(PER_SCHEDULE, {"since": since}).fetchall():
            verdict = "ok" if ticks == jobs else "DUPLICATES!"
            print(f"  {name:17} ticks={ticks:<3} jobs={jobs:<3} won by {schedulers} scheduler(s)  {verdict}")
    lost = sum(s.lost for s in two_schedulers)
    print(f"tick inserts that lost the race to the other scheduler (and so enqueued nothing): {lost}")


if __name__ == "__main__":
    main()
