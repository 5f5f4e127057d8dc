"""A PgBouncer in transaction mode for tests: tests/test_pgbouncer.py, and the hosts of tests/test_hosts.py."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tests.helpers import wait_for

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
MISSING = None if os.path.exists(PGBOUNCER) else "pgbouncer is not installed (.ci/run installs Debian's package)"


def _free_port() -> int:
    """A free port on 127.0.0.1, from 5430-5440 (a range kept for the test suite's own listeners)."""
    for port in range(5430, 5441):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port in 5430-5440 for pgbouncer")


@contextmanager
def pgbouncer(db_url: str) -> Iterator[tuple[str, Path, int]]:
    """A PgBouncer in transaction mode in front of the database of *db_url*: its URL, log and port. It
    tries the server again 1 s after a failed login, not 15 (server_login_retry): behind the default, the
    jobs left after a 2 s restart of PostgreSQL were done 15.1 s after it, 4.5 s with 1 s
    (docs/operations.md#pgbouncer)."""
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
server_login_retry = 1
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

    try:
        wait_for(up, timeout=15, what="pgbouncer to accept connections")
        yield url, workdir / "pgbouncer.log", port
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)
