"""Fault tests: real worker processes, a real PostgreSQL, and things breaking on purpose.

Each test counts every execution (tests/fault_apps.py records them) and asserts exact totals:
nothing lost, nothing succeeded twice, no two executions of one job overlapping while a lease was valid.
"""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

import psutil
import psycopg
import pytest

import pgq
from tests import fault_apps
from tests.helpers import ROOT, WorkerProcess, scalar, wait_for, wait_registered

APP = "tests.fault_apps"


class Fleet:
    """Worker processes that can be killed and replaced."""

    def __init__(self, db_url: str, size: int, *args: str, env: dict[str, str] | None = None):
        self.db_url, self.args, self.env = db_url, args, env
        self.workers = [self._spawn() for _ in range(size)]
        self.kills = 0
        self.killed_at: dict[int, object] = {}  # pid -> database time just after the process was gone
        self.outputs: list[str] = []

    def _spawn(self) -> WorkerProcess:
        return WorkerProcess(self.db_url, *self.args, app=APP, env=self.env)

    def kill_one(self) -> None:
        self.kill(random.choice(self.workers).pid)

    def kill(self, pid: int) -> None:
        """SIGKILL the worker *pid*, note the database time once it is gone, and start a replacement."""
        [victim] = [w for w in self.workers if w.pid == pid]
        victim.kill()  # returns once the process has exited
        with psycopg.connect(self.db_url) as c:
            self.killed_at[victim.pid] = c.execute("SELECT clock_timestamp()").fetchone()[0]
        self.kills += 1
        self.outputs.append(victim.stop())
        self.workers[self.workers.index(victim)] = self._spawn()

    def replace_dead(self) -> int:
        replaced = 0
        for i, w in enumerate(self.workers):
            if w.proc.poll() is not None:
                self.outputs.append(w.stop())
                self.workers[i] = self._spawn()
                replaced += 1
        return replaced

    def stop(self) -> list[str]:
        self.outputs.extend(w.stop() for w in self.workers)
        return self.outputs


def _enqueue(app: pgq.App, n: int, seconds: float = 0.0) -> list[int]:
    with app.connection() as conn:
        return [fault_apps.work.apply_async(args=(seconds,), connection=conn).id for _ in range(n)]


def _succeeded(conn) -> int:
    return scalar(conn, "SELECT count(*) FROM pgq.jobs WHERE status = 'succeeded'")


def _assert_exactly_once(conn, ids: list[int], killed_at: dict[int, object] | None = None) -> dict[str, int]:
    """Every job succeeded, has one result, and no two executions of one job ever overlapped."""
    statuses = dict(conn.execute("SELECT status, count(*) FROM pgq.jobs GROUP BY status").fetchall())
    assert statuses == {"succeeded": len(ids)}, statuses
    assert scalar(conn, "SELECT count(*) FROM pgq.results WHERE status = 'succeeded'") == len(ids)
    missing = conn.execute("SELECT count(*) FROM unnest(%s::bigint[]) AS i(id) "
                           "WHERE NOT EXISTS (SELECT 1 FROM fault_runs r WHERE r.job_id = i.id)", (ids,)).fetchone()[0]
    assert missing == 0, f"{missing} jobs never ran"
    same_attempt = conn.execute("SELECT job_id, attempt, count(*) FROM fault_runs GROUP BY 1, 2 "
                                "HAVING count(*) > 1").fetchall()
    assert same_attempt == [], f"one attempt ran twice: {same_attempt}"
    # Two executions of one job overlap when the later started before the earlier ended. An execution
    # whose worker was SIGKILLed never records its end: the next one must start after the kill (its
    # process was gone), which pgq allows only once the lease expired. Executions that never ended
    # for another reason raised (their connection was terminated): the next attempt was claimed only
    # after that failure was recorded.
    killed_at = killed_at or {}
    overlaps = conn.execute("""
        SELECT a.job_id, a.attempt, b.attempt, a.pid, a.started_at, a.ended_at, k.killed_at, b.started_at
        FROM fault_runs a JOIN fault_runs b ON a.job_id = b.job_id AND a.attempt < b.attempt
        LEFT JOIN unnest(%s::int[], %s::timestamptz[]) AS k(pid, killed_at) ON k.pid = a.pid
        WHERE (a.ended_at IS NOT NULL AND b.started_at < a.ended_at)
           OR (a.ended_at IS NULL AND k.killed_at IS NOT NULL AND b.started_at < k.killed_at)
    """, (list(killed_at), list(killed_at.values()))).fetchall()
    assert overlaps == [], f"executions overlapped while a lease was valid: {overlaps[:10]}"
    runs = scalar(conn, "SELECT count(*) FROM fault_runs")
    return {"jobs": len(ids), "executions": runs, "re_executions": runs - len(ids)}


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_nothing(fapp, conn, db_url):
    random.seed(20261121)
    ids = _enqueue(fapp, 3000, seconds=0.003)
    fleet = Fleet(db_url, 3, "-c", "4")
    try:
        deadline = time.monotonic() + 45
        while fleet.kills < 20 and time.monotonic() < deadline and _succeeded(conn) < len(ids) * 0.9:
            time.sleep(random.uniform(0.3, 0.9))  # a random moment: claiming, running or recording
            fleet.kill_one()
        wait_for(lambda: _succeeded(conn) == len(ids), timeout=90, interval=0.2, what="every job to succeed")
    finally:
        fleet.stop()
    counts = _assert_exactly_once(conn, ids, fleet.killed_at)
    print(f"\nSIGKILL chaos: {counts}, kills={fleet.kills}")
    assert fleet.kills >= 5


