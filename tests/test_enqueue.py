"""Enqueue and get, in pgq's own transaction and inside the caller's (psycopg, SQLAlchemy Core, ORM)."""

from __future__ import annotations

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import pgq
from tests import apps
from tests.helpers import scalar


def test_delay_then_get(app, conn):
    handle = apps.add.delay(2, 3)
    assert handle.status == "queued"
    assert scalar(conn, "SELECT task_name FROM pgq.jobs WHERE id = %s", (handle.id,)) == "tests.add"
    with app.worker(concurrency=2).running():
        assert handle.get(timeout=10) == 5
    assert handle.status == "succeeded"
    assert app.result(handle.id).get(timeout=1) == 5


def test_send_task_by_name_uses_registered_defaults(app, conn):
    handle = app.send_task("emails.send", args=["ada@example.com"])
    assert scalar(conn, "SELECT queue FROM pgq.jobs WHERE id = %s", (handle.id,)) == "emails"
    unknown = app.send_task("not.imported.here", args=[1], queue="elsewhere", priority=5)
    row = conn.execute("SELECT queue, priority, task_name FROM pgq.jobs WHERE id = %s", (unknown.id,)).fetchone()
    assert row == ("elsewhere", 5, "not.imported.here")


def test_apply_async_options_are_stored(app, conn):
    handle = apps.echo.apply_async(args=(1,), kwargs={"k": "v"}, countdown=60, priority=7, queue="other")
    row = conn.execute(
        "SELECT queue, priority, args, kwargs, run_at > now() + interval '50 seconds' FROM pgq.jobs WHERE id = %s",
        (handle.id,),
    ).fetchone()
    assert row == ("other", 7, [1], {"k": "v"}, True)


def _job_count(conn) -> int:
    return scalar(conn, "SELECT count(*) FROM pgq.jobs")


@pytest.mark.parametrize("outcome", ["commit", "rollback"])
def test_psycopg_connection_transaction(app, conn, db_url, outcome):
    with psycopg.connect(db_url) as own:
        own.execute("CREATE TABLE orders (id int)")
        own.execute("INSERT INTO orders VALUES (1)")
        handle = apps.add.apply_async(args=(1, 2), connection=own)
        # Not visible to anyone else until the caller commits: pgq committed nothing itself.
        assert _job_count(conn) == 0
        own.commit() if outcome == "commit" else own.rollback()
    _check_outcome(app, conn, handle, outcome)


@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
@pytest.mark.parametrize("outcome", ["commit", "rollback"])
def test_sqlalchemy_connection_transaction(app, conn, postgresql, driver, outcome):
    engine = _engine(postgresql, driver)
    try:
        with engine.connect() as sa_conn:
            sa_conn.execute(sa.text("CREATE TABLE IF NOT EXISTS orders (id int)"))
            sa_conn.execute(sa.text("INSERT INTO orders VALUES (1)"))
            handle = apps.add.apply_async(args=(1, 2), connection=sa_conn)
            assert _job_count(conn) == 0
            sa_conn.commit() if outcome == "commit" else sa_conn.rollback()
    finally:
        engine.dispose()
    _check_outcome(app, conn, handle, outcome)


@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
@pytest.mark.parametrize("outcome", ["commit", "rollback"])
def test_sqlalchemy_session_transaction(app, conn, postgresql, driver, outcome):
    engine = _engine(postgresql, driver)
    try:
        with Session(engine) as session:
            session.execute(sa.text("CREATE TABLE IF NOT EXISTS orders (id int)"))
            handle = apps.add.apply_async(args=(1, 2), connection=session)
            assert _job_count(conn) == 0
            session.commit() if outcome == "commit" else session.rollback()
    finally:
        engine.dispose()
    _check_outcome(app, conn, handle, outcome)


def _engine(postgresql, driver: str) -> sa.Engine:
    info = postgresql.info
    url = sa.URL.create(f"postgresql+{driver}", username=info.user, password=info.password or None,
                        database=info.dbname, query={"host": info.host, "port": str(info.port)})
    return sa.create_engine(url)


def _check_outcome(app, conn, handle, outcome):
    if outcome == "commit":
        assert _job_count(conn) == 1
        with app.worker(concurrency=1).running():
            assert handle.get(timeout=10) == 3
    else:
        assert _job_count(conn) == 0
        # A worker running now finds nothing: the rolled-back job never existed, and no wake-up ran it.
        with app.worker(concurrency=1).running(), pytest.raises(pgq.JobNotFound):
            handle.get(timeout=1)
        assert _job_count(conn) == 0


def test_connection_of_wrong_type_is_refused(app):
    with pytest.raises(TypeError, match="psycopg Connection"):
        apps.add.apply_async(args=(1, 2), connection=object())


# --- delay()'s INSERT through libpq (pgq.enqueue.PreparedEnqueue) ------------------------------------


