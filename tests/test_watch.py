"""`pgq status --watch` and `pgq top`, run for real in a subprocess: the view follows the jobs table, and
SIGINT or SIGTERM ends it with exit code 0 and no traceback. On a pipe it prints one snapshot after
another (or JSON lines); on a terminal (a pseudo-terminal here) it redraws in place with rich."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import threading

import pytest
from click.testing import CliRunner

from pgq.cli import main
from tests.helpers import ROOT, scalar, wait_for

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class Watch:
    """A `pgq ... status --watch` process whose output (stdout and stderr apart, unless on a terminal) is
    collected by reader threads as it comes."""

    def __init__(self, db_url: str, *args: str, tty: bool = False):
        cmd = [sys.executable, "-m", "pgq.cli", "--database-url", db_url, *args]
        self.out: list[str] = []
        self.err: list[str] = []
        if tty:
            master, child = pty.openpty()
            fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 120, 0, 0))  # 50 rows, 120 columns
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdin=child, stdout=child, stderr=child,
                                         env={**os.environ, "TERM": "xterm-256color"})
            os.close(child)
            readers = [(master, self.out)]
            self._close = [lambda: os.close(master)]
        else:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            readers = [(self.proc.stdout.fileno(), self.out), (self.proc.stderr.fileno(), self.err)]
            self._close = [self.proc.stdout.close, self.proc.stderr.close]
        self.threads = [threading.Thread(target=self._read, args=r, daemon=True) for r in readers]
        for thread in self.threads:
            thread.start()

    @staticmethod
    def _read(fd: int, into: list[str]) -> None:
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # a pseudo-terminal's master reads EIO once the child has gone
                chunk = b""
            if not chunk:
                return
            into.append(chunk.decode(errors="replace"))

    def stdout(self) -> str:
        return ANSI.sub("", "".join(self.out))

    def stderr(self) -> str:
        return "".join(self.err)

    def alive(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"exited with {self.proc.returncode}:\n{self.stdout()}\n{self.stderr()}")
        return True

    def stop(self, signum: int = signal.SIGINT) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        try:
            code = self.proc.wait(timeout=10)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        for thread in self.threads:
            thread.join(timeout=5)
        while self._close:
            self._close.pop()()
        return code


@pytest.fixture
def watches():
    started: list[Watch] = []

    def start(*args, **kwargs) -> Watch:
        started.append(Watch(*args, **kwargs))
        return started[-1]

    yield start
    for watch in started:
        watch.stop(signal.SIGKILL)


def _queued(text: str, queue: str) -> list[str]:
    """The queued counts of *queue* in every snapshot printed so far, in order."""
    return re.findall(rf"^{queue} +(\d+) ", text, flags=re.MULTILINE)


def _enqueue(conn, queue: str, n: int) -> None:
    conn.execute("INSERT INTO pgq.jobs (queue, task_name) SELECT %s, 'tests.add' FROM generate_series(1, %s)",
                 (queue, n))


def test_watch_on_a_pipe_prints_snapshot_after_snapshot_and_sigint_exits_0(conn, db_url, watches):
    _enqueue(conn, "watched", 2)
    watch = watches(db_url, "status", "--watch", "--interval", "0.2")
    wait_for(lambda: watch.alive() and _queued(watch.stdout(), "watched"), what="a first snapshot")
    _enqueue(conn, "watched", 3)
    conn.execute("INSERT INTO pgq.jobs (queue, task_name, status, attempts, started_at, finished_at) "
                 "VALUES ('watched', 'tests.add', 'succeeded', 1, now(), now())")
    wait_for(lambda: watch.alive() and _queued(watch.stdout(), "watched")[-1] == "5", what="5 queued jobs shown")
    out = watch.stdout()
    assert _queued(out, "watched")[0] == "2"
    assert out.count("pgq status at ") >= 2 and "\x1b" not in "".join(watch.out)  # plain text on a pipe
    wait_for(lambda: "watched succeeded" in watch.stdout(), what="the finished job's throughput")
    assert watch.stop(signal.SIGINT) == 0
    assert watch.stderr() == ""  # no traceback, nothing at all


def test_watch_json_prints_one_line_per_refresh_and_sigterm_exits_0(conn, db_url, watches):
    watch = watches(db_url, "status", "--watch", "--json", "--interval", "0.2")

    def snapshots():
        watch.alive()
        return [json.loads(line) for line in watch.stdout().splitlines() if line.strip()]

    wait_for(lambda: snapshots(), what="a first line of JSON")
    assert snapshots()[0]["queues"] == {}
    _enqueue(conn, "watched", 4)
    wait_for(lambda: "watched" in snapshots()[-1]["queues"], what="the new queue in the JSON")
    last = snapshots()[-1]
    assert last["queues"]["watched"]["counts"]["queued"] == 4 and last["workers"] == []
    assert watch.stop(signal.SIGTERM) == 0 and watch.stderr() == ""


def test_watch_on_a_terminal_redraws_in_place_and_ctrl_c_exits_0(conn, db_url, watches):
    _enqueue(conn, "watched", 1)
    watch = watches(db_url, "top", "--interval", "0.2", tty=True)
    wait_for(lambda: watch.alive() and _queued(watch.stdout(), "watched"), what="a first view")
    _enqueue(conn, "watched", 6)
    wait_for(lambda: watch.alive() and _queued(watch.stdout(), "watched")[-1] == "7", what="7 queued jobs shown")
    raw = "".join(watch.out)
    assert "\x1b[2K\x1b[1A" in raw  # rich's Live moved the cursor up to redraw in place
    assert "Ctrl-C to stop" in watch.stdout()
    assert watch.stop(signal.SIGINT) == 0
    assert "Traceback" not in watch.stdout() and "KeyboardInterrupt" not in watch.stdout()


def test_watch_survives_a_lost_connection(conn, db_url, watches):
    watch = watches(db_url, "status", "--watch", "--interval", "0.2")
    wait_for(lambda: watch.alive() and "pgq status at" in watch.stdout(), what="a first snapshot")
    wait_for(lambda: scalar(conn, "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                  "WHERE application_name = 'pgq-cli' AND datname = current_database()"),
             what="the watch's connection to be killed")
    wait_for(lambda: watch.alive() and "refresh failed at" in watch.stderr(), what="the failed refresh")
    assert watch.stderr().count("\n") == watch.stderr().count("refresh failed at")  # one line each
    _enqueue(conn, "after", 2)
    wait_for(lambda: watch.alive() and _queued(watch.stdout(), "after"), what="a snapshot after reconnecting")
    assert watch.stop() == 0


def test_interval_without_watch_is_one_line(db_url):
    result = CliRunner().invoke(main, ["--database-url", db_url, "status", "--interval", "1"])
    assert result.exit_code == 1 and result.stderr.strip() == "Error: --interval goes with --watch"


def test_watch_on_an_unreachable_database_is_one_line():
    result = CliRunner().invoke(main, ["--database-url", "postgresql://u:p@127.0.0.1:1/x", "status", "--watch"])
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("Error: cannot connect to the database")
