"""Many hosts: workers in network namespaces of their own reach PostgreSQL over TCP (tests/netns.py), and
their links break. Executions are counted as in tests/test_faults.py, from files each worker process
writes, since a partitioned host cannot write to the database."""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from datetime import datetime
from pathlib import Path

import psutil
import psycopg
import psycopg.errors
import pytest
from psycopg.conninfo import conninfo_to_dict

from pgq import db
from pgq.maintenance import rescue_expired
from tests import control_apps, fault_apps, netns
from tests.helpers import scalar, wait_for, wait_registered
from tests.netns import HostWorker
from tests.pgbouncer import MISSING, pgbouncer
from tests.test_faults import _assert_exactly_once

needs_hosts = pytest.mark.skipif(bool(netns.unavailable()), reason=f"no hosts: {netns.unavailable()}")


@pytest.fixture
def network(request, db_url):
    """The hosts' network, leading straight to PostgreSQL, or (parametrized "pgbouncer") to a PgBouncer in
    transaction mode, with workers run --no-listen --no-prepare."""
    with contextlib.ExitStack() as stack:
        if getattr(request, "param", "direct") == "pgbouncer":
            if MISSING:
                pytest.skip(MISSING)
            _, _, port = stack.enter_context(pgbouncer(db_url))
            net = netns.Network(("127.0.0.1", port))
            net.worker_args = ("--no-listen", "--no-prepare")
        else:
            params = conninfo_to_dict(db_url)
            host, port = params.get("host") or "/tmp", int(params.get("port") or 5432)
            if host.startswith("/"):
                net = netns.Network(f"{host}/.s.PGSQL.{port}")
            elif host in ("localhost", "127.0.0.1"):
                net = netns.Network(("127.0.0.1", port))
            else:
                pytest.skip(f"the hosts reach the test server through this machine only, not {host}")
        stack.callback(net.close)
        yield net


@pytest.fixture
def runs_dir(tmp_path) -> Path:
    path = tmp_path / "runs"
    path.mkdir()
    path.chmod(0o777)
    return path


def _url(host: netns.Host, db_url: str) -> str:
    params = conninfo_to_dict(db_url)
    return host.url(params["dbname"], params["user"])


def _load_runs(conn, runs_dir: Path) -> list[tuple]:
    """The executions the workers' files record, into fault_runs; returns them."""
    started: dict[tuple[int, int, int], float] = {}
    ended: dict[tuple[int, int, int], tuple[float, str]] = {}
    for path in runs_dir.glob("*.runs"):
        for line in path.read_text().splitlines():
            kind, job_id, attempt, pid, at, *why = line.split()
            key = (int(job_id), int(attempt), int(pid))
            if kind == "start":
                started[key] = float(at)
            else:
                ended[key] = (float(at), why[0] if why else "")
    rows = [(*key, at, *ended.get(key, (None, None))) for key, at in started.items()]
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO fault_runs (job_id, attempt, pid, started_at, ended_at, interrupted) "
                        "VALUES (%s, %s, %s, to_timestamp(%s), to_timestamp(%s), nullif(%s, ''))", rows)
    return rows


def _claimed_by(conn, job_id: int) -> tuple[int, int | None]:
    """(attempts, pid of the worker holding the job) of a running job; (attempts, None) otherwise."""
    attempts, worker, status = conn.execute("SELECT attempts, worker_id, status FROM pgq.jobs WHERE id = %s",
                                            (job_id,)).fetchone()
    return attempts, int(worker.split(":")[1]) if worker and status == "running" else None


def test_connections_give_up_on_a_silent_network_unless_the_url_says_otherwise(db_url):
    def params(conn) -> dict[str, str]:
        return {o.keyword.decode(): (o.val or b"").decode() for o in conn.pgconn.info}

    with db.connect(db_url) as conn:
        assert {k: params(conn)[k] for k in db.TCP_TIMEOUTS} == db.TCP_TIMEOUTS
    with db.connect(f"{db_url} tcp_user_timeout=30000 keepalives_idle=60") as conn:
        assert (params(conn)["tcp_user_timeout"], params(conn)["keepalives_idle"]) == ("30000", "60")
        assert params(conn)["keepalives_count"] == "3"
    with db.connect(db_url, role="worker") as conn:
        assert scalar(conn, "SHOW idle_in_transaction_session_timeout") == "10s"
    with db.connect(f"{db_url} options='-c idle_in_transaction_session_timeout=1min'", role="worker") as conn:
        assert scalar(conn, "SHOW idle_in_transaction_session_timeout") == "1min"


