"""The ``pgq`` command: a thin layer over the library, with Celery's flags where Celery has one."""

from __future__ import annotations

import contextlib
import decimal
import importlib
import json
import logging
import os
import shutil
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import click
import psycopg

from . import control, db, doctor, grants, inspection, migrate, periodic, pruner, sql
from .app import App
from .errors import ConfigurationError, Error, JobNotFound
from .humanize import duration, error_line

LOG_LEVELS = ["debug", "info", "warning", "error", "critical"]
FOREVER = "forever"


class Duration(click.ParamType):
    """90s, 15m, 12h, 1d, 2w, 1d12h or plain seconds; with *forever*, also ``forever`` (kept as that word)."""

    name = "duration"

    def __init__(self, forever: bool = False):
        self.forever = forever

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, timedelta) or (self.forever and value == FOREVER):
            return value
        try:
            parsed = pruner.parse_duration(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        if parsed is None:
            if not self.forever:
                self.fail("a finite duration is needed here", param, ctx)
            return FOREVER
        return parsed


def _retention_options(fn: Any) -> Any:
    """--keep-succeeded/--keep-cancelled/--keep-failed, shared by `pgq worker` and `pgq prune` (and their
    PGQ_KEEP_* environment variables), so both prune alike."""
    for state in reversed(pruner.STATES):
        default = pruner.format_duration(pruner.DEFAULT_RETENTION[state])
        fn = click.option(f"--keep-{state}", f"keep_{state}", type=Duration(forever=True), default=default,
                          envvar=f"PGQ_KEEP_{state.upper()}", show_default=True,
                          help=f"How long {state} jobs and their results are kept after they finish (e.g. 12h, "
                               f"7d, or forever) [env: PGQ_KEEP_{state.upper()}]")(fn)
    return fn


def _keep(params: dict[str, Any]) -> dict[str, timedelta | None]:
    """The retention the --keep-* options give (and remove from *params*)."""
    values = {state: params.pop(f"keep_{state}") for state in pruner.STATES}
    return {state: None if value == FOREVER else value for state, value in values.items()}


class _Group(click.Group):
    """Turns pgq's and the database's errors into one line on stderr and exit code 1; ``-l debug``
    shows the traceback instead."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (Error, psycopg.Error, ImportError) as exc:
            if _debug(ctx):
                raise
            message = str(exc).strip().splitlines()
            click.echo(f"Error: {message[-1] if message else type(exc).__name__}", err=True)
            ctx.exit(1)


def _debug(ctx: click.Context) -> bool:
    level = (ctx.obj or {}).get("loglevel") or ctx.params.get("loglevel") or ""
    return str(level).lower() == "debug"


def load_app(target: str | None, database_url: str | None) -> App:
    """``-A module:attribute`` or ``-A module`` (the App found in it); no -A: an App without tasks."""
    if not target:
        return App(database_url)
    module_name, _, attribute = target.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `celery -A proj`, find modules in the current directory
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"-A {target}: cannot import module {module_name!r} ({exc})") from exc
    if attribute:
        try:
            app = getattr(module, attribute)
        except AttributeError:
            raise ConfigurationError(f"-A {target}: module {module_name!r} has no attribute {attribute!r}") from None
    else:
        found = [value for value in vars(module).values() if isinstance(value, App)]
        if not found:
            raise ConfigurationError(f"-A {target}: no pgq.App found in module {module_name!r}")
        if len(found) > 1 and isinstance(getattr(module, "app", None), App):
            found = [module.app]
        if len(found) > 1:
            raise ConfigurationError(f"-A {target}: several pgq.App objects in {module_name!r}; name one with -A "
                                     f"{module_name}:NAME")
        app = found[0]
    if not isinstance(app, App):
        raise ConfigurationError(f"-A {target}: {type(app).__name__} is not a pgq.App")
    if database_url:
        app.set_database_url(database_url)
    return app


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="[%(asctime)s: %(levelname)s/%(name)s] %(message)s",
        stream=sys.stderr,
    )


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--database-url", metavar="URL",
              help="libpq URL or conninfo of the database; wins over the App's own URL, which wins over "
                   "PGQ_DATABASE_URL, then DATABASE_URL; with none of them: the embedded PostgreSQL in ./.pgq")
@click.option("-A", "--app", "app_target", envvar="PGQ_APP", metavar="MODULE[:ATTR]",
              help="Where your pgq.App lives, e.g. proj.tasks:app or proj.tasks [env: PGQ_APP]")
@click.option("-l", "--loglevel", type=click.Choice(LOG_LEVELS, case_sensitive=False), default="info",
              envvar="PGQ_LOGLEVEL", help="Log level; 'debug' also shows tracebacks of errors [env: PGQ_LOGLEVEL]")
@click.version_option(package_name="pgq-jobs")
@click.pass_context
def main(ctx: click.Context, database_url: str | None, app_target: str | None, loglevel: str) -> None:
    """pgq: a durable job queue whose only infrastructure is PostgreSQL.

    \b
    Typical use:
      pgq -A proj.tasks migrate
      pgq -A proj.tasks worker -Q default,emails -c 8
      pgq -A proj.tasks status
    """
    ctx.ensure_object(dict)
    ctx.obj["database_url"] = database_url
    ctx.obj["app_target"] = app_target
    ctx.obj["loglevel"] = loglevel


def _app(ctx: click.Context) -> App:
    obj = ctx.find_root().obj
    if "app" not in obj:
        obj["app"] = load_app(obj["app_target"], obj["database_url"])
    return obj["app"]


@main.command("migrate")
@click.pass_context
def migrate_cmd(ctx: click.Context) -> None:
    """Create or upgrade pgq's schema (idempotent; safe to run from several places at once)."""
    app = _app(ctx)
    setup_logging("warning")
    app.migrate()
    click.echo(f"pgq schema is at revision {migrate.head_revision()}")


@main.command("worker")
@click.option("-B", "--beat", is_flag=True, envvar="PGQ_BEAT",
              help="Also run the periodic scheduler in this process (as many as you like may run: each tick is "
                   "enqueued once) [env: PGQ_BEAT=1]")
@click.option("-Q", "--queues", default="default", envvar="PGQ_QUEUES",
              help="Comma-separated queues to take jobs from [env: PGQ_QUEUES]")
@click.option("-c", "--concurrency", type=click.IntRange(min=1), envvar="PGQ_CONCURRENCY",
              help="Jobs run at once (threads) [env: PGQ_CONCURRENCY; default: CPU count]")
@click.option("-P", "--pool", type=click.Choice(["threads", "solo"]), default="threads", envvar="PGQ_POOL",
              help="threads, or solo to run one job at a time in the main thread (debugging) [env: PGQ_POOL]")
@click.option("--poll-interval", type=click.FloatRange(min=0.01), default=1.0, envvar="PGQ_POLL_INTERVAL",
              help="Seconds between polls without NOTIFY; bounds how late scheduled jobs start "
                   "[env: PGQ_POLL_INTERVAL]")
@click.option("--shutdown-grace", type=click.FloatRange(min=0), default=30.0, envvar="PGQ_SHUTDOWN_GRACE",
              help="Seconds running jobs get to finish after SIGTERM/SIGINT [env: PGQ_SHUTDOWN_GRACE]")
@click.option("--listen/--no-listen", default=True, envvar="PGQ_LISTEN",
              help="Wake on NOTIFY; --no-listen polls only (PgBouncer transaction mode) [env: PGQ_LISTEN=0]")
@click.option("--rescue-interval", type=click.FloatRange(min=0.1), default=5.0, envvar="PGQ_RESCUE_INTERVAL",
              help="Seconds between sweeps for jobs whose lease expired [env: PGQ_RESCUE_INTERVAL]")
@click.option("--prefetch", type=click.IntRange(min=0), default=None, envvar="PGQ_PREFETCH",
              help="Jobs claimed ahead of free runners, so short jobs never wait for a claim round trip "
                   "[env: PGQ_PREFETCH; default: adaptive, about 20 ms of work per runner]")
@click.option("--task-timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              envvar="PGQ_TASK_TIMEOUT",
              help="Seconds a job may run when its task sets no timeout of its own; the attempt then fails "
                   "and is retried [env: PGQ_TASK_TIMEOUT; default: no limit]")
@_retention_options
@click.option("--prune-interval", type=click.FloatRange(min=0.1), default=pruner.INTERVAL, envvar="PGQ_PRUNE_INTERVAL",
              help="Seconds between pruning rounds; each round, one worker (whichever asks first) deletes the finished "
                   "jobs past their --keep-* time, 5,000 per transaction [env: PGQ_PRUNE_INTERVAL]")
@click.option("--prune/--no-prune", "prune", default=True, envvar="PGQ_PRUNE",
              help="Take part in pruning finished jobs; --no-prune leaves it to other workers or `pgq prune` "
                   "[env: PGQ_PRUNE=0]")
@click.option("--prepare/--no-prepare", default=True, envvar="PGQ_PREPARE",
              help="Use server-side prepared statements; --no-prepare for poolers that cannot keep them "
                   "(PgBouncer < 1.21 in transaction mode) [env: PGQ_PREPARE=0]")
@click.option("--non-durable-claims", is_flag=True, envvar="PGQ_NON_DURABLE_CLAIMS",
              help="Commit claims without waiting for the disk: jobs start one disk flush sooner, but a database "
                   "crash can undo the last moments' claims, and their jobs may then run twice at once for up "
                   "to a third of their lease [env: PGQ_NON_DURABLE_CLAIMS=1]")
@click.option("--metrics-port", type=click.IntRange(min=0, max=65535), default=None, envvar="PGQ_METRICS_PORT",
              help="Serve Prometheus metrics on this port (0: any free port, logged) [env: PGQ_METRICS_PORT]")
@click.option("--metrics-host", default="127.0.0.1", envvar="PGQ_METRICS_HOST",
              help="Address the metrics server binds [env: PGQ_METRICS_HOST]")
@click.option("-l", "--loglevel", type=click.Choice(LOG_LEVELS, case_sensitive=False), default=None,
              help="Log level (same as the global -l)")
@click.pass_context
def worker_cmd(ctx: click.Context, queues: str, concurrency: int | None, pool: str, poll_interval: float,
               shutdown_grace: float, listen: bool, rescue_interval: float, prefetch: int | None,
               task_timeout: float | None, prune_interval: float, prune: bool,
               prepare: bool, metrics_port: int | None, metrics_host: str, loglevel: str | None,
               non_durable_claims: bool = False, beat: bool = False, **keep: Any) -> None:
    """Run a worker: claim jobs from the queues, run them, record results.

    SIGTERM or SIGINT stops claiming, hands back jobs not yet started, and lets running jobs finish
    for up to --shutdown-grace seconds; a second signal stops waiting. Exits 0.
    """
    if not prepare:
        # Process-wide: the worker's connections and the app's own pool (tasks that enqueue) both obey it.
        os.environ["PGQ_PREPARE"] = "0"
    obj = ctx.find_root().obj
    obj["loglevel"] = loglevel or obj["loglevel"]
    setup_logging(obj["loglevel"])
    app = _app(ctx)
    worker = app.worker(queues=queues, concurrency=concurrency, pool=pool, poll_interval=poll_interval,
                        shutdown_grace=shutdown_grace, listen=listen, rescue_interval=rescue_interval,
                        task_timeout=task_timeout, prefetch=prefetch, retention=_keep(keep),
                        prune_interval=prune_interval if prune else None,
                        metrics=None if metrics_port is None else (metrics_host, metrics_port),
                        non_durable_claims=non_durable_claims)
    if not app.tasks:
        logging.getLogger("pgq.worker").warning("no tasks registered: pass -A module:app so the worker can "
                                                "run your tasks (jobs would fail as unknown tasks)")
    if beat:
        _run_with_beat(app, worker)
    else:
        worker.run()


@main.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts (with --watch: one line per refresh)")
@click.option("-w", "--watch", is_flag=True,
              help="Refresh until Ctrl-C: in place on a terminal, one snapshot after another otherwise")
@click.option("--interval", type=click.FloatRange(min=0.1), default=2.0, metavar="SECONDS",
              help="Seconds between refreshes with --watch (each one counts every job: see docs/operations.md)")
@click.pass_context
def status_cmd(ctx: click.Context, as_json: bool, watch: bool, interval: float) -> None:
    """Jobs per queue and state, the oldest due job's wait, the jobs finished per minute over the last 1, 5
    and 15 minutes, and the workers alive. --watch (or `pgq top`) keeps it up to date."""
    if not watch and ctx.get_parameter_source("interval") is not click.core.ParameterSource.DEFAULT:
        raise click.ClickException("--interval goes with --watch")
    app = _app(ctx)
    if watch:
        _watch(app, interval, as_json)
        return
    with db.connect(app.database_url, role="cli", autocommit=True) as conn:
        migrate.check(conn)
        snapshot = inspection.status(conn)
    if as_json:
        click.echo(json.dumps(_status_json(snapshot), indent=2))
        return
    _echo(*_status_view(snapshot))


@main.command("top")
@click.option("--interval", type=click.FloatRange(min=0.1), default=2.0, metavar="SECONDS",
              help="Seconds between refreshes")
@click.pass_context
def top_cmd(ctx: click.Context, interval: float) -> None:
    """`pgq status --watch`: the status, refreshed in place until Ctrl-C."""
    _watch(_app(ctx), interval, as_json=False)


def _status_json(snapshot: dict[str, Any]) -> dict[str, Any]:
    return {
        "now": snapshot["now"].isoformat(),
        "queues": {q: {"counts": e["counts"],
                       "oldest_due_seconds": None if e["oldest_due"] is None else e["oldest_due"].total_seconds(),
                       "finished": e["finished"]}
                   for q, e in snapshot["queues"].items()},
        "workers": [{"id": w["id"], "hostname": w["hostname"], "pid": w["pid"], "queues": w["queues"],
                     "concurrency": w["concurrency"], "running_jobs": w["running_jobs"],
                     "seconds_since_heartbeat": w["since_heartbeat"].total_seconds(), "alive": w["alive"]}
                    for w in snapshot["workers"]],
    }


def _status_view(snapshot: dict[str, Any], width: int | None = None) -> list[str | list[Line]]:
    """`pgq status` for people: a table of the queues' jobs per state, one of the jobs finished per minute
    (averaged over the last 1, 5 and 15 minutes, like a load average), and the workers, as _echo prints them
    (*width*: see _table)."""
    states = list(inspection.STATES)
    queues = snapshot["queues"]
    table = [[q, *(str(e["counts"][s]) for s in states), _due(e["oldest_due"])] for q, e in queues.items()]
    if not table:
        table = [["(no jobs)", *("0" for _ in states), "-"]]
    out: list[str | list[Line]] = [_table(["queue", *states, "oldest due"], table, shrink=(0,),
                             right=tuple(range(1, len(states) + 2)), width=width)]
    labels = [label for label, _ in inspection.WINDOWS]
    rates = [[f"{q} {s}", *(_per_minute(e["finished"][label][s], minutes, s) for label, minutes in inspection.WINDOWS)]
             for q, e in queues.items() for s in inspection.FINISHED if e["finished"][labels[-1]][s]]
    out.append("")
    if rates:
        out.append(_table(["finished per minute", *(f"last {label}" for label in labels)], rates, shrink=(0,),
                          right=tuple(range(1, len(labels) + 1)), width=width))
    else:
        out.append(f"finished per minute: no job finished in the last {labels[-1]}")
    workers = snapshot["workers"]
    alive = [w for w in workers if w["alive"]]
    out.append("")
    out.append(f"workers alive: {len(alive)}" + (f" (and {len(workers) - len(alive)} not heard from in "
                                                 f"{inspection.STALE_WORKER.total_seconds():.0f} s: killed?)"
                                                 if len(alive) < len(workers) else ""))
    for w in workers:
        out.append(f"  {w['id']}  queues={','.join(w['queues'])}  concurrency={w['concurrency']}  "
                   f"running={w['running_jobs']}  last heartbeat {w['since_heartbeat'].total_seconds():.1f} s ago"
                   + ("" if w["alive"] else "  STALE"))
    return out


def _due(oldest: timedelta | None) -> Cell:
    text = duration(oldest)
    return (text, "yellow") if oldest is not None and oldest >= timedelta(minutes=1) else text


def _per_minute(count: int, minutes: int, state: str) -> Cell:
    rate = count / minutes
    text = "0" if not rate else f"{rate:.1f}" if rate < 10 else f"{rate:,.0f}"
    return (text, "red") if rate and state == "failed" else text


def _watch(app: App, interval: float, as_json: bool) -> None:
    """`pgq status --watch`: a snapshot every *interval* seconds until SIGINT or SIGTERM, which end it with
    exit code 0. On a terminal (rich's Live) the view is redrawn in place; otherwise each snapshot is printed
    after the last (JSON: one line each), so it can be logged or piped. A failed refresh (database restarted)
    is shown, and the next one reconnects; only a failure of the first is an error."""
    import signal

    fetched = time.monotonic()
    conn: psycopg.Connection | None = db.connect(app.database_url, role="cli", autocommit=True)
    try:
        migrate.check(conn)
        snapshot = inspection.status(conn)
    except BaseException:
        conn.close()
        raise

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    # Installed even where SIGINT was ignored (started in the background): Ctrl-C is how a watch ends.
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    error: str | None = None
    try:
        view = _terminal_view(interval) if sys.stdout.isatty() and not as_json else _stream_view(as_json)
        with view as show:
            while True:
                show(snapshot, error)
                time.sleep(max(0.0, interval - (time.monotonic() - fetched)))  # one snapshot per interval
                fetched = time.monotonic()
                try:
                    if conn is None:
                        conn = db.connect(app.database_url, role="cli", autocommit=True)
                        migrate.check(conn)
                    snapshot, error = inspection.status(conn), None
                except (Error, psycopg.Error) as exc:
                    error = f"{time.strftime('%H:%M:%S')}: {error_line(exc)} (retrying every {interval:g} s)"
                    if conn is not None:
                        conn.close()
                    conn = None
    except KeyboardInterrupt:
        pass  # the one way out: exit code 0, no traceback
    finally:
        for sig, handler in previous.items():
            if handler is not None:
                signal.signal(sig, handler)
        if conn is not None:
            conn.close()


@contextlib.contextmanager
def _terminal_view(interval: float) -> Iterator[Callable[[dict[str, Any], str | None], None]]:
    """A function that redraws the status in place (rich's Live), fitted to the terminal's current width."""
    from rich.console import Console, Group
    from rich.live import Live
    from rich.text import Text

    console = Console(highlight=False)
    with Live(console=console, auto_refresh=False) as live:

        def show(snapshot: dict[str, Any], error: str | None) -> None:
            parts = [Text(f"pgq status at {_ts(snapshot['now'])}, every {interval:g} s; Ctrl-C to stop", style="dim")]
            if error:
                parts.append(Text(f"refresh failed at {error}; this is the last snapshot", style="bold red"))
            parts.append(Text(""))
            for part in _status_view(snapshot, width=console.width):
                lines = [[(part, "")]] if isinstance(part, str) else part
                parts += [Text.assemble(*line, no_wrap=True, overflow="ellipsis") for line in lines]
            live.update(Group(*parts), refresh=True)

        yield show


@contextlib.contextmanager
def _stream_view(as_json: bool) -> Iterator[Callable[[dict[str, Any], str | None], None]]:
    """A function that prints each snapshot after the last (titled, or as one line of JSON) for logs and
    pipes; a failed refresh is one line on stderr instead."""

    def show(snapshot: dict[str, Any], error: str | None) -> None:
        if error:
            click.echo(f"refresh failed at {error}", err=True)
        elif as_json:
            click.echo(json.dumps(_status_json(snapshot)))
        else:
            click.echo(f"pgq status at {_ts(snapshot['now'])}")
            _echo(*_status_view(snapshot))
            click.echo("")

    yield show


@main.command("limits")
@click.option("--keys", "with_keys", is_flag=True, help="Also list the concurrency keys claimed in the last hour")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts")
@click.pass_context
def limits_cmd(ctx: click.Context, with_keys: bool, as_json: bool) -> None:
    """Limits in the database: each queue's and task's concurrency and rate, the jobs running under it,
    and the tokens its bucket holds now. Workers write their app's limits when they start; see
    docs/limits.md."""
    app = _app(ctx)
    with db.connect(app.database_url, role="cli", autocommit=True) as conn:
        migrate.check(conn)
        rows = conn.execute(sql.LIMITS_LIST, {"with_keys": with_keys}).fetchall()
    entries = [{"limit": key, "concurrency": concurrency, "running": running, "rate_per_second": rate,
                "burst": burst if rate is not None else None, "tokens": tokens}
               for key, concurrency, running, rate, burst, tokens, _ in rows]
    if as_json:
        click.echo(json.dumps({"limits": entries}, indent=2))
        return
    if not entries:
        click.echo("(no limits: declare them with app.queue(..., concurrency=, rate_limit=) or "
                   "@app.task(rate_limit=), and start a worker)")
        return
    header = ["limit", "concurrency", "running", "rate", "burst", "tokens"]
    table = [[e["limit"], _or_dash(e["concurrency"]), _or_dash(e["running"]),
              "-" if e["rate_per_second"] is None else f"{e['rate_per_second']:g}/s",
              _or_dash(e["burst"]), "-" if e["tokens"] is None else f"{e['tokens']:.2f}"] for e in entries]
    _echo(_table(header, table, shrink=(0,), right=tuple(range(1, len(header)))))


def _or_dash(value: Any) -> str:
    return "-" if value is None else f"{value:g}"


@main.command("cancel")
@click.argument("job_ids", nargs=-1, required=True, type=click.IntRange(min=1), metavar="ID...")
@click.pass_context
def cancel_cmd(ctx: click.Context, job_ids: tuple[int, ...]) -> None:
    """Cancel jobs. A waiting job ends cancelled at once and never runs. A running job is asked to stop:
    its worker learns it on its next heartbeat, records the job cancelled and interrupts the task (a
    task that finishes first keeps its outcome). Finished jobs are left alone."""
    app = _app(ctx)
    with db.connect(app.database_url, role="cli", autocommit=True) as conn:
        migrate.check(conn)
        with conn.transaction():
            statuses = control.cancel(conn, job_ids)
    missing = []
    for job_id in dict.fromkeys(job_ids):
        status = statuses.get(job_id)
        if status is None:
            missing.append(job_id)
        elif status == "running":
            click.echo(f"job {job_id}: running, asked to stop (its worker stops it at its next heartbeat)")
        elif status == "cancelled":
            click.echo(f"job {job_id}: cancelled")
        else:
            click.echo(f"job {job_id}: {status} already, left alone")
    if missing:
        raise JobNotFound(f"no job with id {', '.join(map(str, missing))}")


@main.command("retry")
@click.argument("job_ids", nargs=-1, type=click.IntRange(min=1), metavar="[ID]...")
@click.option("--failed", is_flag=True, help="Retry every failed job of --task")
@click.option("--cancelled", is_flag=True, help="Retry every cancelled job of --task")
@click.option("--task", "task_name", metavar="NAME", help="The task whose jobs --failed/--cancelled retries")
@click.option("--queue", metavar="QUEUE", help="Only the jobs of this queue (with --failed/--cancelled)")
@click.option("--batch-size", type=click.IntRange(min=1), default=control.BATCH,
              help="Jobs requeued per transaction (with --failed/--cancelled)")
@click.pass_context
def retry_cmd(ctx: click.Context, job_ids: tuple[int, ...], failed: bool, cancelled: bool, task_name: str | None,
              queue: str | None, batch_size: int) -> None:
    """Run failed or cancelled jobs again: each goes back to queued, due now, with its attempts reset (it
    gets its max_attempts again), its stored outcome deleted and its error history kept.

    \b
      pgq retry 123 124
      pgq retry --failed --task proj.tasks.send_email [--queue emails]

    In bulk, jobs are requeued 1,000 per transaction (--batch-size), each committed before the next is
    read, so it is safe while workers run; the jobs requeued so far are printed on stderr as it goes. A job
    whose unique key another job holds (waiting or running) is left alone.
    """
    bulk = failed or cancelled
    if bulk == bool(job_ids):
        raise click.ClickException("give job ids, or --failed (and/or --cancelled) with --task NAME")
    if bulk and not task_name:
        raise click.ClickException("--failed and --cancelled need --task NAME")
    if not bulk and (task_name or queue):
        raise click.ClickException("--task and --queue select the jobs of --failed or --cancelled")
    app = _app(ctx)
    with db.connect(app.database_url, role="cli", autocommit=True) as conn:
        migrate.check(conn)
        if bulk:
            assert task_name is not None
            statuses = [s for s, wanted in (("failed", failed), ("cancelled", cancelled)) if wanted]
            requeued, skipped = control.requeue_matching(conn, task_name=task_name, queue=queue, statuses=statuses,
                                                         batch=batch_size, progress=_progress("requeued"))
        else:
            with conn.transaction():
                outcome = control.requeue(conn, job_ids)
    if bulk:
        where = f" in queue {queue}" if queue else ""
        click.echo(f"requeued {requeued} {' or '.join(statuses)} job(s) of {task_name}{where}")
        if skipped:
            click.echo(f"left {skipped} alone: another job with the same unique key is waiting or running")
        return
    missing = []
    for job_id in dict.fromkeys(job_ids):
        status, done = outcome.get(job_id, (None, False))
        if status is None:
            missing.append(job_id)
        elif done:
            click.echo(f"job {job_id}: queued")
        elif status in control.RETRYABLE:
            click.echo(f"job {job_id}: {status}, not retried: another job with its unique key is waiting or running")
        else:
            click.echo(f"job {job_id}: {status}, not retried: only failed or cancelled jobs can be")
    if missing:
        raise JobNotFound(f"no job with id {', '.join(map(str, missing))}")


def _progress(verb: str) -> Callable[..., None]:
    """Progress of a long operation in batches, on stderr: after the first batch, then at most once a
    second ("requeued 41,000 job(s) so far (41 batch(es))"), so a terminal or a log shows it moving."""
    state = {"batches": 0, "last": 0.0}

    def report(done: int, *_: Any) -> None:  # called once per batch with the total so far
        state["batches"] += 1
        if state["batches"] == 1 or time.monotonic() - state["last"] >= 1.0:
            state["last"] = time.monotonic()
            click.echo(f"{verb} {done:,} job(s) so far ({state['batches']:,} batch(es))", err=True)

    return report


@main.command("grants")
@click.option("--role", required=True, help="The PostgreSQL role to grant to (quoted as an identifier)")
@click.option("--kind", type=click.Choice(list(grants.KINDS)), required=True,
              help="producer: enqueue and read results; worker: claim, run and record jobs, prune finished ones; "
                   "scheduler: enqueue periodic ticks (pgq beat; `worker -B` needs worker and scheduler); control: "
                   "cancel and retry jobs by hand; monitor: read-only (views, status, jobs, workers, limits, doctor)")
@click.option("--apply", "apply_", is_flag=True,
              help="Run the statements against the database instead of printing them (needs the schema owner)")
@click.pass_context
def grants_cmd(ctx: click.Context, role: str, kind: str, apply_: bool) -> None:
    """Print (or --apply) the exact GRANT statements a least-privilege role needs.

    \b
    Run migrations with the schema owner; give producers and workers these instead:
      pgq grants --role web --kind producer
      pgq grants --role jobs --kind worker
    A process that both enqueues and runs jobs needs both.
    """
    if not apply_:
        click.echo(grants.script(role, kind))
        return
    app = _app(ctx)
    with db.connect(app.database_url, role="cli") as conn:
        for statement in grants.statements(role, kind):
            conn.execute(statement)
    click.echo(f"granted {kind} privileges to {role}")


def _run_with_beat(app: App, worker: Any) -> None:
    """``worker -B``: the scheduler runs in a thread of the worker's process and stops after the worker."""
    with db.connect(app.database_url, role="cli", autocommit=True) as conn:
        migrate.check(conn)  # one error line, from here, rather than one from each thread
    if not app.schedules:
        logging.getLogger("pgq.periodic").warning("-B: no periodic schedules in this app (pass -A module:app)")
    scheduler = app.scheduler()
    thread = scheduler.start()
    try:
        worker.run()
    finally:
        scheduler.stop()
        thread.join(timeout=10)


@main.command("beat")
@click.option("--max-interval", type=click.FloatRange(min=0.1), default=5.0, envvar="PGQ_BEAT_MAX_INTERVAL",
              help="Longest sleep between two looks at the schedules, in seconds (the scheduler wakes at each "
                   "tick anyway) [env: PGQ_BEAT_MAX_INTERVAL]")
@click.option("-l", "--loglevel", type=click.Choice(LOG_LEVELS, case_sensitive=False), default=None,
              help="Log level (same as the global -l)")
@click.pass_context
def beat_cmd(ctx: click.Context, max_interval: float, loglevel: str | None) -> None:
    """Run the periodic scheduler: enqueue each due tick of the app's schedules.

    Run as many as you like, anywhere: every tick is enqueued exactly once (a unique key on the tick,
    no leader, no advisory lock). SIGTERM or SIGINT stops it; exits 0.
    """
    obj = ctx.find_root().obj
    obj["loglevel"] = loglevel or obj["loglevel"]
    setup_logging(obj["loglevel"])
    app = _app(ctx)
    if not app.schedules:
        logging.getLogger("pgq.periodic").warning("no periodic schedules: pass -A module:app with @app.periodic "
                                                  "or app.add_periodic schedules")
    app.scheduler(max_interval=max_interval).run()


@main.group("periodic")
def periodic_group() -> None:
    """Periodic tasks: see what is scheduled."""


@periodic_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts")
@click.pass_context
def periodic_list_cmd(ctx: click.Context, as_json: bool) -> None:
    """Each schedule: its task, when it fires, its next fire time and the last tick enqueued (read from
    the database, so it shows what every scheduler did). Cron times are shown in the schedule's zone."""
    app = _app(ctx)
    with db.connect(app.database_url, role="cli", autocommit=True) as conn:
        migrate.check(conn)
        now, statuses = periodic.overview(conn, list(app.schedules.values()))
    if as_json:
        click.echo(json.dumps({"now": now.isoformat(), "schedules": [{
            "name": s.name, "task": s.task_name, "when": s.when,
            "next_fire": None if s.next_fire is None else s.next_fire.isoformat(),
            "last_tick": None if s.last_tick is None else s.last_tick.isoformat(),
            "last_job_id": s.last_job_id, "last_job_status": s.last_job_status, "enqueued_by": s.enqueued_by,
        } for s in statuses]}, indent=2))
        return
    if not statuses:
        click.echo("(no periodic schedules: pass -A module:app)")
        return
    header = ["schedule", "task", "when", "next fire", "last tick", "last job"]
    table = []
    for s in statuses:
        next_fire = "-" if s.next_fire is None else (
            f"{_local(s.next_fire, s.zone)} (in {duration(s.next_fire - now)})")
        last_tick = "never" if s.last_tick is None else (
            f"{_local(s.last_tick, s.zone)} ({duration(now - s.last_tick)} ago)")
        last_job = "-" if s.last_job_id is None else f"{s.last_job_id} {s.last_job_status or '(pruned)'}"
        table.append([s.name, s.task_name, s.when, next_fire, last_tick, last_job])
    _echo(_table(header, table, shrink=(1, 0, 2)))


# --- retention -----------------------------------------------------------------------------------------


@main.command("prune")
@click.option("--older-than", type=Duration(), default=None, metavar="DURATION",
              help="Delete the selected states' jobs that finished longer ago than this (e.g. 12h, 30d), instead "
                   "of each state's --keep-* time")
@click.option("--state", "states", multiple=True, metavar="STATE[,STATE]",
              help="Only these finished states: succeeded, failed, cancelled (repeatable) [default: all three]")
@click.option("--dry-run", is_flag=True, help="Count what would be deleted, delete nothing")
@click.option("--batch-size", type=click.IntRange(min=1), default=pruner.BATCH,
              help="Jobs deleted per transaction")
@_retention_options
@click.pass_context
def prune_cmd(ctx: click.Context, older_than: timedelta | None, states: tuple[str, ...], dry_run: bool,
              batch_size: int, **keep_options: Any) -> None:
    """Delete finished jobs, and their results, past their retention: now, by hand. Running workers do
    the same on their own (see `pgq worker --keep-*`), so this is for a first clean-up, a different
    window, or deployments without workers pruning.

    \b
      pgq prune                                  # each state's --keep-* time (PGQ_KEEP_* too)
      pgq prune --state succeeded --older-than 6h
      pgq prune --dry-run

    Deletes in batches, each its own short transaction, so it is safe while workers run; prints the
    jobs deleted so far as it goes, and the totals.
    """
    try:
        selected = pruner.states_of(states) if states else list(pruner.STATES)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--state") from None
    keep = _keep(keep_options)
    keep = {state: older_than if older_than is not None else keep[state] for state in selected}
    app = _app(ctx)
    with db.connect(app.database_url, role="cli", autocommit=True) as conn:
        migrate.check(conn)
        if dry_run:
            for c in pruner.count(conn, keep):
                if c.keep is None:
                    click.echo(f"{c.state}: kept forever")
                    continue
                oldest = "" if c.oldest is None else f" (oldest finished {_ts(c.oldest)})"
                click.echo(f"{c.state}: {c.jobs:,} job(s) finished more than {pruner.format_duration(c.keep)} ago "
                           f"would be deleted{oldest}")
            return
        report = _progress("deleted")
        stats = pruner.prune(conn, keep, batch_size=batch_size,
                             progress=lambda stats: report(stats.total))
    per_state = ", ".join(f"{stats.jobs[s]:,} {s}" + (" (kept forever)" if keep[s] is None else "") for s in selected)
    rate = f", {stats.total / stats.seconds:,.0f} jobs/s" if stats.total and stats.seconds else ""
    click.echo(f"deleted {stats.total:,} job(s) ({per_state}) and {stats.results:,} result(s) in "
               f"{len(stats.batches)} batch(es), {stats.seconds:.2f} s{rate}")


# --- inspection ----------------------------------------------------------------------------------------


@main.group("jobs")
def jobs_group() -> None:
    """Look at jobs: list them, show one."""


@jobs_group.command("list")
@click.option("--queue", metavar="QUEUE", help="Only this queue")
@click.option("--task", "task_name", metavar="NAME", help="Only this task")
@click.option("--state", "states", multiple=True, metavar="STATE[,STATE]",
              help=f"Only these states ({', '.join(inspection.STATES)}; repeatable)")
@click.option("--older-than", type=Duration(), metavar="DURATION", help="Only jobs enqueued longer ago (e.g. 1h)")
@click.option("--newer-than", type=Duration(), metavar="DURATION", help="Only jobs enqueued more recently (e.g. 15m)")
@click.option("--limit", type=click.IntRange(min=1), default=50, help="Jobs per page")
@click.option("--page", type=click.IntRange(min=1), default=1, help="Page, from 1 (newest first)")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts")
@click.pass_context
def jobs_list_cmd(ctx: click.Context, queue: str | None, task_name: str | None, states: tuple[str, ...],
                  older_than: timedelta | None, newer_than: timedelta | None, limit: int, page: int,
                  as_json: bool) -> None:
    """Jobs, newest first, with their state, attempts, age, run time and last error."""
    wanted = [s.strip() for value in states for s in value.split(",") if s.strip()]
    bad = sorted(set(wanted) - set(inspection.STATES))
    if bad:
        raise click.BadParameter(f"unknown state {', '.join(bad)} (states: {', '.join(inspection.STATES)})",
                                 param_hint="--state")
    app = _app(ctx)
    with db.connect(app.database_url, role="cli", autocommit=True) as conn:
        migrate.check(conn)
        rows = inspection.list_jobs(conn, queue=queue, task=task_name, states=wanted or None, older_than=older_than,
                                    newer_than=newer_than, limit=limit, page=page)
    if as_json:
        click.echo(json.dumps({"page": page, "limit": limit, "jobs": rows}, indent=2, default=_json_value))
        return
    if not rows:
        click.echo("(no jobs)" if page == 1 else f"(no jobs on page {page})")
        return
    header = ["id", "queue", "task", "status", "tries", "age", "ran", "last error"]
    table = [[str(r["id"]), r["queue"], r["task_name"], (r["status"], "red" if r["status"] == "failed" else ""),
              f"{r['attempts']}/{r['max_attempts']}", duration(r["age"]), duration(r["ran_for"]),
              _one_line(r["last_error"])] for r in rows]
    _echo(_table(header, table, shrink=(7, 2, 1), right=(0, 4, 5, 6)))
    first = (page - 1) * limit + 1
    more = f"; more: --page {page + 1}" if len(rows) == limit else ""
    click.echo(f"\njobs {first}-{first + len(rows) - 1}, newest first{more}")


@jobs_group.command("show")
@click.argument("job_id", type=click.IntRange(min=1), metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts")
@click.pass_context
def jobs_show_cmd(ctx: click.Context, job_id: int, as_json: bool) -> None:
    """One job: its arguments, timings, outcome, and every failed attempt with its error and traceback."""
    app = _app(ctx)
    with db.connect(app.database_url, role="cli", autocommit=True) as conn:
        migrate.check(conn)
        job = inspection.show_job(conn, job_id)
    if as_json:
        click.echo(json.dumps(job, indent=2, default=_json_value))
        return
    t = job["timings"]
    lines = [
        ("job", f"{job['id']}  {job['task_name']}"),
        ("queue", f"{job['queue']}  (priority {job['priority']})"),
        ("status", f"{job['status']}  (attempt {job['attempts']} of {job['max_attempts']})"
                   + ("  cancellation requested" if job["cancel_requested_at"] and job["status"] == "running" else "")),
        ("args", json.dumps(job["args"], ensure_ascii=False)),
        ("kwargs", json.dumps(job["kwargs"], ensure_ascii=False)),
        ("enqueued", f"{_ts(job['created_at'])}  ({duration(t['age'])} ago)"),
        ("due", _ts(job["run_at"]) + (f"  (in {duration(t['due_in'])})" if t["due_in"] else "")),
        ("started", "-" if job["started_at"] is None else
         f"{_ts(job['started_at'])}  (latest attempt; waited {duration(t['waited'])} once due)"),
        ("finished", "-" if job["finished_at"] is None else
         f"{_ts(job['finished_at'])}  (ran {duration(t['ran'])}; {duration(t['total'])} after it was enqueued)"),
    ]
    if job["status"] == "running":
        lines.append(("running", f"for {duration(t['ran'])}; lease left {duration(t['lease_left'])}"))
    lines.append(("worker", job["worker_id"] or "-"))
    if job["unique_key"]:
        lines.append(("unique key", job["unique_key"]))
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        click.echo(f"{key.ljust(width)}  {value}")
    outcome = job["outcome"]
    click.echo("")
    if outcome is None:
        click.echo("outcome: none stored" + (" (ignore_result)" if job["ignore_result"] and job["status"] == "succeeded"
                                             else ""))
    elif outcome["status"] == "succeeded":
        click.echo(f"result: {json.dumps(outcome['result'], ensure_ascii=False)}")
    else:
        errors = job["errors"] or []
        click.echo(f"outcome: {outcome['status']}: {outcome['error_type']}: {outcome['error_message']}")
        if outcome["traceback"] and not any(e.get("traceback") == outcome["traceback"] for e in errors):
            click.echo(_indent(outcome["traceback"]))  # else it is the last attempt's, below
    errors = job["errors"] or []
    click.echo(f"\nattempt history ({len(errors)} entr{'y' if len(errors) == 1 else 'ies'}):" if errors
               else "\nattempt history: no failed attempt")
    for entry in errors:
        where = f" on {entry['worker']}" if entry.get("worker") else ""
        click.echo(f"  attempt {entry.get('attempt', '?')} at {entry.get('at', '?')}{where}: "
                   f"{entry.get('type', '?')}: {entry.get('message', '')}")
        if entry.get("traceback"):
            click.echo(_indent(entry["traceback"], "      "))


@main.command("workers")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts")
@click.pass_context
def workers_cmd(ctx: click.Context, as_json: bool) -> None:
    """Worker processes: their queues, concurrency, running jobs and last heartbeat. A killed worker's row
    stays (STALE) until a worker shutting down cleanly forgets it, 10 minutes later."""
    app = _app(ctx)
    with db.connect(app.database_url, role="cli", autocommit=True) as conn:
        migrate.check(conn)
        rows = inspection.list_workers(conn)
    if as_json:
        click.echo(json.dumps({"workers": rows}, indent=2, default=_json_value))
        return
    if not rows:
        click.echo("(no workers)")
        return
    header = ["worker", "queues", "concurrency", "running", "up", "heartbeat", "state"]
    now_rows = [[r["id"], ",".join(r["queues"]), str(r["concurrency"]), str(r["running_jobs"]),
                 duration(r["last_heartbeat_at"] - r["started_at"] + r["since_heartbeat"]),
                 f"{duration(r['since_heartbeat'])} ago", "alive" if r["alive"] else ("STALE", "red")] for r in rows]
    _echo(_table(header, now_rows, shrink=(1, 0), right=(2, 3, 4, 5)))
    alive = sum(1 for r in rows if r["alive"])
    click.echo(f"\n{alive} alive, {len(rows) - alive} stale")


# --- pgq doctor ----------------------------------------------------------------------------------------


@main.command("doctor")
@click.option("--max-transaction-age", type=Duration(), default="5m", metavar="DURATION",
              help="A transaction open longer than this (holding back vacuum) is a problem")
@click.option("--max-idle-in-transaction", type=Duration(), default="1m", metavar="DURATION",
              help="A session idle in a transaction longer than this is a problem")
@click.option("--stuck-after", type=Duration(), default="1m", metavar="DURATION",
              help="A job running this long past its lease (not rescued) is a problem")
@click.option("--queue", metavar="QUEUE", help="Queue to plan the claim for [default: one with waiting jobs]")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts")
@click.pass_context
def doctor_cmd(ctx: click.Context, max_transaction_age: timedelta, max_idle_in_transaction: timedelta,
               stuck_after: timedelta, queue: str | None, as_json: bool) -> None:
    """Check what threatens a queue in PostgreSQL, and say what to do about each problem: sessions and
    slots holding back vacuum, dead rows in pgq's tables, the claim's index, stuck leases, the schema
    version. Exits 1 when something is wrong, 0 when all is well (notes are not problems).

    Other roles' sessions show their queries only to superusers and members of pg_read_all_stats."""
    app = _app(ctx)
    thresholds = doctor.Thresholds(max_transaction_age=max_transaction_age,
                                   max_idle_in_transaction=max_idle_in_transaction, stuck_after=stuck_after)
    with db.connect(app.database_url, role="cli", autocommit=True) as conn:
        findings = doctor.examine(conn, thresholds, queue=queue)
    problems = [f for f in findings if not f.ok]
    if as_json:
        click.echo(json.dumps({"healthy": not problems, "findings": [f.as_json() for f in findings]}, indent=2,
                              default=_json_value))
    else:
        width = _terminal_width()  # None: not a terminal, lines are not wrapped

        def fill(text: str, first: str, rest: str) -> str:
            if width is None:
                return first + text
            return textwrap.fill(text, width=width, initial_indent=first, subsequent_indent=rest)

        for f in findings:
            label = {"ok": "ok", "note": "note", "problem": "PROBLEM"}[f.level]
            click.echo(fill(f.summary, f"{label:<8} {f.check:<12} ", " " * 22))
            if f.level != "ok" and f.advice:
                click.echo(fill(f"-> {f.advice}", " " * 22, " " * 25))
            for d in f.details if f.level == "problem" else ():
                if d.get("query"):
                    query = _one_line(d["query"])
                    click.echo(" " * 22 + "query: " + (query if width is None else query[: max(20, width - 29)]))
        click.echo("\n" + (f"{len(problems)} problem(s) found" if problems else "no problems found"))
    if problems:
        ctx.exit(1)


# --- formatting ----------------------------------------------------------------------------------------


def _terminal_width() -> int | None:
    """The width to fit tables to: $COLUMNS, or the terminal's; None (no limit) when output is not a terminal."""
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    if sys.stdout.isatty():
        return shutil.get_terminal_size().columns
    return None


#: A cell of _table: its text, or (text, style) with a style of words from bold, dim and a colour ("bold red").
Cell = str | tuple[str, str]
#: A line of _table: its (text, style) pieces; the style "" is none.
Line = list[tuple[str, str]]


def _table(header: list[str], rows: list[list[Cell]], *, shrink: tuple[int, ...] = (), right: tuple[int, ...] = (),
           width: int | None = None) -> list[Line]:
    """Columns padded to their content, two spaces apart, the header first (bold). When wider than *width*
    (default: the terminal's, see _terminal_width), the *shrink* columns (in that order) are cut down, their
    cells ending in '…', never below their header or 8 characters; the other columns never are, so ids and
    counts stay whole, and a table that cannot fit is left wider than the terminal rather than losing columns.

    pgq lays tables out itself, rather than with rich's Table: rich took about 1 ms per row to render (a second
    for `pgq jobs list --limit 1000`), and its fitting shrinks every column, ids included, or drops some. Rich
    draws the lines in the live view (`pgq status --watch`)."""
    texts = [[cell if isinstance(cell, str) else cell[0] for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in [header, *texts]) for i in range(len(header))]
    limit = width if width is not None else _terminal_width()
    if limit is not None:
        excess = sum(widths) + 2 * (len(widths) - 1) - limit
        for i in shrink:
            if excess <= 0:
                break
            cut = min(excess, widths[i] - max(len(header[i]), 8))
            if cut > 0:
                widths[i] -= cut
                excess -= cut
    lines = []
    for row in [[(name, "bold") for name in header], *rows]:
        line: Line = []
        for i, (cell, w) in enumerate(zip(row, widths, strict=True)):
            text, style = (cell, "") if isinstance(cell, str) else cell
            if len(text) > w:
                text = text[: w - 1] + "…"
            gap, fill = "  " if i else "", " " * (w - len(text))
            line += [(gap + fill, ""), (text, style)] if i in right else [(gap, ""), (text, style), (fill, "")]
        while line and not line[-1][0].strip():
            line.pop()  # no trailing spaces
        lines.append(line)
    return lines


def _echo(*parts: str | list[Line]) -> None:
    """Print lines (str) and _table tables; styles on terminals only."""
    tty = sys.stdout.isatty()
    for part in parts:
        if isinstance(part, str):
            click.echo(part)
            continue
        for line in part:
            click.echo("".join(_style(text, style) if tty and style else text for text, style in line))


def _style(text: str, style: str) -> str:
    words = style.split()
    colour = next((w for w in words if w not in ("bold", "dim")), None)
    return click.style(text, fg=colour, bold="bold" in words or None, dim="dim" in words or None)


def _ts(t: Any) -> str:
    return "-" if t is None else t.isoformat(sep=" ", timespec="milliseconds")


def _one_line(text: str | None) -> str:
    return "" if not text else " ".join(text.split())


def _indent(text: str, prefix: str = "    ") -> str:
    return textwrap.indent(text.rstrip("\n"), prefix)


def _json_value(value: Any) -> Any:
    if isinstance(value, timedelta):
        return value.total_seconds()
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return float(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _local(t: Any, zone: Any) -> str:
    return t.astimezone(zone).isoformat(sep=" ", timespec="seconds")


@main.command("dashboard")
@click.option("--host", default="127.0.0.1", envvar="PGQ_DASHBOARD_HOST", show_default=True,
              help="Address to bind; anything but loopback exposes the dashboard to the network "
                   "[env: PGQ_DASHBOARD_HOST]")
@click.option("--port", type=click.IntRange(min=0, max=65535), default=5555, envvar="PGQ_DASHBOARD_PORT",
              help="Port to serve on; 0 picks a free one (the URL is printed) [env: PGQ_DASHBOARD_PORT]")
@click.option("--token", envvar="PGQ_DASHBOARD_TOKEN", default=None, show_default=False,
              help="Password that unlocks actions (retry, cancel, delete); without it the dashboard is read-only "
                   "[env: PGQ_DASHBOARD_TOKEN]")
@click.option("--read-only", is_flag=True, envvar="PGQ_DASHBOARD_READ_ONLY",
              help="Never offer actions, whatever the token [env: PGQ_DASHBOARD_READ_ONLY=1]")
@click.option("--root-path", default="", envvar="PGQ_DASHBOARD_ROOT_PATH", metavar="PATH",
              help="The path prefix a reverse proxy serves the dashboard under, e.g. /pgq "
                   "[env: PGQ_DASHBOARD_ROOT_PATH]")
@click.pass_context
def dashboard_cmd(ctx: click.Context, host: str, port: int, token: str | None, read_only: bool,
                  root_path: str) -> None:
    """Serve the web dashboard: queues, jobs, workers, schedules, and actions behind a token.

    Reading needs no sign-in: keep it on 127.0.0.1 (the default) or behind a proxy that authenticates.
    See docs/dashboard.md."""
    try:
        from .dashboard import serve
    except ImportError as exc:
        raise ConfigurationError(f"the dashboard needs its extra: pip install 'pgq-jobs[dashboard]' ({exc})") from None
    root_path = root_path.strip().rstrip("/")
    if root_path and not root_path.startswith("/"):
        raise click.BadParameter("must start with /", param_hint="--root-path")
    setup_logging(ctx.find_root().obj["loglevel"])
    app = _app(ctx)
    serve(app, host=host, port=port, token=token or None, read_only=read_only, root_path=root_path,
          log_level=str(ctx.find_root().obj["loglevel"]).lower())


if __name__ == "__main__":  # pragma: no cover
    main()
