"""Helpers for tests: waiting with deadlines, and worker processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def wait_for(condition: Callable[[], Any], timeout: float = 20.0, interval: float = 0.02, what: str = "") -> Any:
    """Poll *condition* until it returns something truthy, or fail after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or condition}")
        time.sleep(interval)


def scalar(conn, query: str, params: Any = None) -> Any:
    row = conn.execute(query, params).fetchone()
    return row[0] if row else None


class WorkerProcess:
    """A real ``pgq worker`` subprocess running the tasks of tests/apps.py."""

    def __init__(self, db_url: str, *args: str, app: str = "tests.apps", env: dict[str, str] | None = None,
                 prefix: tuple[str, ...] = ()):
        """*prefix* runs the command through another, e.g. ``ip netns exec HOST`` (tests/netns.py)."""
        cmd = [*prefix, sys.executable, "-m", "pgq.cli", "--database-url", db_url, "-A", app, "worker",
               "--rescue-interval", "0.5", "--poll-interval", "0.5", *args]
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"pgq-worker-{os.getpid()}-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "w+")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log_path.read_text()

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def wait(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self, timeout: float = 15.0) -> str:
        """SIGTERM, wait, and return everything the worker logged."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        output = self.output() if self.log_path.exists() else ""
        self._log.close()
        self.log_path.unlink(missing_ok=True)
        return output


def job(conn, job_id: int) -> dict[str, Any]:
    """The pgq.jobs row of *job_id* as a dict (timestamps as datetimes, jsonb decoded)."""
    cur = conn.execute("SELECT * FROM pgq.jobs WHERE id = %s", (job_id,))
    row = cur.fetchone()
    assert row is not None, f"no job {job_id}"
    return dict(zip([c.name for c in cur.description], row, strict=True))


def wait_registered(conn, worker: WorkerProcess, timeout: float = 20.0) -> None:
    """Wait until *worker* has its row in pgq.workers: its signal handlers are installed by then.
    Fails at once, with the worker's output, if the process exits instead."""

    def registered() -> bool:
        code = worker.proc.poll()
        if code is not None:
            raise AssertionError(f"worker {worker.pid} exited with {code} before registering:\n{worker.output()}")
        return bool(scalar(conn, "SELECT count(*) FROM pgq.workers WHERE pid = %s", (worker.pid,)))

    wait_for(registered, timeout=timeout, what=f"worker {worker.pid} to register in pgq.workers")