@pytest.mark.slow
def test_terminated_backends_reconnect_and_wakeups_resume(fapp, conn, db_url):
    ids = _enqueue(fapp, 300, seconds=0.01)
    worker = WorkerProcess(db_url, "-c", "4", "--poll-interval", "30", app=APP)
    try:
        wait_for(lambda: _succeeded(conn) >= 60, timeout=30, what="work under way")
        killed = conn.execute("""
            SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
            WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'
        """).fetchone()[0]
        assert killed >= 3  # listener, claimer, recorder, keeper, and the tasks' own connections
        wait_for(lambda: _succeeded(conn) == len(ids), timeout=60, what="every job to succeed after the drop")
        _assert_exactly_once(conn, ids)
        # The listener is back: with a 30 s poll interval only a NOTIFY can start this job quickly.
        wait_for(lambda: scalar(conn, "SELECT count(*) FROM pg_stat_activity WHERE application_name = "
                                      "'pgq-listener' AND datname = current_database()"), what="listener back")
        started = time.monotonic()
        assert fault_apps.work.delay().get(timeout=10)
        assert time.monotonic() - started < 5
        assert worker.proc.poll() is None
    finally:
        output = worker.stop()
    assert "database unavailable" in output


@pytest.mark.slow
def test_postgres_restart_is_survived_without_spinning(fapp, conn, db_url, restart_postgres):
    ids = _enqueue(fapp, 400, seconds=0.01)
    fleet = Fleet(db_url, 2, "-c", "4", "--poll-interval", "30")
    try:
        wait_for(lambda: _succeeded(conn) >= 80, timeout=30, what="work under way")
        procs = [psutil.Process(w.pid) for w in fleet.workers]
        before = [sum(p.cpu_times()[:2]) for p in procs]
        started = time.monotonic()
        conn.close()
        restart_postgres(2.0)
        outage = time.monotonic() - started
        cpu = [sum(p.cpu_times()[:2]) - b for p, b in zip(procs, before, strict=True)]
        from psycopg import connect

        with connect(db_url, autocommit=True) as conn2:
            wait_for(lambda: _succeeded(conn2) == len(ids), timeout=90, interval=0.2, what="all jobs after restart")
            _assert_exactly_once(conn2, ids)
            assert all(w.proc.poll() is None for w in fleet.workers), "a worker exited during the outage"
            # No busy loop while the database was away: well under one core.
            assert all(c < 0.5 * outage for c in cpu), f"cpu seconds during a {outage:.1f} s outage: {cpu}"
            wait_for(lambda: scalar(conn2, "SELECT count(*) FROM pg_stat_activity WHERE application_name = "
                                           "'pgq-listener' AND datname = current_database()") == 2,
                     what="listeners back")
            assert fault_apps.work.delay().get(timeout=10)
    finally:
        outputs = fleet.stop()
    assert any("database unavailable" in o for o in outputs)


@pytest.mark.slow
def test_long_job_is_never_stolen_while_heartbeating(fapp, conn, db_url):
    fleet = Fleet(db_url, 2, "-c", "2", "--rescue-interval", "0.2")
    try:
        handle = fault_apps.long.delay(4.0)  # four lease periods
        assert handle.get(timeout=30)
    finally:
        fleet.stop()
    assert scalar(conn, "SELECT attempts FROM pgq.jobs WHERE id = %s", (handle.id,)) == 1
    assert scalar(conn, "SELECT count(*) FROM fault_runs WHERE job_id = %s", (handle.id,)) == 1


@pytest.mark.slow
def test_idle_worker_heartbeats_a_short_lease_in_time(fapp, conn, db_url):
    """An idle worker's keeper plans its next tick far out (the rescue interval, 5 s here); a job with
    a 1 s lease claimed meanwhile must still get its first heartbeat within the lease."""
    runner = WorkerProcess(db_url, "-c", "1", "-Q", "longq", "--rescue-interval", "5", app=APP)
    rescuer = WorkerProcess(db_url, "-c", "1", "-Q", "nothing", "--rescue-interval", "0.2", app=APP)
    try:
        wait_registered(conn, runner)
        wait_registered(conn, rescuer)
        handle = fault_apps.long.apply_async(args=(3.0,), queue="longq")
        assert handle.get(timeout=30)
    finally:
        runner.stop()
        rescuer.stop()
    assert scalar(conn, "SELECT attempts FROM pgq.jobs WHERE id = %s", (handle.id,)) == 1


