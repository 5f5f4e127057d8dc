"""Periodic tasks: the pure tick arithmetic (daylight saving time included), the scheduler against the real
database, several scheduler processes racing for the same ticks, missed-tick policies, ``pgq periodic
list``, and ``pgq worker -B`` end to end.

Nothing sleeps for a fixed time: every wait is ``wait_for`` with a deadline, on a condition read from the
database or from a process's output.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import psycopg
import psycopg.sql
import pytest
from click.testing import CliRunner
from psycopg.conninfo import make_conninfo

import pgq
from pgq import periodic, sql
from pgq.cli import main
from pgq.periodic import Fired, Schedule, ScheduleError
from tests import periodic_apps
from tests.helpers import ROOT, WorkerProcess, scalar, wait_for

UTC = timezone.utc
PARIS = ZoneInfo("Europe/Paris")


def Z(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def local(ticks: list[datetime]) -> list[str]:
    return [t.astimezone(PARIS).isoformat(timespec="minutes") for t in ticks]


def simulate(schedule: Schedule, start: datetime, end: datetime, step: timedelta) -> list[datetime]:
    """What one scheduler fires, passing every *step* from *start* (its first sight) to *end*."""
    fired: list[datetime] = []
    last, now = start, start
    while now <= end:
        ticks = schedule.due(now, last)
        fired += ticks
        last = ticks[-1] if ticks else last
        now += step
    return fired


NIGHTLY = Schedule(name="nightly", task_name="t", cron="30 2 * * *", tz="Europe/Paris")
HOURLY = Schedule(name="hourly", task_name="t", cron="0 * * * *", tz="Europe/Paris")


# --- pure tick arithmetic --------------------------------------------------------------------------


def test_every_ticks_are_multiples_of_the_interval_since_the_epoch():
    s = Schedule(name="s", task_name="t", every=timedelta(seconds=30))
    assert s.latest(Z(2026, 5, 1, 12, 0, 44)) == Z(2026, 5, 1, 12, 0, 30)
    assert s.latest(Z(2026, 5, 1, 12, 0, 30)) == Z(2026, 5, 1, 12, 0, 30)  # inclusive
    assert s.next_after(Z(2026, 5, 1, 12, 0, 30)) == Z(2026, 5, 1, 12, 1, 0)  # exclusive
    # Every scheduler agrees on the ticks whenever it started; seconds work as well as a timedelta.
    assert Schedule(name="s", task_name="t", every=7200).next_after(Z(2026, 5, 1, 13, 59, 59)) == Z(2026, 5, 1, 14)
    assert s.describe() == "every 30s" and NIGHTLY.describe() == "cron 30 2 * * * (Europe/Paris)"


def test_missed_ticks_are_skipped_unless_catch_up_says_otherwise():
    now, last = Z(2026, 5, 1, 12, 10, 5), Z(2026, 5, 1, 12, 0)  # ten minutes of every=60s missed
    skip = Schedule(name="s", task_name="t", every=60)
    assert skip.due(now, last) == [Z(2026, 5, 1, 12, 10)]  # only the latest
    catch_up = Schedule(name="s", task_name="t", every=60, catch_up=3)
    assert catch_up.due(now, last) == [Z(2026, 5, 1, 12, m) for m in (7, 8, 9, 10)]  # 3 missed + the latest
    everything = Schedule(name="s", task_name="t", every=60, catch_up=100)
    assert everything.due(now, last) == [Z(2026, 5, 1, 12, m) for m in range(1, 11)]
    assert skip.due(Z(2026, 5, 1, 12, 0, 59), last) == []  # nothing new is due
    cron = Schedule(name="s", task_name="t", cron="*/5 * * * *", catch_up=1)
    assert cron.due(now, last) == [Z(2026, 5, 1, 12, 5), Z(2026, 5, 1, 12, 10)]


def test_dst_spring_forward_specific_time_fires_right_after_the_jump():
    # Europe/Paris, 2026-03-29: 02:00 CET jumps to 03:00 CEST, so 02:30 never happens that night.
    ticks = NIGHTLY.ticks_between(Z(2026, 3, 27, 12), Z(2026, 3, 31), 10)
    assert local(ticks) == ["2026-03-28T02:30+01:00", "2026-03-29T03:00+02:00", "2026-03-30T02:30+02:00"]
    assert simulate(NIGHTLY, Z(2026, 3, 28, 20), Z(2026, 3, 29, 6), timedelta(minutes=1)) == [Z(2026, 3, 29, 1)]


def test_dst_fall_back_specific_time_fires_once():
    # Europe/Paris, 2026-10-25: 03:00 CEST falls back to 02:00 CET, so 02:30 happens twice; cron fires once.
    ticks = NIGHTLY.ticks_between(Z(2026, 10, 23, 12), Z(2026, 10, 27), 10)
    assert local(ticks) == ["2026-10-24T02:30+02:00", "2026-10-25T02:30+02:00", "2026-10-26T02:30+01:00"]
    assert simulate(NIGHTLY, Z(2026, 10, 24, 20), Z(2026, 10, 25, 6), timedelta(minutes=1)) == [Z(2026, 10, 25, 0, 30)]
    # A scheduler back during the repeated hour (02:10 CET, the second pass) still finds the 02:30 CEST tick
    # it missed, and the second 02:30 is not a tick.
    assert NIGHTLY.due(Z(2026, 10, 25, 1, 10), Z(2026, 10, 24, 0, 30)) == [Z(2026, 10, 25, 0, 30)]
    assert NIGHTLY.due(Z(2026, 10, 25, 1, 40), Z(2026, 10, 25, 0, 30)) == []
    assert NIGHTLY.next_after(Z(2026, 10, 25, 1, 10)) == Z(2026, 10, 26, 1, 30)


def test_dst_hourly_fires_every_real_hour_across_both_transitions():
    spring = simulate(HOURLY, Z(2026, 3, 28, 22), Z(2026, 3, 29, 4), timedelta(minutes=1))
    assert spring == [Z(2026, 3, 28, 23)] + [Z(2026, 3, 29, h) for h in range(5)]
    assert local(spring) == ["2026-03-29T00:00+01:00", "2026-03-29T01:00+01:00", "2026-03-29T03:00+02:00",
                             "2026-03-29T04:00+02:00", "2026-03-29T05:00+02:00", "2026-03-29T06:00+02:00"]
    fall = simulate(HOURLY, Z(2026, 10, 24, 21), Z(2026, 10, 25, 3, 1), timedelta(seconds=47))
    assert fall == [Z(2026, 10, 24, 22), Z(2026, 10, 24, 23)] + [Z(2026, 10, 25, h) for h in range(4)]
    assert local(fall) == ["2026-10-25T00:00+02:00", "2026-10-25T01:00+02:00", "2026-10-25T02:00+02:00",
                           "2026-10-25T02:00+01:00", "2026-10-25T03:00+01:00", "2026-10-25T04:00+01:00"]
    # Catching up over the night lists the same real hours.
    assert HOURLY.ticks_between(Z(2026, 10, 24, 21), Z(2026, 10, 25, 3), 100) == fall


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({}, "exactly one of cron= "),
        ({"cron": "* * * * *", "every": 5}, "exactly one of cron= "),
        ({"cron": "61 * * * *"}, "bad cron expression"),
        ({"cron": "0 0 30 2 *"}, "bad cron expression"),
        ({"cron": "* * * *"}, "bad cron expression"),
        ({"cron": "0 * * * *", "tz": "Mars/Olympus"}, "unknown time zone"),
        ({"every": timedelta(milliseconds=500)}, "at least 1 s"),
        ({"every": 60, "tz": "Europe/Paris"}, "tz= applies to cron"),
        ({"every": 60, "catch_up": -1}, "catch_up must be"),
        ({"every": 60, "catch_up": True}, "catch_up must be"),
        ({"every": 60, "options": {"expires": 10}}, "unsupported option(s) expires"),
        ({"every": 60, "options": {"queue": "no spaces"}}, "queue name"),
        ({"every": 60, "args": (object(),)}, "not JSON-serializable"),
    ],
)
def test_bad_schedules_are_refused_when_defined(kwargs, needle):
    app = pgq.App("postgresql://unused")
    with pytest.raises(ScheduleError, match="'s'") as info:
        app.add_periodic("t", name="s", **kwargs)
    assert needle in str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, pgq.ConfigurationError)


def test_decorator_names_duplicates_and_aliases():
    app = pgq.App("postgresql://unused")

    @app.periodic(cron="@hourly", tz="Europe/Paris", catch_up=2)
    @app.task(name="d.job")
    def job():
        return 1

    assert job() == 1  # still the task
    assert app.schedules["d.job"] == Schedule(name="d.job", task_name="d.job", cron="0 * * * *", tz="Europe/Paris",
                                              catch_up=2)
    app.add_periodic(job, cron="0 * * * *", tz="Europe/Paris", catch_up=2)  # the same again: fine
    with pytest.raises(ScheduleError, match=r"already registered as 'd\.job'; give this one its own name="):
        app.add_periodic(job, every=10)
    app.add_periodic(job, every=10, name="d.job.fast")
    with pytest.raises(ScheduleError, match=r"goes above @app\.task"):
        app.periodic(every=10)(lambda: None)


def test_celery_beat_schedule():
    app = pgq.App("postgresql://unused")

    class crontab:  # what celery.schedules.crontab keeps of its arguments (pgq reads it, never imports it)
        _orig_minute, _orig_hour, _orig_day_of_week, _orig_day_of_month, _orig_month_of_year = (
            "*/15", "8-18", "mon-fri", "*", "*")

    added = app.add_beat_schedule({
        "add-every-30": {"task": "tasks.add", "schedule": 30.0, "args": (16, 16)},
        "add-td": {"task": "tasks.add", "schedule": timedelta(minutes=5), "kwargs": {"x": 1},
                   "options": {"queue": "math", "priority": 5}},
        "cron-string": {"task": "tasks.add", "schedule": "0 7 * * 1", "tz": "America/New_York"},
        "celery-crontab": {"task": "tasks.add", "schedule": crontab()},
    })
    assert [s.name for s in added] == ["add-every-30", "add-td", "cron-string", "celery-crontab"]
    assert app.schedules["add-every-30"].every == timedelta(seconds=30)
    assert app.schedules["add-every-30"].args == (16, 16)
    assert app.schedules["add-td"].job_spec().queue == "math"
    assert app.schedules["cron-string"].tz == "America/New_York"
    assert app.schedules["celery-crontab"].cron == "*/15 8-18 * * mon-fri"
    with pytest.raises(ScheduleError, match="'bad': unknown key\\(s\\) relative"):
        app.add_beat_schedule({"bad": {"task": "t", "schedule": 5, "relative": True}})
    with pytest.raises(ScheduleError, match="'bad': missing schedule"):
        app.add_beat_schedule({"bad": {"task": "t"}})


# --- the scheduler against the real database -------------------------------------------------------


@pytest.fixture
def papp(db_url: str) -> Iterator[pgq.App]:
    """The schedules of tests/periodic_apps.py, pointed at this test's database."""
    periodic_apps.app.set_database_url(db_url)
    yield periodic_apps.app
    periodic_apps.app.close()


