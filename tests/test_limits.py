"""Global concurrency and rate limits (pgq.limits, docs/limits.md).

The race tests run real worker processes (3 x -c 4) against one database, record every execution's start
and end (tests/limit_apps.py), and count how many ran at once; the rate test counts claims per sliding
second. The rest is driven directly: the pure admission logic and the declarations without a database,
then the claim statements one by one, including the lock-then-new-snapshot step that makes the counts
right.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import psycopg
import pytest
from click.testing import CliRunner

import pgq
from pgq import limits, maintenance, sql
from pgq.cli import main
from pgq.limits import Candidate, State
from tests import limit_apps
from tests.helpers import WorkerProcess, scalar, wait_for, wait_registered

APP = "tests.limit_apps"


# --- declarations and validation (no database) -------------------------------------------------


@pytest.mark.parametrize(("text", "per_second"), [
    ("10/s", 10.0), ("100/m", 100 / 60), ("1000/h", 1000 / 3600), ("5", 5.0), (" 2.5 / s ", 2.5), (3, 3.0),
    (0.5, 0.5), ("1/h", 1 / 3600),
])
def test_rate_notation(text, per_second):
    assert limits.parse_rate(text) == pytest.approx(per_second)


@pytest.mark.parametrize("bad", ["100/x", "100/", "/s", "ten/s", "0/s", "-1/s", "1e3/s", "", True, None, [1],
                                 float("inf"), 0, "5/min"])
def test_bad_rates_are_refused_clearly(bad):
    with pytest.raises(ValueError, match="rate_limit"):
        limits.parse_rate(bad)


def test_bad_declarations_are_refused_naming_what():
    app = pgq.App("postgresql://unused")
    with pytest.raises(ValueError, match=r"queue 'reports': concurrency must be an integer >= 1.*got 0"):
        app.queue("reports", concurrency=0)
    with pytest.raises(ValueError, match=r"queue 'mail': rate_limit must look like '10/s'.*'100/x'"):
        app.queue("mail", rate_limit="100/x")
    with pytest.raises(ValueError, match="give concurrency=, rate_limit= or both"):
        app.queue("empty")
    with pytest.raises(ValueError, match="rate_burst must be a number >= 1"):
        app.queue("mail", rate_limit="1/s", rate_burst=0)
    with pytest.raises(ValueError, match="rate_burst needs rate_limit"):
        app.queue("mail", concurrency=1, rate_burst=3)
    with pytest.raises(ValueError, match="queue name"):
        app.queue("bad name", concurrency=1)
    with pytest.raises(ValueError, match="concurrency must be an integer"):
        app.queue("reports", concurrency=True)
    app.queue("reports", concurrency=2)
    app.queue("reports", concurrency=2)  # the same again is fine
    with pytest.raises(ValueError, match="already declared"):
        app.queue("reports", concurrency=3)

    with pytest.raises(ValueError, match=r"task t.rate: rate_limit .*'100/x'"):
        app.task(name="t.rate", rate_limit="100/x")(lambda: None)
    with pytest.raises(ValueError, match=r"task t.key: key_concurrency must be an integer >= 1.*got 0"):
        app.task(name="t.key", concurrency_key="k", key_concurrency=0)(lambda: None)
    with pytest.raises(ValueError, match=r"task t.nokey: key_concurrency needs concurrency_key"):
        app.task(name="t.nokey", key_concurrency=2)(lambda: None)
    with pytest.raises(ValueError, match=r"task t.keytype: concurrency_key must be a string or a function"):
        app.task(name="t.keytype", concurrency_key=7)(lambda: None)
    with pytest.raises(pgq.EnqueueError, match=r"cannot enqueue t.emptykey: concurrency_key must be a non-empty"):
        app.task(name="t.emptykey", concurrency_key="")(lambda: None)


def test_bad_job_options_are_refused_before_anything_is_written():
    app = pgq.App("postgresql://unused")  # never connects: every refusal comes first

    @app.task(name="t.sync", concurrency_key=lambda tenant: f"tenant:{tenant}" if tenant else None,
              key_concurrency=2)
    def sync(tenant):
        return tenant

    @app.task(name="t.broken_key", concurrency_key=lambda x: 1 / 0)
    def broken(x):
        return x

    with pytest.raises(pgq.EnqueueError, match=r"cannot enqueue t.sync: key_concurrency must be an integer >= 1"):
        sync.apply_async(args=(7,), key_concurrency=0)
    with pytest.raises(pgq.EnqueueError, match=r"cannot enqueue t.sync: key_concurrency needs a concurrency_key"):
        sync.apply_async(args=(None,), key_concurrency=3)
    with pytest.raises(pgq.EnqueueError, match=r"cannot enqueue t.sync: concurrency_key must be a non-empty"):
        sync.apply_async(args=(7,), concurrency_key="")
    with pytest.raises(pgq.EnqueueError, match="cannot contain the NUL"):
        sync.apply_async(args=(7,), concurrency_key="a\x00b")
    with pytest.raises(pgq.EnqueueError, match=r"cannot enqueue t.broken_key: its concurrency_key function raised"):
        broken.delay(1)
    with pytest.raises(pgq.EnqueueError, match=r"cannot enqueue t.other: key_concurrency needs a concurrency_key"):
        app.send_task("t.other", key_concurrency=2)
    with pytest.raises(pgq.EnqueueError, match=r"cannot enqueue t.sync: key_concurrency must be"):
        app.enqueue_many([sync.s(7).set(key_concurrency=-1)])

    # What a valid call would write: the task's key and limit, or the call's.
    spec = sync._spec(args=(7,), concurrency_key=sync.concurrency_key_for((7,), {}))
    assert (spec.concurrency_key, spec.key_concurrency) == ("tenant:7", 2)
    spec = sync._spec(args=(7,), concurrency_key="tenant:x", key_concurrency=5)
    assert (spec.concurrency_key, spec.key_concurrency) == ("tenant:x", 5)
    assert sync._spec(args=(None,)).concurrency_key is None
    assert app.tasks["t.sync"].limit is None


def test_declared_limits_of_an_app():
    declared = {lim.key: lim for lim in limits.declared(limit_apps.app)}
    assert declared["queue:reports"] == limits.Limit("queue:reports", concurrency=2)
    assert declared["task:limits.ping"] == limits.Limit("task:limits.ping", rate=5.0, burst=1.0)
    assert declared["queue:mail"].rate == 10.0
    assert "task:limits.sync" not in declared  # a key's limit travels with each job
    assert declared["task:limits.ping"].describe() == "task:limits.ping rate=5/s burst=1"


# --- admission (no database) ----------------------------------------------------------------------


def _job(i: int, queue: str = "q", task: str = "t", key: str | None = None, key_concurrency: int | None = None):
    return Candidate(i, queue, task, key, key_concurrency if key is None else (key_concurrency or 1))


def test_admit_respects_every_limit_over_a_job_and_skips_past_blocked_ones():
    states = {
        "queue:q": State("queue:q", concurrency=3, running=1, rate=None, tokens=None),
        "key:a": State("key:a", None, running=1, rate=None, tokens=None),
        "key:b": State("key:b", None, running=0, rate=None, tokens=None),
    }
    jobs = [_job(1, key="a", key_concurrency=1), _job(2, key="a", key_concurrency=2),
            _job(3, key="a", key_concurrency=2), _job(4, key="b"), _job(5, key="b"), _job(6)]
    out = limits.admit(jobs, states, limit=10)
    # 1: key a has 1 running, its limit is 1. 2: room (1 < 2). 3: key a full now. 4: room. Queue full (1 + 2).
    assert out.ids == [2, 4]
    assert out.taken == {}  # no rate limit was involved
    assert out.retry_in is None  # nothing here waits for time: finished jobs free these slots
    assert out.more  # 3 waits because of 2, taken here: jobs behind this window may fit


def test_admit_takes_tokens_and_says_when_the_next_one_is_due():
    states = {
        "task:t": State("task:t", None, 0, rate=5.0, tokens=2.5),
        "queue:q": State("queue:q", None, 0, rate=100.0, tokens=10.0),
    }
    out = limits.admit([_job(i) for i in range(1, 6)], states, limit=10)
    assert out.ids == [1, 2]
    assert out.taken == {"task:t": 2, "queue:q": 2}
    assert out.retry_in == pytest.approx(0.5 / 5.0)  # 0.5 tokens left, 5 per second


def test_admit_stops_at_the_limit_and_never_takes_an_unlocked_key():
    states = {"key:a": State("key:a", None, 0, None, None)}
    jobs = [_job(1, key="b"), _job(2, key="a", key_concurrency=5), _job(3, key="a", key_concurrency=5), _job(4)]
    assert limits.admit(jobs, states, limit=2).ids == [2, 3]
    assert limits.admit(jobs, states, limit=0).ids == []


# --- the claim, statement by statement --------------------------------------------------------------


@pytest.fixture
def lapp(db_url, conn) -> Iterator[pgq.App]:
    conn.execute(limit_apps.DDL)
    app = limit_apps.app
    app.set_database_url(db_url)
    app.declare_limits()
    yield app
    app.close()


def _claim_plain(conn, queues: list[str]) -> list[int]:
    return [row[0] for row in conn.execute(sql.CLAIM, {"queues": queues, "limit": 100, "worker_id": "w"})]


def _claim_limited(db_url: str, queues: list[str], limit: int = 100, worker: str = "w") -> list[int]:
    with psycopg.connect(db_url, autocommit=True) as c:
        rows, _, _ = limits.claim(c, queues, limit, worker)
    return [row[0] for row in rows]


def test_the_ordinary_claim_never_takes_a_limited_job(lapp, conn, db_url):
    report = limit_apps.report.delay()
    keyed = limit_apps.plain.apply_async(concurrency_key="k", key_concurrency=2)
    ping = limit_apps.ping.delay()
    plain = limit_apps.plain.delay()
    rows = dict(conn.execute("SELECT id, limited FROM pgq.jobs").fetchall())
    assert rows == {report.id: True, keyed.id: True, ping.id: True, plain.id: False}
    assert scalar(conn, "SELECT key_concurrency FROM pgq.jobs WHERE id = %s", (keyed.id,)) == 2

    assert _claim_plain(conn, ["reports", "reports_free", "pings"]) == [plain.id]
    assert sorted(_claim_limited(db_url, ["reports", "reports_free", "pings"])) == sorted(
        [report.id, keyed.id, ping.id])
    statuses = {row[0] for row in conn.execute("SELECT status FROM pgq.jobs")}
    assert statuses == {"running"}


def test_bulk_and_send_task_mark_limited_jobs(lapp, conn):
    handles = lapp.enqueue_many([limit_apps.sync.s(7), limit_apps.sync.s(8).set(key_concurrency=1),
                                 limit_apps.plain.s(), limit_apps.ping.s()])
    sent = lapp.send_task("limits.unknown_here", queue="reports")  # no Task object: the database decides
    rows = conn.execute("SELECT id, limited, concurrency_key, key_concurrency FROM pgq.jobs ORDER BY id").fetchall()
    assert rows == [(handles[0].id, True, "tenant:7", 2), (handles[1].id, True, "tenant:8", 1),
                    (handles[2].id, False, None, None), (handles[3].id, True, None, None),
                    (sent.id, True, None, None)]


def test_queue_limit_caps_running_jobs_across_claims(lapp, conn, db_url):
    ids = [limit_apps.report.delay().id for _ in range(5)]
    first = _claim_limited(db_url, ["reports"], worker="w1")
    assert first == ids[:2]
    assert _claim_limited(db_url, ["reports"], worker="w2") == []  # full: 2 running
    conn.execute("UPDATE pgq.jobs SET status = 'succeeded', finished_at = now(), lease_expires_at = NULL "
                 "WHERE id = %s", (first[0],))
    assert _claim_limited(db_url, ["reports"], worker="w2") == [ids[2]]  # one slot freed, one taken


def test_a_full_key_does_not_block_other_keys_behind_it(lapp, conn, db_url):
    ahead = [limit_apps.sync.delay(7).id for _ in range(30)]
    behind = limit_apps.sync.delay(8).id
    with psycopg.connect(db_url, autocommit=True) as c:
        rows, _, more = limits.claim(c, ["tenants"], 4, "w")
    assert [row[0] for row in rows] == ahead[:2]
    assert more  # the window was key 7's jobs, 2 of which this claim's own picks held back: look again
    # Key 7 is full now: the next claim's first statement walks past its 28 waiting jobs.
    assert _claim_limited(db_url, ["tenants"], limit=4) == [behind]
    assert _claim_limited(db_url, ["tenants"], limit=4) == []
    # Key rows are created by the claim; unused ones are pruned later, and come back when needed.
    assert scalar(conn, "SELECT count(*) FROM pgq.limits WHERE starts_with(key, 'key:')") == 2
    conn.execute(sql.LIMITS_PRUNE, {"keep": 0})
    assert scalar(conn, "SELECT count(*) FROM pgq.limits WHERE starts_with(key, 'key:')") == 0
    conn.execute("UPDATE pgq.jobs SET status = 'succeeded', finished_at = now(), lease_expires_at = NULL "
                 "WHERE id = %s", (ahead[0],))
    assert _claim_limited(db_url, ["tenants"], limit=4) == [ahead[2]]


def test_limits_declared_after_jobs_were_enqueued_mark_them(db_url, conn):
    app = pgq.App(db_url)
    task = app.task(name="late.task", queue="late")(lambda: None)
    other = app.task(name="late.other", queue="later")(lambda: None)
    try:
        waiting = [task.delay().id, other.delay().id]
        assert scalar(conn, "SELECT count(*) FROM pgq.jobs WHERE limited") == 0
        app.queue("late", concurrency=1)
        other.limit = limits.task_limit("late.other", "1/s")
        assert sorted(app.declare_limits()) == ["queue:late", "task:late.other"]
        assert scalar(conn, "SELECT count(*) FROM pgq.jobs WHERE limited") == 2
        assert app.declare_limits() == []  # unchanged: nothing written
        assert _claim_plain(conn, ["late", "later"]) == []
        assert sorted(_claim_limited(db_url, ["late", "later"])) == sorted(waiting)
    finally:
        app.close()


def test_a_job_that_slips_into_a_limited_queue_unmarked_waits_for_the_sweep(lapp, conn, db_url):
    job_id = limit_apps.report.delay().id
    conn.execute("UPDATE pgq.jobs SET limited = false WHERE id = %s", (job_id,))  # as if enqueued a moment early
    assert _claim_plain(conn, ["reports"]) == []  # the ordinary claim skips limited queues altogether
    assert _claim_limited(db_url, ["reports"]) == []
    worker = lapp.worker(queues="reports")
    maintenance.Keeper(worker).limits_upkeep(conn)
    assert _claim_limited(db_url, ["reports"]) == [job_id]


def test_counts_are_taken_after_the_lock_is_held(lapp, conn, db_url):
    """The reason for a new statement after the lock: a claimer that waited for the queue's row must see
    the claims its predecessor committed meanwhile, which its first statement's snapshot cannot."""
    ids = [limit_apps.report.delay().id for _ in range(4)]
    holder = psycopg.connect(db_url)
    try:
        # Another claimer holds the queue's row and claims two jobs (what LIMITED_LOCK + LIMITED_TAKE do).
        holder.execute("SELECT 1 FROM pgq.limits WHERE key = 'queue:reports' FOR UPDATE")
        holder.execute("UPDATE pgq.jobs SET status = 'running', attempts = 1, worker_id = 'w1', started_at = now(), "
                       "lease_expires_at = now() + interval '30 seconds' WHERE id = ANY(%s)", (ids[:2],))
        result: list[list[int]] = []
        waiting = threading.Thread(target=lambda: result.append(_claim_limited(db_url, ["reports"], worker="w2")))
        waiting.start()
        # Its first statement started while nothing ran, and now waits for the row.
        wait_for(lambda: scalar(conn, "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                      "AND wait_event_type = 'Lock'") == 1, what="the second claimer to wait")
        holder.commit()
        waiting.join(timeout=10)
    finally:
        holder.close()
    assert result == [[]]  # 2 running: the queue is full
    assert scalar(conn, "SELECT count(*) FROM pgq.jobs WHERE status = 'running'") == 2


def test_rate_limit_tokens_refill_on_the_database_clock(lapp, conn, db_url):
    for _ in range(3):
        limit_apps.ping.delay()
    rows, retry_in, found = _claim_with_wait(db_url, ["pings"])
    assert len(rows) == 1 and found  # a bucket of 1 token
    assert retry_in == pytest.approx(0.2, abs=0.05)  # 5 per second
    assert _claim_with_wait(db_url, ["pings"])[0] == []
    wait_for(lambda: _claim_with_wait(db_url, ["pings"])[0], timeout=5, interval=0.05, what="the next token")
    tokens = scalar(conn, "SELECT tokens FROM pgq.limits WHERE key = 'task:limits.ping'")
    assert 0 <= tokens < 1


def _claim_with_wait(db_url: str, queues: list[str]):
    with psycopg.connect(db_url, autocommit=True) as c:
        return limits.claim(c, queues, 10, "w", limits.rate_keys(limit_apps.app, queues))


def test_pgq_limits_lists_limits_with_running_jobs_and_tokens(lapp, db_url):
    limit_apps.report.delay()
    limit_apps.sync.delay(7)
    _claim_limited(db_url, ["reports", "tenants"])
    runner = CliRunner()
    result = runner.invoke(main, ["--database-url", db_url, "-A", APP, "limits"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["limit", "concurrency", "running", "rate", "burst", "tokens"]
    assert [line.split() for line in lines[1:]] == [
        ["queue:mail", "-", "0", "10/s", "1", "1.00"],
        ["queue:reports", "2", "1", "-", "-", "-"],
        ["task:limits.ping", "-", "-", "5/s", "1", "1.00"],
    ]
    result = runner.invoke(main, ["--database-url", db_url, "-A", APP, "limits", "--keys", "--json"])
    assert result.exit_code == 0, result.output
    keyed = [e for e in json.loads(result.output)["limits"] if e["limit"] == "key:tenant:7"]
    assert keyed == [{"limit": "key:tenant:7", "concurrency": None, "running": 1, "rate_per_second": None,
                      "burst": None, "tokens": None}]


# --- races: real worker processes --------------------------------------------------------------------


class Fleet:
    """Worker processes polling 20 times a second, so that their limited claims collide often (each also
    runs on every NOTIFY: an enqueue, or a limited job's outcome recorded anywhere)."""

    def __init__(self, db_url: str, size: int, *args: str):
        self.workers = [WorkerProcess(db_url, "--poll-interval", "0.05", *args, app=APP) for _ in range(size)]

    def ready(self, conn) -> Fleet:
        for worker in self.workers:
            wait_registered(conn, worker)
        return self

    def stop(self) -> list[str]:
        return [w.stop() for w in self.workers]


def _max_overlap(conn, where: str = "true", params: tuple = ()) -> int:
    """The most executions (matching *where*) running at one instant, by their own start and end times."""
    return scalar(conn, f"""
        SELECT coalesce(max(n), 0) FROM (
            SELECT (SELECT count(*) FROM limit_runs AS b
                    WHERE ({where.replace('r.', 'b.')}) AND b.started_at <= a.started_at
                      AND (b.ended_at IS NULL OR b.ended_at > a.started_at)) AS n
            FROM limit_runs AS a WHERE ({where.replace('r.', 'a.')})) AS s
    """, params * 2)


def _max_running_by_claims(conn, queue: str) -> int:
    """The same from pgq's own record: each job `running` from its claim (started_at) to its outcome."""
    return scalar(conn, """
        SELECT coalesce(max((SELECT count(*) FROM pgq.jobs AS b WHERE b.queue = a.queue
                             AND b.started_at <= a.started_at AND b.finished_at > a.started_at)), 0)
        FROM pgq.jobs AS a WHERE a.queue = %s
    """, (queue,))


def _all_succeeded(conn, n: int) -> bool:
    return scalar(conn, "SELECT count(*) FROM pgq.jobs WHERE status = 'succeeded'") == n


@pytest.mark.slow
def test_queue_concurrency_holds_across_worker_processes(lapp, conn, db_url):
    fleet = Fleet(db_url, 3, "-c", "4", "-Q", "reports,reports_free")
    try:
        fleet.ready(conn)  # all of them race for the jobs from the first one
        with lapp.connection() as c:
            ids = [limit_apps.report.apply_async(args=(0.15,), connection=c).id for _ in range(24)]
            free = [limit_apps.plain.apply_async(args=(0.15,), connection=c).id for _ in range(24)]
        wait_for(lambda: _all_succeeded(conn, len(ids) + len(free)), timeout=40, interval=0.1, what="every job")
    finally:
        outputs = fleet.stop()
    limited = _max_overlap(conn, "r.job_id = ANY(%s)", (ids,))
    unlimited = _max_overlap(conn, "r.job_id = ANY(%s)", (free,))
    by_claims = _max_running_by_claims(conn, "reports")
    workers = scalar(conn, "SELECT count(DISTINCT worker_id) FROM pgq.jobs WHERE queue = 'reports'")
    print(f"\nqueue concurrency=2, 3 workers x -c 4: max simultaneous runs {limited} (by pgq's claims: {by_claims}; "
          f"{workers} workers took part); the unlimited queue beside it: {unlimited}")
    assert limited == limit_apps.REPORTS_CONCURRENCY
    assert by_claims == limit_apps.REPORTS_CONCURRENCY
    assert unlimited > limit_apps.REPORTS_CONCURRENCY  # the ordinary claim is not held back
    assert not any("Traceback" in o for o in outputs), outputs


@pytest.mark.slow
def test_key_concurrency_holds_across_worker_processes(lapp, conn, db_url):
    fleet = Fleet(db_url, 3, "-c", "4", "-Q", "tenants")
    try:
        fleet.ready(conn)
        with lapp.connection() as c:
            ids = [limit_apps.sync.apply_async(args=(tenant, 0.15), connection=c).id
                   for _ in range(12) for tenant in (7, 8)]
        wait_for(lambda: _all_succeeded(conn, len(ids)), timeout=40, interval=0.1, what="every job")
    finally:
        outputs = fleet.stop()
    per_key = {t: _max_overlap(conn, "r.tenant = %s", (t,)) for t in (7, 8)}
    total = _max_overlap(conn)
    workers = scalar(conn, "SELECT count(DISTINCT worker_id) FROM pgq.jobs WHERE queue = 'tenants'")
    print(f"\nkey_concurrency=2, 3 workers x -c 4: max simultaneous runs per key {per_key}, all keys {total} "
          f"({workers} workers took part)")
    assert per_key == {7: limit_apps.KEY_CONCURRENCY, 8: limit_apps.KEY_CONCURRENCY}
    assert total > limit_apps.KEY_CONCURRENCY  # keys are independent of each other
    assert not any("Traceback" in o for o in outputs), outputs


def _starts(conn, queue: str) -> list[float]:
    """Claim times of the queue's jobs, in seconds after the first (database clock)."""
    rows = conn.execute("SELECT extract(epoch FROM started_at - min(started_at) OVER ())::float8 FROM pgq.jobs "
                        "WHERE queue = %s ORDER BY started_at", (queue,)).fetchall()
    return [row[0] for row in rows]


def _max_per_window(starts: list[float], window: float = 1.0) -> int:
    return max(sum(1 for t in starts if s <= t < s + window) for s in starts)


@pytest.mark.slow
def test_task_rate_limit_holds_across_worker_processes(lapp, conn, db_url):
    n = 16
    fleet = Fleet(db_url, 3, "-c", "4", "-Q", "pings")
    try:
        fleet.ready(conn)
        with lapp.connection() as c:
            for _ in range(n):
                limit_apps.ping.apply_async(connection=c)
        wait_for(lambda: _all_succeeded(conn, n), timeout=40, interval=0.1, what="every ping")
    finally:
        outputs = fleet.stop()
    starts = _starts(conn, "pings")
    rate, burst = limit_apps.PING_RATE, 1
    busiest = _max_per_window(starts)
    observed = (n - burst) / starts[-1]
    workers = scalar(conn, "SELECT count(DISTINCT worker_id) FROM pgq.jobs WHERE queue = 'pings'")
    print(f"\nrate_limit=5/s (burst 1), 3 workers x -c 4: {n} claims over {starts[-1]:.2f} s = {observed:.2f}/s "
          f"after the first; busiest sliding second {busiest} claims ({workers} workers took part)")
    assert busiest <= rate + burst
    assert starts[-1] >= (n - burst) / rate - 0.01  # never faster than the bucket allows…
    assert observed >= 0.8 * rate  # …and close to it
    assert not any("Traceback" in o for o in outputs), outputs


@pytest.mark.slow
def test_queue_rate_limit(lapp, conn, db_url):
    n = 11
    with lapp.connection() as c:
        for _ in range(n):
            limit_apps.mail.apply_async(connection=c)
    worker = WorkerProcess(db_url, "-c", "4", "-Q", "mail", app=APP)
    try:
        wait_for(lambda: _all_succeeded(conn, n), timeout=30, interval=0.1, what="every mail")
    finally:
        worker.stop()
    starts = _starts(conn, "mail")
    print(f"\nqueue rate_limit=10/s: {n} claims over {starts[-1]:.2f} s; busiest sliding second "
          f"{_max_per_window(starts)}")
    assert _max_per_window(starts) <= limit_apps.MAIL_RATE + 1
    assert (n - 1) / limit_apps.MAIL_RATE - 0.01 <= starts[-1] <= 2 * (n - 1) / limit_apps.MAIL_RATE


def test_notify_payload_tells_limited_jobs_apart(lapp, conn, db_url):
    """Workers run the limited claim on a NOTIFY only when it says 'limited <queue>' (migration 0007)."""
    with psycopg.connect(db_url, autocommit=True) as listener:
        listener.execute("LISTEN pgq_jobs")
        limit_apps.sync.delay(7)  # a concurrency key: limited
        limit_apps.plain.delay()  # nothing limits it
        limit_apps.report.delay()  # its queue is limited
        lapp.enqueue_many([limit_apps.plain.s(), limit_apps.sync.s(8)])
        failed = limit_apps.plain.delay().id
        conn.execute("UPDATE pgq.jobs SET status = 'failed', finished_at = now() WHERE id = %s", (failed,))
        lapp.retry(failed)
        heard = [n.payload for n in listener.notifies(timeout=1, stop_after=7)]
    assert heard[:3] == ["limited tenants", "reports_free", "limited reports"]
    assert sorted(heard[3:5]) == ["limited tenants", "reports_free"]  # one statement: one each, any order
    assert heard[5:] == ["reports_free", "reports_free"]  # the failed job's insert, then its retry