@pytest.mark.slow
def test_poison_job_that_kills_its_worker_ends_failed(fapp, conn, db_url):
    handle = fault_apps.poison.delay()
    fleet = Fleet(db_url, 1, "-c", "1")
    deaths = 0
    try:
        deadline = time.monotonic() + 40
        while scalar(conn, "SELECT status FROM pgq.jobs WHERE id = %s", (handle.id,)) != "failed":
            assert time.monotonic() < deadline, "poison job never ended"
            deaths += fleet.replace_dead()
            time.sleep(0.05)
    finally:
        fleet.stop()
    with pytest.raises(pgq.TaskFailed, match="lost its worker on every attempt") as info:
        handle.get(timeout=1)
    assert info.value.type_name == "LeaseExpired"
    assert scalar(conn, "SELECT count(*) FROM fault_runs WHERE job_id = %s", (handle.id,)) == 2
    assert deaths >= 1


@pytest.mark.slow
def test_job_killed_again_and_again_restarts_within_its_lease_and_the_intervals(fapp, conn, db_url):
    """The worker running one job is SIGKILLed four times. Each time the job starts again on a live
    worker within lease (1 s) + rescue interval (0.5 s) + poll interval (0.5 s), on the database clock,
    however many times it was rescued before. With the task's failure backoff it would wait 2, 4, 8 and
    16 s more."""
    lease, rescue_interval, poll_interval = 1.0, 0.5, 0.5  # faults.held's lease, WorkerProcess's intervals
    margin = 1.0  # a loaded 2-core machine: the claim round trip, the task's own connection
    handle = fault_apps.held.delay(60.0)
    fleet = Fleet(db_url, 2, "-c", "1", "--shutdown-grace", "0.5")

    def start_of(attempt: int) -> tuple | None:
        return conn.execute("SELECT pid, started_at FROM fault_runs WHERE job_id = %s AND attempt = %s",
                            (handle.id, attempt)).fetchone()

    recoveries: list[float] = []
    try:
        for attempt in range(1, 5):
            pid, _ = wait_for(lambda a=attempt: start_of(a), timeout=30, what=f"attempt {attempt} to start")
            for worker in fleet.workers:  # the other worker is up, to rescue and take the job
                wait_registered(conn, worker)
            fleet.kill(pid)
            _, started = wait_for(lambda a=attempt: start_of(a + 1), timeout=30, what=f"attempt {attempt + 1}")
            recoveries.append((started - fleet.killed_at[pid]).total_seconds())
    finally:
        fleet.stop()
    print(f"\nkill -> next start, s: {[round(r, 2) for r in recoveries]}")
    bound = lease + rescue_interval + poll_interval + margin
    assert all(0 < r <= bound for r in recoveries), f"recoveries {recoveries} s, bound {bound} s"
    errors = scalar(conn, "SELECT errors FROM pgq.jobs WHERE id = %s", (handle.id,))
    assert [e["type"] for e in errors][:4] == ["LeaseExpired"] * 4  # then the shutdown's hand-back


@pytest.mark.slow
def test_sigterm_under_load_loses_nothing_and_leaves_nothing_running(fapp, conn, db_url):
    ids = _enqueue(fapp, 300, seconds=0.02)
    worker = WorkerProcess(db_url, "-c", "4", "--shutdown-grace", "10", app=APP)
    wait_for(lambda: _succeeded(conn) >= 50, timeout=30, what="work under way")
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=20) == 0
    worker.stop()
    assert scalar(conn, "SELECT count(*) FROM pgq.jobs WHERE status = 'running'") == 0
    assert _succeeded(conn) < len(ids)  # it stopped part-way
    second = WorkerProcess(db_url, "-c", "4", app=APP)
    try:
        wait_for(lambda: _succeeded(conn) == len(ids), timeout=60, what="the rest to run")
    finally:
        second.stop()
    counts = _assert_exactly_once(conn, ids)
    assert counts["re_executions"] == 0  # a graceful stop costs no job a second run


@pytest.mark.slow
@pytest.mark.parametrize("skew", [3600, -3600])
def test_worker_clock_skew_changes_nothing(fapp, conn, db_url, skew):
    env = {"PYTHONPATH": str(Path(__file__).parent / "skew") + ":" + str(ROOT), "PGQ_TEST_SKEW": str(skew)}
    worker = WorkerProcess(db_url, "-c", "2", "--rescue-interval", "0.2", app=APP, env=env)
    try:
        worker_time = float(fault_apps.when.delay().get(timeout=20))
        assert abs(worker_time - time.time() - skew) < 60  # the skew is real in the worker
        scheduled = fault_apps.work.apply_async(countdown=1.5)
        long_job = fault_apps.long.delay(2.5)  # 2.5 lease periods: a skewed lease check would steal it
        assert scheduled.get(timeout=20) and long_job.get(timeout=20)
    finally:
        worker.stop()
    early = scalar(conn, "SELECT started_at < run_at FROM pgq.jobs WHERE id = %s", (scheduled.id,))
    assert early is False
    assert scalar(conn, "SELECT attempts FROM pgq.jobs WHERE id = %s", (long_job.id,)) == 1