def _app(db_url: str, **schedules: dict) -> pgq.App:
    app = pgq.App(db_url)
    for name, when in schedules.items():
        app.add_periodic(when.pop("task", "periodic.report"), name=name, **when)
    return app


def _insert_tick(conn: psycopg.Connection, schedule: str, tick_at: datetime, task: str = "periodic.report") -> None:
    """A tick some scheduler enqueued long ago (on time), without its job."""
    conn.execute("INSERT INTO pgq.periodic_ticks (schedule, tick_at, task_name, created_at) VALUES (%s, %s, %s, %s)",
                 (schedule, tick_at, task, tick_at))


def _run_once(scheduler: periodic.Scheduler) -> list[Fired]:
    try:
        return scheduler.run_once()
    finally:
        scheduler.close()


def _now(conn: psycopg.Connection) -> datetime:
    return scalar(conn, "SELECT now()").astimezone(UTC)


def test_a_schedule_never_fired_starts_when_first_seen(db_url, conn):
    app = _app(db_url, yearly={"cron": "0 0 1 1 *"}, weekly={"every": timedelta(days=7)})
    with app.scheduler().running() as scheduler:
        wait_for(lambda: scheduler._db_now is not None, timeout=10, what="a first pass")
    # Last new year's tick is long past, but nobody had seen the schedule then: it is not a missed tick.
    assert scalar(conn, "SELECT count(*) FROM pgq.periodic_ticks") == 0
    assert scalar(conn, "SELECT count(*) FROM pgq.jobs") == 0
    app.close()


