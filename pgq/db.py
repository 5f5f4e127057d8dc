"""Where the database is, and how pgq connects to it."""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from .errors import DatabaseUnavailable
from .humanize import error_line

log = logging.getLogger("pgq.worker")

#: Seconds to wait for a connection unless the URL says otherwise (connect_timeout=…).
CONNECT_TIMEOUT = 10

#: How a TCP connection to a database that stopped answering fails, unless the URL sets these libpq
#: parameters itself. A partition, a failover that moved the server's address, or a server machine that
#: lost power sends no RST: the kernel's defaults retransmit unacknowledged data for about 15 minutes
#: (tcp_retries2 = 15) and probe an idle connection only after 2 hours. A worker's heartbeat sent into such
#: a connection blocks: on a partitioned test host (tests/test_hosts.py) it had not failed 33 s later,
#: when the test gave up, 16 times the jobs' lease. With these, data unacknowledged for 10 s
#: (tcp_user_timeout), or a connection silent for 5 s and then deaf to 3 probes 2 s apart (keepalives: a
#: statement the server took and has not answered, the listener's idle connection), fails: the heartbeat,
#: claim and listener connections of that host failed 10.6-10.8 s after the cut. 10 s is a third of the
#: default lease (30 s), like the heartbeat's interval: a heartbeat stuck on a dead connection fails, and
#: its retry on a new connection (connect_timeout 10 s) can land, before the lease it renews runs out.
#: Too low, and a congested link that drops packets for a few seconds costs connections that would have
#: recovered; too high, and leases expire on workers that are only waiting for a dead connection. Ignored
#: for Unix sockets. The server's side of the same connections: SERVER_SIDE.
TCP_TIMEOUTS = {"keepalives": "1", "keepalives_idle": "5", "keepalives_interval": "2", "keepalives_count": "3",
                "tcp_user_timeout": "10000"}

URL_ENV_VARS = ("PGQ_DATABASE_URL", "DATABASE_URL")

_SQLALCHEMY_SCHEME = re.compile(r"^postgres(?:ql)?\+[a-z0-9_]+://", re.IGNORECASE)


def normalize_url(url: str) -> str:
    """Accept the URLs users already have: SQLAlchemy's ``postgresql+psycopg://`` and Heroku's
    ``postgres://`` become plain libpq URLs; conninfo strings (``host=… dbname=…``) pass through."""
    url = url.strip()
    if _SQLALCHEMY_SCHEME.match(url):
        url = "postgresql://" + url.split("://", 1)[1]
    return url


def configured_url(url: str | None = None) -> str | None:
    """The database URL by precedence: argument > PGQ_DATABASE_URL > DATABASE_URL; None if none is set."""
    if url:
        return normalize_url(url)
    for var in URL_ENV_VARS:
        if os.environ.get(var):
            return normalize_url(os.environ[var])
    return None


def prepare_threshold() -> int | None:
    """psycopg prepares a statement after it ran this many times on a connection. ``PGQ_PREPARE=0``
    turns that off for poolers that cannot keep prepared statements (PgBouncer < 1.21 in transaction
    mode)."""
    return None if os.environ.get("PGQ_PREPARE", "1").lower() in ("0", "false", "no", "off") else 5


def tcp_timeouts(given: dict[str, Any]) -> dict[str, str]:
    """TCP_TIMEOUTS, less those the connection parameters *given* (a URL's, or keywords) set."""
    return {name: value for name, value in TCP_TIMEOUTS.items() if name not in given}


def connect(url: str, *, autocommit: bool = False, role: str = "client", settings: dict[str, str] | None = None,
            **kwargs: Any) -> psycopg.Connection:
    """Open a connection tagged with pgq's application_name, so operators can tell pgq's sessions apart
    in ``pg_stat_activity``. *settings* are session settings (SET), applied only where sessions are pgq's
    own: not with prepared statements off (PGQ_PREPARE=0), pgq's sign that a transaction pooler such as
    PgBouncer hands the server session to other clients between statements."""
    given = conninfo_to_dict(url)
    if "connect_timeout" not in kwargs and "connect_timeout" not in given:
        # libpq would wait indefinitely (psycopg: 130 s) for a server that does not answer; a worker
        # would rather back off and retry, and a stopping worker must not hang on it.
        kwargs["connect_timeout"] = CONNECT_TIMEOUT
    kwargs = {**tcp_timeouts(given), **kwargs}
    try:
        conn = psycopg.connect(
            url,
            autocommit=autocommit,
            application_name=f"pgq-{role}",
            prepare_threshold=kwargs.pop("prepare_threshold", prepare_threshold()),
            **kwargs,
        )
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailable(f"cannot connect to the database: {error_line(exc)}") from exc
    wanted = {}
    if role in INDEX_ONLY_ROLES:
        options = given.get("options") or ""  # the URL's own -c settings win
        wanted = {"enable_seqscan": "off", **{k: v for k, v in SERVER_SIDE.items() if k not in options}}
    if role in GENERIC_PLAN_ROLES:
        wanted["plan_cache_mode"] = "force_generic_plan"
    wanted.update(settings or {})
    if wanted and conn.prepare_threshold is not None:
        try:  # one round trip for them all
            conn.execute("SELECT " + ", ".join(["set_config(%s, %s, false)"] * len(wanted)),
                         [x for item in wanted.items() for x in item])
        except psycopg.Error:
            conn.close()
            raise
        if not autocommit:
            conn.commit()
    return conn


