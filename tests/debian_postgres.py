"""A throwaway PostgreSQL server from an installed Debian package (``postgresql-15``), in a temporary
directory, for the tests that must hold on more than one PostgreSQL (tests/test_plans.py) and for
``benchmarks/run.py --server pg15``.

PostgreSQL refuses to run as root: as root the server runs as the ``postgres`` OS user the package
creates, in a directory it owns; as any other user it runs as that user. :func:`unavailable` says why a
server cannot be started here (no binaries, root without a ``postgres`` user), so callers can skip with
that reason.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from psycopg.conninfo import make_conninfo

#: Where Debian's package puts a major version's server binaries.
BINDIR = "/usr/lib/postgresql/{version}/bin"
#: A fixed port instead of a free one (the OS's choice), e.g. where only some ports may be used.
PORT_ENV = "PGQ_TEST_PG_PORT"


def bindir(version: int) -> Path:
    return Path(BINDIR.format(version=version))


def unavailable(version: int) -> str | None:
    """Why Debian's PostgreSQL *version* cannot be started here, or None if it can."""
    if not (bindir(version) / "initdb").is_file() or not (bindir(version) / "pg_ctl").is_file():
        return f"Debian's PostgreSQL {version} is not installed (no {bindir(version)}/initdb; apt-get install " \
               f"postgresql-{version})"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root, and there is no 'postgres' OS user to run PostgreSQL as"
    return None


def free_port() -> int:
    if os.environ.get(PORT_ENV):
        return int(os.environ[PORT_ENV])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(args: list[str], timeout: float) -> None:
    """Run a server binary, as the postgres OS user when we are root; its output goes into the error."""
    if os.geteuid() == 0:
        args = ["runuser", "-u", "postgres", "--", *args]
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited with {done.returncode}:\n{done.stdout}{done.stderr}")


@contextlib.contextmanager
def running(version: int = 15, settings: dict[str, str] | None = None) -> Iterator[str]:
    """Start Debian's PostgreSQL *version* in a new temporary directory on a free port of 127.0.0.1 and
    yield a superuser URL (database ``postgres``); stop it and delete the directory on exit. *settings*
    are server settings (``-c name=value``); the package's defaults otherwise."""
    reason = unavailable(version)
    if reason:
        raise RuntimeError(reason)
    tmpdir = tempfile.mkdtemp(prefix=f"pgq-pg{version}-")
    if os.geteuid() == 0:
        os.chown(tmpdir, pwd.getpwnam("postgres").pw_uid, -1)
    data, log = os.path.join(tmpdir, "data"), os.path.join(tmpdir, "server.log")
    port = free_port()
    options = " ".join([f"-p {port}", f"-k {tmpdir}", "-c listen_addresses=127.0.0.1",
                        *(f"-c {name}={value}" for name, value in (settings or {}).items())])
    started = False
    try:
        _run([str(bindir(version) / "initdb"), "-D", data, "-U", "postgres", "-A", "trust", "-E", "UTF8",
              "--no-sync"], timeout=120)
        _run([str(bindir(version) / "pg_ctl"), "-D", data, "-l", log, "-o", options, "-w", "-t", "60", "start"],
             timeout=90)
        started = True
        yield make_conninfo(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
    except RuntimeError as exc:
        if not started and os.path.exists(log):
            raise RuntimeError(f"{exc}\n{Path(log).read_text(errors='replace')[-2000:]}") from None
        raise
    finally:
        if started:
            # immediate: nothing of this server's data is kept, so there is nothing to checkpoint
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                _run([str(bindir(version) / "pg_ctl"), "-D", data, "-m", "immediate", "-w", "stop"], timeout=60)
        shutil.rmtree(tmpdir, ignore_errors=True)