def test_run_once_enqueues_the_due_tick_once_in_the_tick_transaction(db_url, conn):
    app = _app(db_url, weekly={"every": timedelta(days=7), "args": ("weekly",), "kwargs": {"to": "a@b.c"},
                               "options": {"queue": "reports", "priority": 3}})
    schedule = app.schedules["weekly"]
    tick = schedule.latest(_now(conn))
    _insert_tick(conn, "weekly", tick - timedelta(days=7))
    first, second = app.scheduler(), app.scheduler()
    fired = _run_once(first)
    assert [(f.schedule, f.tick) for f in fired] == [("weekly", tick)]
    assert _run_once(first) == [] and _run_once(second) == []  # recorded: due for nobody any more
    row = conn.execute("SELECT t.job_id, t.enqueued_by, j.task_name, j.queue, j.priority, j.args, j.kwargs, j.status "
                       "FROM pgq.periodic_ticks t JOIN pgq.jobs j ON j.id = t.job_id "
                       "WHERE t.schedule = 'weekly' AND t.tick_at = %s", (tick,)).fetchone()
    assert row == (fired[0].job_id, first.id, "periodic.report", "reports", 3, ["weekly"], {"to": "a@b.c"}, "queued")
    assert scalar(conn, "SELECT count(*) FROM pgq.jobs") == 1
    app.close()