#: The connections whose every statement reaches pgq.jobs through an index (the claim, outcome, lease,
#: rescue and pruning statements), and run prepared. PostgreSQL plans a prepared statement generically
#: once, with the table's size at that moment, and keeps the plan until the next ANALYZE. A worker that
#: started on an empty table kept a sequential-scan plan for its outcome batches: 30-70 ms per batch of
#: 45 once 300,000 jobs had arrived, against 2 ms through the primary key, until autovacuum's ANALYZE,
#: a minute later. With sequential scans off, every plan uses the indexes whatever the statistics say.
#: Not without prepared statements (--no-prepare, for PgBouncer in transaction mode): each statement is
#: then planned afresh, and a session setting would leak to other clients through the pooler.
INDEX_ONLY_ROLES = frozenset({"worker", "listener", "pruner", "scheduler"})

#: The server's side of the same connections (INDEX_ONLY_ROLES, and not behind PgBouncer, like them): how
#: the server gives up on a worker that vanished behind a partition, as the worker gives up on the server
#: (TCP_TIMEOUTS), instead of keeping its session for the kernel's 15 minutes to 2 hours. An orphaned
#: session holds a connection slot; one cut off inside a transaction (the recorder's batch of retries and
#: failures, the limited claim) also holds the row locks of its jobs, and the rescue, which skips locked
#: rows, cannot give those jobs to anyone until the session ends. pgq's transactions send their statements
#: back to back, so 10 s idle inside one means the worker is gone. Too low, and a worker whose link stalls
#: for longer than this mid-transaction has it rolled back (it retries the batch on a new connection); too
#: high, and its jobs wait that long after their lease. The TCP settings are ignored on Unix sockets.
SERVER_SIDE = {"idle_in_transaction_session_timeout": "10s", "tcp_keepalives_idle": "5",
               "tcp_keepalives_interval": "2", "tcp_keepalives_count": "3", "tcp_user_timeout": "10000"}
#: The connections of a worker's own threads (claim, recorder, keeper) plan each statement once, generically
#: (plan_cache_mode = force_generic_plan), instead of planning it afresh with the values of each execution.
#: A fresh (custom) plan sees the values, and the statistics: once ANALYZE had seen a backlog with no lease
#: set, the custom plan of an outcome batch (COMPLETE_MANY) walked the whole primary key instead of looking
#: up its ids, 26-40 ms for 300 ids on 20,000 jobs against 0.35 ms, and more as the table grew (PostgreSQL
#: plans the first five executions of a prepared statement custom, and the unprepared ones always). The
#: generic plan, made without the values, looks up the ids. It also spares the server a planning per
#: execution: 0.3 ms per claim (Worker._claim_connection). With --no-prepare no session setting is made,
#: every statement is planned with its values, and the statements' own shapes keep the plans (pgq.sql).
GENERIC_PLAN_ROLES = frozenset({"worker"})


def describe_url(url: str) -> str:
    """The URL without its password, for messages."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def hostname() -> str:
    return socket.gethostname()


class Reconnect:
    """How a long-lived pgq thread (claim, listener, recorder, heartbeat, scheduler) waits before trying
    the database again: 0.1 s, doubling to 5 s, reset by a success. Each wait is logged: an outage as a
    warning, any other database error (a missing grant, a read-only standby) as an error."""

    def __init__(self, logger: logging.Logger = log) -> None:
        self.delay = 0.1
        self.log = logger

    def reset(self) -> None:
        self.delay = 0.1

    def wait(self, stop: threading.Event, what: str, exc: BaseException) -> None:
        """After an outage (OperationalError, DatabaseUnavailable)."""
        self.log.warning("database unavailable (%s): %s; retrying in %.1f s", what, error_line(exc), self.delay)
        self._sleep(stop)

    def failed(self, stop: threading.Event, what: str, exc: BaseException) -> None:
        """After any other database error: loud, but the thread lives on."""
        self.log.error("%s failed: %s: %s; retrying in %.1f s", what, type(exc).__name__, error_line(exc), self.delay)
        self._sleep(stop)

    def _sleep(self, stop: threading.Event) -> None:
        stop.wait(self.delay)
        self.delay = min(self.delay * 2, 5.0)