def test_prepared_enqueue_stores_every_value_as_psycopg_would(app, conn):
    """Text rendering of each parameter: non-ASCII JSON, floats, booleans, an aware eta, NULLs."""
    from datetime import datetime, timedelta, timezone

    eta = datetime.now(timezone(timedelta(hours=5, minutes=30))) + timedelta(hours=1)
    handle = apps.echo.apply_async(args=["é 日本 \u2603", 1.5, None, True], kwargs={"k": {"n": [1e-7, -0.0]}},
                                   eta=eta, priority=-3, max_attempts=7, retry_backoff=0.25, lease_seconds=45,
                                   ignore_result=True, queue="q:1")
    row = conn.execute("SELECT args, kwargs, priority, max_attempts, retry_backoff, lease_seconds, ignore_result, "
                       "run_at, queue, limited FROM pgq.jobs WHERE id = %s", (handle.id,)).fetchone()
    assert row == (["é 日本 \u2603", 1.5, None, True], {"k": {"n": [1e-7, -0.0]}}, -3, 7, 0.25, 45, True, eta, "q:1",
                   False)
    later = apps.echo.apply_async(args=[1], countdown=90.5)
    assert scalar(conn, "SELECT extract(epoch FROM run_at - created_at) FROM pgq.jobs WHERE id = %s",
                  (later.id,)) == pytest.approx(90.5, abs=0.5)


def test_prepared_enqueue_survives_deallocate_and_raises_psycopg_errors(app, conn):
    solo = pgq.App(app.database_url, pool_size=1)  # one pooled connection: every delay() takes it
    task = solo.task(name="tests.solo")(lambda: None)
    try:
        first = task.delay()
        (pooled,) = list(solo._enqueue_statement._ready)  # the connection the INSERT is prepared on
        name = pgq.enqueue.PreparedEnqueue.NAME.decode()
        assert pooled.execute("SELECT count(*) FROM pg_prepared_statements WHERE name = %s",
                              (name,)).fetchone()[0] == 1
        pooled.execute("DEALLOCATE ALL")  # gone: the next delay() is refused (26000), prepares it again
        second = task.delay()
        assert second.id > first.id
        assert scalar(conn, "SELECT count(*) FROM pgq.jobs") == 2
        # A refusal from the server arrives as psycopg's own exception class, and writes nothing.
        conn.execute("ALTER TABLE pgq.jobs ADD CONSTRAINT test_no_solo CHECK (task_name <> 'tests.solo') NOT VALID")
        conn.commit()
        with pytest.raises(psycopg.errors.CheckViolation, match="test_no_solo"):
            task.delay()
        assert scalar(conn, "SELECT count(*) FROM pgq.jobs") == 2
        conn.execute("ALTER TABLE pgq.jobs DROP CONSTRAINT test_no_solo")
        conn.commit()
        assert task.delay().id > second.id  # the connection is usable after the error
    finally:
        solo.close()


def test_prepared_enqueue_is_not_used_without_prepared_statements(app, conn, monkeypatch):
    monkeypatch.setenv("PGQ_PREPARE", "0")
    app.close()  # the pool is opened again with PGQ_PREPARE=0
    handle = apps.add.delay(1, 2)
    statements = app.run(lambda c: c.execute("SELECT name FROM pg_prepared_statements").fetchall())
    assert statements == []
    assert list(app._enqueue_statement._ready) == []  # no pooled connection took the libpq path
    assert scalar(conn, "SELECT task_name FROM pgq.jobs WHERE id = %s", (handle.id,)) == "tests.add"


@pytest.mark.parametrize("name", ["tests.a\x00b", "tests.a\ud800b"])
def test_task_names_postgres_cannot_store_are_refused_before_writing(app, conn, name):
    # A text parameter cannot carry them: libpq would cut the name at the NUL, UTF-8 has no lone surrogates.
    with pytest.raises(pgq.EnqueueError, match="task name cannot contain"):
        app.send_task(name)
    assert scalar(conn, "SELECT count(*) FROM pgq.jobs") == 0


def test_delay_follows_task_defaults_changed_after_registration(app, conn):
    """delay() keeps a task's option-less spec, rebuilt when the task's defaults change."""
    solo = pgq.App(app.database_url, pool_size=1)
    task = solo.task(name="tests.mutable", queue="first")(lambda *a: None)
    try:
        a = task.delay(1)
        task.queue, task.priority = "second", 4
        b = task.delay(2)
        rows = conn.execute("SELECT queue, priority, args FROM pgq.jobs WHERE id IN (%s, %s) ORDER BY id",
                            (a.id, b.id)).fetchall()
        assert rows == [("first", 0, [1]), ("second", 4, [2])]
        with pytest.raises(pgq.EnqueueError, match=r"cannot enqueue tests\.mutable: args must be a list or tuple"):
            task.apply_async(args="12")
    finally:
        solo.close()