@pytest.mark.parametrize(("catch_up", "jobs"), [(0, 1), (3, 4), (100, 10)])
def test_missed_ticks_after_downtime(db_url, conn, catch_up, jobs):
    app = _app(db_url, weekly={"every": timedelta(days=7), "catch_up": catch_up},
               nightly={"cron": "30 2 * * *", "tz": "Europe/Paris", "catch_up": min(catch_up, 2)})
    now = _now(conn)
    latest = {name: s.latest(now) for name, s in app.schedules.items()}
    _insert_tick(conn, "weekly", latest["weekly"] - timedelta(days=70))  # ten weekly ticks missed
    _insert_tick(conn, "nightly", now - timedelta(days=10))  # about ten nightly ticks missed
    fired = _run_once(app.scheduler())
    weekly = [f.tick for f in fired if f.schedule == "weekly"]
    nightly = [f.tick for f in fired if f.schedule == "nightly"]
    assert weekly == [latest["weekly"] - timedelta(days=7 * i) for i in reversed(range(jobs))]
    assert nightly == app.schedules["nightly"].ticks_between(now - timedelta(days=10), now, min(catch_up, 2) + 1)
    assert nightly[-1] == latest["nightly"] and len(nightly) == min(catch_up, 2) + 1
    assert scalar(conn, "SELECT count(*) FROM pgq.jobs") == len(fired)
    # The inserted ticks are gone (enqueued over a day ago, and no longer the latest of their schedule); the
    # caught-up ticks stay, however old, since they were enqueued just now.
    assert scalar(conn, "SELECT count(*) FROM pgq.periodic_ticks WHERE job_id IS NOT NULL") == len(fired)
    assert scalar(conn, "SELECT count(*) FROM pgq.periodic_ticks") == len(fired)
    app.close()