def test_a_worker_session_cut_off_inside_a_transaction_ends_and_its_jobs_are_rescued(capp, conn, db_url, monkeypatch):
    """A worker cut off between the statements of a transaction (a recorder's batch) leaves its session
    idle in that transaction, holding its jobs' row locks, which the rescue skips. The server ends such a
    session after idle_in_transaction_session_timeout (pgq sets 10 s on its workers' sessions; 1 s here)."""
    monkeypatch.setitem(db.SERVER_SIDE, "idle_in_transaction_session_timeout", "1s")
    handle = control_apps.plain.delay("x")
    worker = capp.worker(concurrency=1, worker_id="gone")
    try:
        [claimed] = worker._claim(1)
    finally:
        worker._drop_claim_conn()
    conn.execute("UPDATE pgq.jobs SET lease_expires_at = now() - interval '1 second' WHERE id = %s", (handle.id,))
    cut = db.connect(db_url, role="worker", autocommit=True)
    try:
        cut.execute("BEGIN")
        cut.execute("SELECT 1 FROM pgq.jobs WHERE id = %s FOR UPDATE", (claimed.id,))  # as the batch's UPDATE
        started = time.monotonic()
        assert rescue_expired(conn) == []  # locked: skipped
        [rescued] = wait_for(lambda: rescue_expired(conn), timeout=10, interval=0.1, what="the rescue")
        took = time.monotonic() - started
        with pytest.raises(psycopg.errors.IdleInTransactionSessionTimeout):
            cut.execute("SELECT 1")
        assert cut.broken
    finally:
        cut.close()
    assert rescued[:2] == (handle.id, "retrying")
    assert took < 3, took


def _events(conn, job_id: int) -> list[tuple[str, int, datetime]]:
    return conn.execute("SELECT event, attempt, at FROM control_runs WHERE job_id = %s ORDER BY at",
                        (job_id,)).fetchall()


def test_a_worker_whose_heartbeat_hangs_stops_its_task_when_the_lease_runs_out(capp, conn):
    """The keeper's heartbeat hangs, as on a dead connection: here it waits for a lock the test holds on
    the worker's row. The worker's own clock says when the lease runs out, and the task is stopped then,
    not when the heartbeat gets through. Afterwards the job is rescued and runs again."""
    handle = control_apps.spin.delay(3.0)  # lease 2 s
    with capp.worker(concurrency=1, poll_interval=0.1, rescue_interval=0.2, worker_id="stuck").running() as worker:
        wait_for(lambda: [e[0] for e in _events(conn, handle.id)] == ["started"], what="the task to start")
        with psycopg.connect(capp.database_url) as blocker:
            blocker.execute("SELECT 1 FROM pgq.workers WHERE id = 'stuck' FOR UPDATE")
            stuck_at = scalar(blocker, "SELECT clock_timestamp()")
            wait_for(lambda: "saw is_cancelled" in [e[0] for e in _events(conn, handle.id)], timeout=10,
                     what="the task to be stopped")
            lease = scalar(conn, "SELECT lease_expires_at FROM pgq.jobs WHERE id = %s", (handle.id,))
            assert worker.held_count() == 0
            assert scalar(conn, "SELECT attempts FROM pgq.jobs WHERE id = %s", (handle.id,)) == 1
        assert handle.get(timeout=20) == "not cancelled"  # rescued, run again, by this very worker
    events = _events(conn, handle.id)
    assert [e[:2] for e in events] == [("started", 1), ("interrupted", 1), ("saw is_cancelled", 1),
                                       ("started", 2), ("finished", 2)]
    stopped = events[1][2]
    # Stopped within a lease of the last heartbeat (a third of a lease before the lock at most), and not
    # after the lease ran out in the database (noting the event takes a connection: a few ms).
    assert (stopped - stuck_at).total_seconds() < 2.0 + 0.3
    assert (stopped - lease).total_seconds() < 0.1, (stopped, lease)


