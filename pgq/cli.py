"""The ``pgq`` command: a thin layer over the library, with Celery's flags where Celery has one."""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
from datetime import timedelta
from typing import Any

import click
import psycopg

from . import control, db, grants, migrate, periodic, sql
from .app import App
from .errors import ConfigurationError, Error, JobNotFound
from .states import ALL

LOG_LEVELS = ["debug", "info", "warning", "error", "critical"]


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
@click.option("--prepare/--no-prepare", default=True, envvar="PGQ_PREPARE",
              help="Use server-side prepared statements; --no-prepare for poolers that cannot keep them "
                   "(PgBouncer < 1.21 in transaction mode) [env: PGQ_PREPARE=0]")
@click.option("-l", "--loglevel", type=click.Choice(LOG_LEVELS, case_sensitive=False), default=None,
              help="Log level (same as the global -l)")
@click.pass_context
def worker_cmd(ctx: click.Context, queues: str, concurrency: int | None, pool: str, poll_interval: float,
               shutdown_grace: float, listen: bool, rescue_interval: float, prefetch: int | None,
               task_timeout: float | None,
               prepare: bool, loglevel: str | None, beat: bool = False) -> None:
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
                        task_timeout=task_timeout, prefetch=prefetch)
    if not app.tasks:
        logging.getLogger("pgq.worker").warning("no tasks registered: pass -A module:app so the worker can "
                                                "run your tasks (jobs would fail as unknown tasks)")
    if beat:
        _run_with_beat(app, worker)
    else:
        worker.run()


@main.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts")
@click.pass_context
def status_cmd(ctx: click.Context, as_json: bool) -> None:
    """Jobs per queue and state, the oldest due job's wait, and the workers alive."""
    app = _app(ctx)
    with db.connect(app.database_url, role="cli", autocommit=True) as conn:
        migrate.check(conn)
        rows = conn.execute(sql.STATUS_COUNTS).fetchall()
        workers = conn.execute(sql.WORKERS).fetchall()
    queues: dict[str, dict[str, Any]] = {}
    for queue, status, count, oldest in rows:
        entry = queues.setdefault(queue, {"counts": dict.fromkeys(map(str, ALL), 0), "oldest_due": None})
        entry["counts"][status] = count
        if oldest is not None:
            entry["oldest_due"] = max(entry["oldest_due"] or timedelta(0), oldest)
    if as_json:
        click.echo(json.dumps({
            "queues": {q: {"counts": e["counts"], "oldest_due_seconds":
                           None if e["oldest_due"] is None else e["oldest_due"].total_seconds()}
                       for q, e in queues.items()},
            "workers": [{"id": w[0], "hostname": w[1], "pid": w[2], "queues": w[3], "concurrency": w[4],
                         "seconds_since_heartbeat": w[6].total_seconds(), "alive": _alive(w[6])}
                        for w in workers],
        }, indent=2))
        return
    states = [str(s) for s in ALL]
    header = ["queue", *states, "oldest due"]
    table = [[q, *(str(e["counts"][s]) for s in states), _age(e["oldest_due"])] for q, e in sorted(queues.items())]
    if not table:
        table = [["(no jobs)", *("0" for _ in states), "-"]]
    widths = [max(len(row[i]) for row in [header, *table]) for i in range(len(header))]
    for row in [header, *table]:
        pairs = enumerate(zip(row, widths, strict=True))
        cells = [cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in pairs]
        click.echo("  ".join(cells))
    alive = [w for w in workers if _alive(w[6])]
    click.echo(f"\nworkers alive: {len(alive)}" + (f" (and {len(workers) - len(alive)} not heard from in "
                                                   f"{STALE_WORKER.total_seconds():.0f} s: killed?)"
                                                   if len(alive) < len(workers) else ""))
    for w in workers:
        click.echo(f"  {w[0]}  queues={','.join(w[3])}  concurrency={w[4]}  "
                   f"last heartbeat {w[6].total_seconds():.1f} s ago" + ("" if _alive(w[6]) else "  STALE"))


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
    widths = [max(len(row[i]) for row in [header, *table]) for i in range(len(header))]
    for row in [header, *table]:
        pairs = enumerate(zip(row, widths, strict=True))
        click.echo("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in pairs))


def _or_dash(value: Any) -> str:
    return "-" if value is None else f"{value:g}"


#: A worker heartbeats at least every 10 s; one silent for longer than this is dead or stuck.
STALE_WORKER = timedelta(seconds=30)


def _alive(since_heartbeat: timedelta) -> bool:
    return since_heartbeat < STALE_WORKER


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
@click.pass_context
def retry_cmd(ctx: click.Context, job_ids: tuple[int, ...], failed: bool, cancelled: bool, task_name: str | None,
              queue: str | None) -> None:
    """Run failed or cancelled jobs again: each goes back to queued, due now, with its attempts reset (it
    gets its max_attempts again), its stored outcome deleted and its error history kept.

    \b
      pgq retry 123 124
      pgq retry --failed --task proj.tasks.send_email [--queue emails]

    In bulk, jobs are requeued 1000 per transaction. A job whose unique key another job holds (waiting or
    running) is left alone.
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
            requeued, skipped = control.requeue_matching(conn, task_name=task_name, queue=queue, statuses=statuses)
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


@main.command("grants")
@click.option("--role", required=True, help="The PostgreSQL role to grant to (quoted as an identifier)")
@click.option("--kind", type=click.Choice(list(grants.KINDS)), required=True,
              help="producer: enqueue and read results; worker: claim, run and record jobs; scheduler: enqueue "
                   "periodic ticks (pgq beat; `worker -B` needs worker and scheduler); control: cancel and retry "
                   "jobs by hand")
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
            f"{_local(s.next_fire, s.zone)} (in {_age(s.next_fire - now)})")
        last_tick = "never" if s.last_tick is None else (
            f"{_local(s.last_tick, s.zone)} ({_age(now - s.last_tick)} ago)")
        last_job = "-" if s.last_job_id is None else f"{s.last_job_id} {s.last_job_status or '(pruned)'}"
        table.append([s.name, s.task_name, s.when, next_fire, last_tick, last_job])
    widths = [max(len(row[i]) for row in [header, *table]) for i in range(len(header))]
    for row in [header, *table]:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _local(t: Any, zone: Any) -> str:
    return t.astimezone(zone).isoformat(sep=" ", timespec="seconds")


def _age(delta: timedelta | None) -> str:
    if delta is None:
        return "-"
    seconds = delta.total_seconds()
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


if __name__ == "__main__":  # pragma: no cover
    main()