@pytest.mark.parametrize("holder", ["commits", "rolls back"])
def test_a_scheduler_waits_for_the_one_holding_the_tick(db_url, conn, holder):
    """The mechanism, deterministically: a scheduler that loses the insert of a tick waits for the winner's
    transaction; if it commits, the loser enqueues nothing; if it rolls back (crashed before commit), the
    loser's insert goes through and the tick is not lost."""
    app = _app(db_url, weekly={"every": timedelta(days=7)})
    tick = app.schedules["weekly"].latest(_now(conn))
    _insert_tick(conn, "weekly", tick - timedelta(days=7))
    scheduler = app.scheduler()
    results: list[list[Fired]] = []
    with psycopg.connect(db_url) as winner:  # a transaction of its own, held open
        claimed = winner.execute(sql.PERIODIC_CLAIM_TICKS, {"schedule": "weekly", "ticks": [tick],
                                                            "task_name": "periodic.report", "enqueued_by": "winner"})
        assert len(claimed.fetchall()) == 1
        thread = threading.Thread(target=lambda: results.append(_run_once(scheduler)))
        thread.start()
        wait_for(lambda: scalar(conn, "SELECT count(*) FROM pg_stat_activity WHERE application_name = "
                                      "'pgq-scheduler' AND wait_event_type = 'Lock' AND datname = current_database()"),
                 timeout=10,
                 what="the second scheduler to wait on the tick's key")
        winner.commit() if holder == "commits" else winner.rollback()
        thread.join(timeout=10)
    if holder == "commits":
        assert results == [[]] and scheduler.lost == 1
        assert scalar(conn, "SELECT enqueued_by FROM pgq.periodic_ticks WHERE tick_at = %s", (tick,)) == "winner"
    else:
        assert [f.tick for f in results[0]] == [tick] and scheduler.lost == 0
        assert scalar(conn, "SELECT count(*) FROM pgq.jobs") == 1
    app.close()


def test_old_ticks_are_pruned_but_the_latest_of_each_schedule_stays(db_url, conn):
    now = _now(conn)
    for schedule, ages in {"a": [72, 48, 1], "b": [120], "c": [0.1]}.items():
        for hours in ages:
            _insert_tick(conn, schedule, now - timedelta(hours=hours))
    app = _app(db_url, yearly={"cron": "0 0 1 1 *"})
    _run_once(app.scheduler(keep_ticks=timedelta(days=1)))
    rows = conn.execute("SELECT schedule, round(extract(epoch FROM %s - tick_at) / 3600) FROM pgq.periodic_ticks "
                        "ORDER BY 1, 2", (now,)).fetchall()
    assert [(s, int(h)) for s, h in rows] == [("a", 1), ("b", 120), ("c", 0)]
    app.close()