def test_timeouts_are_enforced_while_the_heartbeat_hangs(fapp, conn):
    """Task timeouts need no database: they are not held up by a keeper whose heartbeat hangs."""
    with fapp.worker(concurrency=1, poll_interval=0.1, worker_id="stuck").running():
        wait_for(lambda: scalar(conn, "SELECT count(*) FROM pgq.workers WHERE id = 'stuck'"), what="registration")
        with psycopg.connect(fapp.database_url) as blocker:
            blocker.execute("SELECT 1 FROM pgq.workers WHERE id = 'stuck' FOR UPDATE")
            handle = fault_apps.spin.delay()  # timeout 0.5 s, 2 attempts, no backoff
            started = time.monotonic()
            wait_for(lambda: scalar(conn, "SELECT status FROM pgq.jobs WHERE id = %s", (handle.id,)) == "failed",
                     timeout=10, what="both attempts to time out")
            took = time.monotonic() - started
    assert took < 2.5, took
    assert scalar(conn, "SELECT attempts FROM pgq.jobs WHERE id = %s", (handle.id,)) == 2


def _runs(runs_dir: Path, pid: int) -> list[list[str]]:
    path = runs_dir / f"{pid}.runs"
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


@needs_hosts
@pytest.mark.slow
@pytest.mark.parametrize("network", ["direct", "pgbouncer"], indirect=True)
def test_partitioned_host_loses_its_jobs_to_another_and_comes_back(fapp, conn, db_url, network, runs_dir):
    """h1 is cut off with one job running for 5 leases and one that ends during the partition (its link
    leads straight to PostgreSQL, or to a PgBouncer). It stops the first itself when its lease runs out by
    its own clock; h2 rescues both and runs them again; h1's late success is refused by the fence when the
    link heals, and h1 goes back to work."""
    h1, h2 = network.host(), network.host()
    env = {"PGQ_TEST_RUNS_DIR": str(runs_dir)}
    cut = HostWorker(h1, _url(h1, db_url), "-c", "2", *network.worker_args, env=env)
    other = None
    outputs: list[str] = []
    try:
        wait_registered(conn, cut)
        long_job = fault_apps.away.delay(10.0)  # 5 leases: it lives on heartbeats
        short_job = fault_apps.away.delay(5.0)  # to end during the partition, before its lease runs out
        wait_for(lambda: len(_runs(runs_dir, cut.pid)) == 2, timeout=20, what="both jobs to start on h1")
        other = HostWorker(h2, _url(h2, db_url), "-c", "2", *network.worker_args, env=env)
        wait_registered(conn, other)
        # The cut comes 0.5 s before the short job ends: the last heartbeat was at most a third of the
        # lease (0.67 s) earlier, so the job ends with its lease still valid, and its success waits.
        short_started = next(float(r[4]) for r in _runs(runs_dir, cut.pid) if int(r[1]) == short_job.id)
        time.sleep(max(0.0, short_started + 4.5 - time.time()))  # the fault's timing, not a wait
        cut_at = time.time()
        h1.partition()
        wait_for(lambda: _claimed_by(conn, long_job.id) == (2, other.pid)
                 and _claimed_by(conn, short_job.id)[0] == 2, timeout=20, what="h2 to rescue and run both jobs")
        wait_for(lambda: "database unavailable (heartbeat)" in cut.output(), timeout=30,
                 what="h1's heartbeat to fail")
        failed_after = time.time() - cut_at
        h1.heal()
        healed_at = time.time()
        wait_for(lambda: scalar(conn, "SELECT extract(epoch FROM last_heartbeat_at)::float8 FROM pgq.workers "
                                      "WHERE pid = %s", (cut.pid,)) > healed_at, timeout=30,
                 what="h1's heartbeat to get through")
        back_after = time.time() - healed_at
        assert long_job.get(timeout=30) == short_job.get(timeout=30) == f"{other.pid}:2"  # not h1's late success
        outputs.append(other.stop())
        other = None
        more = [fault_apps.away.delay(0.2) for _ in range(4)]
        assert [h.get(timeout=60) for h in more] == [f"{cut.pid}:1"] * 4  # h1 works again, same process
    finally:
        h1.heal()
        outputs += [w.stop() for w in (cut, other) if w is not None]
    log = outputs[-1]
    assert f"job {long_job.id} faults.away attempt 1: claim lost (its 2 s lease ran out by this worker's" in log
    assert "interrupting the task" in log
    assert f"job {short_job.id} faults.away attempt 1: claim lost before its success was recorded" in log
    assert "Traceback" not in log, log
    _load_runs(conn, runs_dir)
    counts = _assert_exactly_once(conn, [long_job.id, short_job.id] + [h.id for h in more])
    assert counts["re_executions"] == 2
    stopped, restarted = conn.execute(
        "SELECT extract(epoch FROM a.ended_at)::float8, extract(epoch FROM b.started_at)::float8 FROM fault_runs a "
        "JOIN fault_runs b USING (job_id) WHERE job_id = %s AND a.attempt = 1 AND b.attempt = 2 "
        "AND a.interrupted = 'LeaseLost'", (long_job.id,)).fetchone()
    via = "through pgbouncer" if network.worker_args else "direct"
    print(f"\npartition ({via}): h1 stopped its task {stopped - cut_at:.2f} s after the cut, h2 started it again "
          f"{restarted - cut_at:.2f} s after; h1's heartbeat failed after {failed_after:.1f} s and got through "
          f"{back_after:.1f} s after the heal")


