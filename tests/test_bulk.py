"""Bulk enqueue: many jobs in few statements, all or nothing, validated before anything is written."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import psycopg
import pytest

import pgq
from pgq import enqueue
from tests import apps
from tests.helpers import scalar


def test_enqueue_many_inserts_in_order_and_runs(app, conn, monkeypatch):
    monkeypatch.setattr(enqueue, "BULK_CHUNK", 300)  # several statements in one transaction
    handles = app.enqueue_many(apps.add.s(i, i) for i in range(1000))
    assert [h.id for h in handles] == sorted(h.id for h in handles)
    rows = conn.execute("SELECT id, args FROM pgq.jobs ORDER BY id").fetchall()
    assert [args for _, args in rows] == [[i, i] for i in range(1000)]
    assert [h.id for h in handles] == [job_id for job_id, _ in rows]
    with app.worker(concurrency=4).running():
        assert [h.get(timeout=20) for h in handles[:5]] == [0, 2, 4, 6, 8]
        assert handles[-1].get(timeout=20) == 1998


def test_options_per_signature(app, conn):
    eta = datetime.now(timezone.utc) + timedelta(hours=1)
    a, b, c = app.enqueue_many([
        apps.echo.s(1),
        apps.echo.s(2).set(queue="other", priority=5, countdown=60),
        apps.echo.signature((3,), {"k": "v"}, eta=eta, max_attempts=7),
    ])
    rows = {r[0]: r[1:] for r in conn.execute(
        "SELECT id, queue, priority, max_attempts, args, kwargs, run_at > now() + interval '50 s', "
        "abs(extract(epoch FROM run_at) - %s) < 0.001 FROM pgq.jobs", (eta.timestamp(),)).fetchall()}
    assert rows[a.id] == ("default", 0, 3, [1], {}, False, False)
    assert rows[b.id] == ("other", 5, 3, [2], {}, True, False)
    assert rows[c.id] == ("default", 0, 7, [3], {"k": "v"}, True, True)


def test_one_bad_job_refuses_the_whole_batch(app, conn):
    with pytest.raises(pgq.SerializationError, match=r"tests\.add"):
        app.enqueue_many([apps.add.s(1, 2), apps.add.s(object(), 2)])
    with pytest.raises(pgq.EnqueueError, match="priority"):
        app.enqueue_many([apps.add.s(1, 2), apps.add.s(1, 2).set(priority=10**6)])
    assert scalar(conn, "SELECT count(*) FROM pgq.jobs") == 0
    assert app.enqueue_many([]) == []


def test_unique_jobs_are_refused_in_bulk(app):
    unique_task = app.task(name="tests.bulk_unique", unique=True)(lambda x: x)
    with pytest.raises(pgq.EnqueueError, match="unique"):
        app.enqueue_many([unique_task.s(1)])


@pytest.mark.parametrize("outcome", ["commit", "rollback"])
def test_enqueue_many_inside_the_callers_transaction(app, conn, db_url, outcome):
    with psycopg.connect(db_url) as own:
        app.enqueue_many([apps.add.s(i, 1) for i in range(50)], connection=own)
        assert scalar(conn, "SELECT count(*) FROM pgq.jobs") == 0
        own.commit() if outcome == "commit" else own.rollback()
    assert scalar(conn, "SELECT count(*) FROM pgq.jobs") == (50 if outcome == "commit" else 0)


def test_hostile_arguments_and_options_round_trip_in_bulk(app, conn):
    """Jobs travel to PostgreSQL inside one JSON document: whatever a job holds must come back as given."""
    nasty = ["'; DROP TABLE pgq.jobs; --", '"],[0,[1],{}]', "\\u0000 is text here", "back\\slash", "😀 ü 中",
             "\n\t\r", "]", "[", "{}", ""]
    queue = "q.with-odd_chars:1"
    handles = app.enqueue_many([apps.echo.s(v, {"k": v}).set(queue=queue) for v in nasty] +
                               [apps.echo.signature((1,), {(v or "empty"): v for v in nasty})])
    rows = conn.execute("SELECT id, queue, args, kwargs FROM pgq.jobs ORDER BY id").fetchall()
    assert [r[0] for r in rows] == [h.id for h in handles]
    assert [(r[1], r[2], r[3]) for r in rows[:-1]] == [(queue, [v, {"k": v}], {}) for v in nasty]
    assert rows[-1][1:] == ("default", [1], {v or "empty": v for v in nasty})