def test_scheduler_role_has_just_enough_grants(db_url, conn):
    """`pgq grants --kind scheduler`: enqueue ticks, prune them, list them; nothing else is needed."""
    role = f"pgq_scheduler_{uuid.uuid4().hex[:8]}"
    conn.execute(psycopg.sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'secret-pw'").format(psycopg.sql.Identifier(role)))
    try:
        runner = CliRunner()
        granted = runner.invoke(main, ["--database-url", db_url, "grants", "--role", role, "--kind", "scheduler",
                                       "--apply"])
        assert granted.exit_code == 0, granted.output
        url = make_conninfo(db_url, user=role, password="secret-pw")
        app = _app(url, weekly={"every": timedelta(days=7)})
        tick = app.schedules["weekly"].latest(_now(conn))
        _insert_tick(conn, "weekly", tick - timedelta(days=7))
        assert [f.tick for f in _run_once(app.scheduler(keep_ticks=timedelta(0)))] == [tick]  # and pruned
        assert scalar(conn, "SELECT count(*) FROM pgq.periodic_ticks") == 1
        listed = runner.invoke(main, ["--database-url", url, "periodic", "list"])
        assert listed.exit_code == 0 and "weekly" in listed.output, listed.output
        app.close()
    finally:
        conn.execute(psycopg.sql.SQL("DROP OWNED BY {}").format(psycopg.sql.Identifier(role)))
        conn.execute(psycopg.sql.SQL("DROP ROLE {}").format(psycopg.sql.Identifier(role)))


# --- several scheduler processes racing -----------------------------------------------------------


class BeatProcess:
    """A real ``pgq beat`` subprocess running the schedules of tests/periodic_apps.py."""

    def __init__(self, db_url: str, log_path: Path):
        cmd = [sys.executable, "-m", "pgq.cli", "--database-url", db_url, "-A", "tests.periodic_apps",
               "-l", "debug", "beat"]
        self.log_path = log_path
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


@pytest.fixture
def spawn_beat(db_url: str, tmp_path: Path) -> Iterator[Callable[[], BeatProcess]]:
    started: list[BeatProcess] = []

    def start() -> BeatProcess:
        beat = BeatProcess(db_url, tmp_path / f"beat-{len(started)}.log")
        started.append(beat)
        return beat

    yield start
    for beat in started:
        code = beat.stop()
        print(f"--- output of pgq beat {beat.proc.pid} (exit {code}) ---\n{beat.output()}")


def test_racing_scheduler_processes_enqueue_each_tick_exactly_once(db_url, conn, spawn_beat):
    n = 4
    beats = [spawn_beat() for _ in range(n)]

    def all_started() -> bool:
        for beat in beats:
            if beat.proc.poll() is not None:
                raise AssertionError(f"pgq beat exited with {beat.proc.returncode}:\n{beat.output()}")
        return all(" started: " in beat.output() for beat in beats)

    wait_for(all_started, timeout=30, what=f"{n} pgq beat processes to start")
    since = _now(conn)  # from here on, all four race for every tick
    name = periodic_apps.EVERY_SECOND

    def ticks_since() -> int:
        return scalar(conn, "SELECT count(*) FROM pgq.periodic_ticks WHERE schedule = %s AND tick_at > %s",
                      (name, since))

    wait_for(lambda: ticks_since() >= 5, timeout=20, what="five ticks of the every-second schedule")
    codes = [beat.stop() for beat in beats]
    assert codes == [0] * n, codes

    ticks = conn.execute(
        "SELECT t.tick_at, t.job_id, t.enqueued_by, (SELECT count(*) FROM pgq.jobs j WHERE j.id = t.job_id) "
        "FROM pgq.periodic_ticks t WHERE t.schedule = %s ORDER BY t.tick_at", (name,)).fetchall()
    jobs = scalar(conn, "SELECT count(*) FROM pgq.jobs WHERE task_name = %s", (name,))
    raced = [t for t in ticks if t[0] > since]
    span = round((raced[-1][0] - raced[0][0]).total_seconds()) + 1
    winners = {t[2] for t in ticks}
    lost = sum(int(line.split("periodic.every_second: ")[1].split()[0]) for beat in beats
               for line in beat.output().splitlines() if "already enqueued by another scheduler" in line
               and "periodic.every_second" in line)
    print(f"{n} schedulers x {len(ticks)} ticks ({len(raced)} with all {n} racing, spanning {span} s) -> "
          f"jobs expected {len(ticks)}, got {jobs}; ticks won by {len(winners)} different schedulers; "
          f"{lost} tick insert(s) lost to another scheduler")
    assert jobs == len(ticks), f"expected {len(ticks)} jobs (one per tick), got {jobs}"
    assert all(t[1] is not None and t[3] == 1 for t in ticks), "a tick without exactly one job"
    assert len({t[1] for t in ticks}) == len(ticks)
    assert len(raced) == span, f"a tick was skipped: {len(raced)} ticks over {span} s"


# --- the CLI ----------------------------------------------------------------------------------------


def test_periodic_list_shows_next_fire_and_last_tick(papp, db_url, conn):
    now = _now(conn)
    _insert_tick(conn, "nightly-report", now - timedelta(days=3))  # the nightly report missed a few nights
    _insert_tick(conn, "retired-schedule", now - timedelta(days=2), task="old.task")
    fired = [f for f in _run_once(papp.scheduler()) if f.schedule == "nightly-report"]
    assert len(fired) == 1
    runner = CliRunner()
    result = runner.invoke(main, ["--database-url", db_url, "-A", "tests.periodic_apps", "periodic", "list"])
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.output.splitlines()}
    assert lines["schedule"].split() == ["schedule", "task", "when", "next", "fire", "last", "tick", "last", "job"]
    nightly = lines["nightly-report"]
    schedule = papp.schedules["nightly-report"]
    after = _now(conn)
    assert "cron 30 2 * * * (Europe/Paris)" in nightly
    assert fired[0].tick.astimezone(PARIS).isoformat(sep=" ") in nightly  # the last tick, in Paris time
    assert schedule.next_after(after).astimezone(PARIS).isoformat(sep=" ") in nightly
    assert f"{fired[0].job_id} queued" in nightly
    assert "never" in lines["weekly-digest"] and "cron 0 9 * * mon (Europe/Paris)" in lines["weekly-digest"]
    assert "every 1s" in lines[periodic_apps.EVERY_SECOND]
    assert "(not in this app)" in lines["retired-schedule"] and "old.task" in lines["retired-schedule"]

    as_json = json.loads(runner.invoke(main, ["--database-url", db_url, "-A", "tests.periodic_apps", "periodic",
                                              "list", "--json"]).output)
    by_name = {s["name"]: s for s in as_json["schedules"]}
    assert set(by_name) == {*papp.schedules, "retired-schedule"}
    assert by_name["nightly-report"]["last_job_id"] == fired[0].job_id
    assert datetime.fromisoformat(by_name["nightly-report"]["last_tick"]) == fired[0].tick
    assert by_name["weekly-digest"]["last_tick"] is None
    assert by_name["retired-schedule"]["next_fire"] is None

    bare = runner.invoke(main, ["--database-url", db_url, "periodic", "list"])  # no -A: what the database knows
    assert "nightly-report" in bare.output and "(not in this app)" in bare.output