def _sockets(pid: int) -> int:
    """Sockets the process *pid* has open. (psutil's connections() reads the test process's network
    namespace, not the host's.)"""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
    return count


def _sessions(conn) -> int:
    """The worker's sessions: pgq's, other than the test's own producer pool (pgq-client)."""
    return scalar(conn, "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                        "AND application_name LIKE 'pgq-%%' AND application_name <> 'pgq-client'")


@needs_hosts
@pytest.mark.slow
def test_a_flapping_link_leaks_nothing_and_loses_nothing(fapp, conn, db_url, network, runs_dir):
    """h1's link goes down for 2 s and up for 2 s, five times, while it drains jobs whose lease (2 s) an
    outage can outlast. It keeps working between the cuts; afterwards it holds as many sessions, sockets
    and threads as before, and every job succeeded exactly once."""
    h1 = network.host()
    # No pruning: its connection comes and goes once a minute, and would blur the count of sessions.
    worker = HostWorker(h1, _url(h1, db_url), "-c", "4", "--no-prune",
                        env={"PGQ_TEST_RUNS_DIR": str(runs_dir)})
    outputs = []
    try:
        wait_registered(conn, worker)
        with fapp.connection() as c:
            ids = [fault_apps.away.apply_async(args=(0.2,), connection=c).id for _ in range(160)]
        wait_for(lambda: _succeeded(conn) >= 12, timeout=20, what="work under way")
        process = psutil.Process(worker.pid)

        def resources() -> dict[str, int]:
            return {"sessions": _sessions(conn), "sockets": _sockets(worker.pid), "threads": process.num_threads(),
                    "forwarded": h1.forwarder.open_connections()}

        before = resources()
        done = [_succeeded(conn)]
        for _ in range(5):
            h1.partition()
            time.sleep(2.0)  # the fault itself
            h1.heal()
            time.sleep(2.0)
            done.append(_succeeded(conn))
        wait_for(lambda: _succeeded(conn) == len(ids), timeout=60, interval=0.2, what="every job to succeed")
        after: dict[str, int] = {}

        def settled() -> bool:
            after.update(resources())
            return after == before

        with contextlib.suppress(AssertionError):
            wait_for(settled, timeout=30, interval=0.2)
        assert after == before
    finally:
        h1.heal()
        outputs.append(worker.stop())
    progress = [b - a for a, b in itertools.pairwise(done)]
    _load_runs(conn, runs_dir)
    counts = _assert_exactly_once(conn, ids)
    given_up = outputs[0].count("lease ran out by this worker's clock")
    print(f"\nflapping: jobs done per cycle {progress}, {counts}, claims given up {given_up}, "
          f"before {before}, after {after}")
    assert min(progress) > 0, progress  # it worked in every cycle
    assert "Traceback" not in outputs[0], outputs[0]


def _succeeded(conn) -> int:
    return scalar(conn, "SELECT count(*) FROM pgq.jobs WHERE status = 'succeeded'")
