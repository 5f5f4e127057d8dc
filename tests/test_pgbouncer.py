"""Producers and workers through a real PgBouncer in transaction mode: no LISTEN, no prepared
statements, and nothing lost."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tests import apps
from tests.helpers import WorkerProcess, scalar, wait_for

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"

pytestmark = pytest.mark.skipif(not os.path.exists(PGBOUNCER),
                                reason="pgbouncer is not installed (.ci/run installs Debian's package)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def pgbouncer_url(db_url):
    """A PgBouncer in transaction mode in front of this test's database; its URL."""
    params = conninfo_to_dict(db_url)
    port = _free_port()
    workdir = Path(tempfile.mkdtemp(prefix="pgq-pgbouncer-"))
    workdir.chmod(0o755)
    (workdir / "users.txt").write_text(f'"{params["user"]}" "{params.get("password") or ""}"\n')
    (workdir / "pgbouncer.ini").write_text(f"""
[databases]
{params["dbname"]} = host={params["host"]} port={params.get("port") or 5432} dbname={params["dbname"]}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {workdir}/users.txt
admin_users = {params["user"]}
pool_mode = transaction
default_pool_size = 10
max_client_conn = 200
ignore_startup_parameters = extra_float_digits
logfile = {workdir}/pgbouncer.log
pidfile = {workdir}/pgbouncer.pid
""")
    for f in workdir.iterdir():
        f.chmod(0o644)
    command = [PGBOUNCER, str(workdir / "pgbouncer.ini")]
    if os.geteuid() == 0:  # PgBouncer refuses to run as root; the embedded server's user will do
        command = ["runuser", "-u", "pgserver", "--", *command]
        shutil.chown(workdir, "pgserver")
    # Not a pipe: nobody would read it, and a full pipe blocks PgBouncer's logging and with it PgBouncer.
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = make_conninfo(host="127.0.0.1", port=port, dbname=params["dbname"], user=params["user"],
                        password=params.get("password") or "")

    def up():
        try:
            with psycopg.connect(url, connect_timeout=1, prepare_threshold=None) as c:
                return c.execute("SELECT 1").fetchone()
        except psycopg.OperationalError:
            if proc.poll() is not None:
                log = workdir / "pgbouncer.log"
                raise AssertionError(f"pgbouncer exited: {log.read_text() if log.exists() else ''}") from None
            return None

    wait_for(up, timeout=15, what="pgbouncer to accept connections")
    yield url, workdir / "pgbouncer.log"
    proc.terminate()
    proc.wait(timeout=10)
    shutil.rmtree(workdir, ignore_errors=True)


def test_producers_and_workers_through_pgbouncer_lose_nothing(app, conn, pgbouncer_url, monkeypatch):
    pgbouncer_url, log = pgbouncer_url
    monkeypatch.setenv("PGQ_PREPARE", "0")
    app.set_database_url(pgbouncer_url)
    total, threads = 200, 4
    handles: list = []
    lock = threading.Lock()

    def produce(n):
        mine = [apps.record.delay() for _ in range(n)]
        with lock:
            handles.extend(mine)

    producers = [threading.Thread(target=produce, args=(total // threads,)) for _ in range(threads)]
    for t in producers:
        t.start()
    workers = [WorkerProcess(pgbouncer_url, "-c", "4", "--no-listen", "--no-prepare", "--poll-interval", "0.1")
               for _ in range(2)]
    try:
        for t in producers:
            t.join(timeout=60)
        assert len(handles) == total
        wait_for(lambda: scalar(conn, "SELECT count(*) FROM pgq.jobs WHERE status = 'succeeded'") == total,
                 timeout=60, what="every job to succeed through pgbouncer")
        assert sorted(h.get(timeout=5) for h in handles) == sorted(h.id for h in handles)
    finally:
        started = time.monotonic()
        outputs = [w.stop() for w in workers]
        stop_seconds = time.monotonic() - started
    runs = conn.execute("SELECT job_id, count(*) FROM test_executions GROUP BY job_id HAVING count(*) > 1").fetchall()
    assert runs == [], f"jobs run more than once: {runs}"
    assert scalar(conn, "SELECT count(*) FROM pgq.results WHERE status = 'succeeded'") == total
    for output in outputs:
        assert "prepared statement" not in output and "Traceback" not in output, output
    assert stop_seconds < 10, f"workers took {stop_seconds:.1f} s to stop through pgbouncer"
    # It really went through the pooler: the producer's pool and both workers logged in there.
    assert log.read_text().count("login attempt") >= 3