def test_unmigrated_database_is_one_line_for_beat_and_worker_b(empty_db_url):
    runner = CliRunner()
    for args in (["beat"], ["worker", "-B"], ["periodic", "list"]):
        result = runner.invoke(main, ["--database-url", empty_db_url, "-A", "tests.periodic_apps", *args])
        assert result.exit_code == 1, result.output
        err = result.stderr.strip()
        assert err.count("\n") == 0 and err.startswith("Error: ") and "pgq migrate" in err, err


def test_worker_with_beat_runs_periodic_jobs_end_to_end(db_url, conn):
    worker = WorkerProcess(db_url, "-B", "-c", "2", app="tests.periodic_apps")
    try:
        def succeeded() -> list:
            if worker.proc.poll() is not None:
                raise AssertionError(f"worker -B exited with {worker.proc.returncode}:\n{worker.output()}")
            return conn.execute("SELECT j.id FROM pgq.jobs j JOIN pgq.periodic_ticks t ON t.job_id = j.id "
                                "WHERE j.task_name = %s AND j.status = 'succeeded'",
                                (periodic_apps.EVERY_SECOND,)).fetchall()

        done = wait_for(lambda: len(succeeded()) >= 2 and succeeded(), timeout=20,
                        what="two ticks of the every-second schedule to run")
        app = pgq.App(db_url)
        assert [app.result(job_id).get(timeout=5) for (job_id,) in done[:2]] == ["tick", "tick"]
        app.close()
        worker.signal(signal.SIGTERM)
        assert worker.wait(timeout=20) == 0
        output = worker.output()
        assert f"started: {periodic_apps.EVERY_SECOND} (every 1s)" in output
        assert re.search(r"scheduler \S+ stopped", output), output
    finally:
        print(worker.stop())


def test_scheduler_loop_survives_a_lost_database(caplog):
    """A scheduler whose database is unreachable keeps retrying with backoff instead of dying."""
    app = _app("postgresql://u:p@127.0.0.1:1/x", weekly={"every": timedelta(days=7)})
    scheduler = app.scheduler()
    thread = threading.Thread(target=scheduler.loop, daemon=True)
    thread.start()

    def retries() -> int:
        return sum("database unavailable (scheduler)" in r.getMessage() for r in caplog.records)

    wait_for(lambda: retries() >= 3, timeout=10, what="three retries")
    assert thread.is_alive()
    scheduler.stop()
    thread.join(timeout=10)
    assert not thread.is_alive() and scheduler.error is None
    assert periodic.Scheduler(app).sleep_time() == 5.0  # no pass yet: the longest sleep
