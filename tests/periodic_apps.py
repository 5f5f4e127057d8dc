"""Periodic schedules for tests/test_periodic.py; ``pgq beat`` and ``pgq worker -B`` subprocesses load them with
``-A tests.periodic_apps``. Every way of defining a schedule is used once."""

from __future__ import annotations

from datetime import timedelta

import pgq

app = pgq.App()

EVERY_SECOND = "periodic.every_second"


# The decorator, above @app.task; the schedule's name is the task's name.
@app.periodic(every=timedelta(seconds=1))
@app.task(name=EVERY_SECOND)
def every_second():
    return "tick"


@app.periodic(cron="0 * * * *", tz="Europe/Paris")
@app.task(name="periodic.hourly", ignore_result=True)
def hourly():
    return None


@app.task(name="periodic.report")
def report(kind, to="ops@example.com"):
    return f"{kind} report sent to {to}"


# add_periodic, with arguments and a name of its own.
app.add_periodic(report, cron="30 2 * * *", tz="Europe/Paris", args=("nightly",), name="nightly-report")

# Celery's beat_schedule habit.
app.add_beat_schedule({
    "weekly-digest": {
        "task": "periodic.report",
        "schedule": "0 9 * * mon",
        "args": ("weekly",),
        "kwargs": {"to": "team@example.com"},
        "options": {"queue": "reports"},
        "tz": "Europe/Paris",
    },
})
