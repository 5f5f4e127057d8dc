"""The dashboard in a real headless browser: Debian's chromium driven by Playwright, against a real server
(uvicorn in a thread, or the `pgq dashboard` command) on a real database, with a real worker where a job
must run. Skipped when /usr/bin/chromium is absent (.ci/run installs it)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("PGQ_TEST_CHROMIUM", "/usr/bin/chromium")
# Without the background-networking flags chromium waits on network services this offline machine lacks.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK),
                                reason=f"no chromium at {CHROMIUM} (Debian: apt-get install chromium; .ci/run does)")
pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
pytest.importorskip("uvicorn", reason="the dashboard extra is not installed")

import uvicorn  # noqa: E402
from playwright.sync_api import Browser, Page, expect, sync_playwright  # noqa: E402

from pgq.dashboard import create_app  # noqa: E402
from pgq.dashboard.server import bind  # noqa: E402
from tests import apps  # noqa: E402
from tests.helpers import ROOT, WorkerProcess, job, scalar, wait_for, wait_registered  # noqa: E402

TOKEN = "browser-test-token"
PAYLOAD = "<script>window.__pwned=1</script><img src=x onerror=\"window.__pwned=2\">"
TIMEOUT_MS = 15_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    # htmx logs a request that hx-sync replaced by a newer one (typing in the search box) as a failed
    # afterRequest; a real failure also logs htmx:responseError or htmx:sendError, which count.
    pg.on("console", lambda msg: errors.append(msg.text)
          if msg.type == "error" and not msg.text.startswith(("htmx:afterRequest", "htmx:sendAbort")) else None)
    pg.js_errors = errors  # type: ignore[attr-defined]
    try:
        yield pg
    finally:
        context.close()


class Served:
    """The dashboard served by uvicorn in a thread of this process, on a free port."""

    def __init__(self, db_url: str, **options):
        self.sock = bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        asgi = create_app(db_url, app=apps.app, refresh_seconds=1, **options)
        self.server = uvicorn.Server(uvicorn.Config(asgi, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started, what="the dashboard to start")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


@pytest.fixture
def serve(db_url, app) -> Iterator:
    started: list[Served] = []

    def start(**options) -> Served:
        served = Served(db_url, **options)
        started.append(served)
        return served

    yield start
    for served in started:
        served.stop()


def finished(conn, status: str, *, queue: str = "default", task: str = "tests.add", args: str = "[]",
             error: str | None = None) -> int:
    return scalar(conn, """
        INSERT INTO pgq.jobs (queue, task_name, args, status, attempts, max_attempts, started_at, finished_at,
                              last_error)
        VALUES (%s, %s, %s::jsonb, %s, 1, 1, now(), now(), %s) RETURNING id""", (queue, task, args, status, error))


def row_ids(page: Page) -> list[int]:
    return [int(i) for i in page.locator("#jobs tbody tr[data-job-id]").evaluate_all(
        "rows => rows.map(r => r.dataset.jobId)")]


def expect_rows(page: Page, ids: list[int]) -> None:
    """Wait until the job table shows exactly *ids* (htmx swaps it in after the request returns)."""
    wait_for(lambda: row_ids(page) == ids, timeout=TIMEOUT_MS / 1000, what=f"the job list to show {ids}")


def sign_in(page: Page, token: str) -> None:
    page.fill("#token", token)
    page.click("#sign-in")


# --- reading ------------------------------------------------------------------------------------------


def test_overview_draws_the_chart_and_refreshes(page, serve, conn, app):
    for _ in range(4):
        finished(conn, "succeeded")
    finished(conn, "failed", error="ValueError: overview")
    served = serve()
    page.goto(served.url + "/")
    expect(page.locator("#queues")).to_contain_text("default")
    expect(page.locator("#failures")).to_contain_text("ValueError: overview")
    expect(page.locator("#throughput-chart[data-ready='1'] canvas")).to_have_count(1)
    assert page.locator("#throughput-chart .u-legend").inner_text().count("succeeded") == 1
    # htmx refreshes the overview in place: a job in a new queue shows up without a reload.
    page.evaluate("window.__same_document = true")
    assert "fresh-queue" not in page.locator("#queues").inner_text()
    apps.app.send_task("tests.add", args=[1, 2], queue="fresh-queue")
    expect(page.locator("#queues")).to_contain_text("fresh-queue")
    assert page.evaluate("window.__same_document") is True
    expect(page.locator("#throughput-chart canvas")).to_have_count(1)  # the chart was updated, not duplicated
    assert page.js_errors == []  # type: ignore[attr-defined]


def test_job_list_filters_and_search(page, serve, conn):
    a = finished(conn, "failed", queue="emails", task="emails.send", args='["ada@example.com"]', error="SMTP down")
    b = finished(conn, "succeeded", queue="default", task="tests.add", args="[1, 2]")
    c = finished(conn, "failed", queue="default", task="tests.add", args='["grace@example.com"]', error="KeyError")
    served = serve()
    page.goto(served.url + "/jobs")
    assert row_ids(page) == [c, b, a]

    page.select_option("#filter-state", "failed")
    expect_rows(page, [c, a])
    assert "state=failed" in page.url  # hx-push-url: the filtered list has a link of its own

    page.fill("#filter-q", "grace@")  # search as you type
    expect_rows(page, [c])

    page.fill("#filter-q", "")
    expect_rows(page, [c, a])
    page.fill("#filter-queue", "emails")
    page.press("#filter-queue", "Enter")
    expect_rows(page, [a])
    assert "queue=emails" in page.url

    page.goto(served.url + "/jobs?task=tests.add")
    assert row_ids(page) == [c, b]
    assert page.js_errors == []  # type: ignore[attr-defined]


def test_script_payload_is_shown_never_run(page, serve, app, conn):
    handle = app.send_task(PAYLOAD, args=[PAYLOAD], kwargs={"html": PAYLOAD})
    conn.execute("UPDATE pgq.jobs SET status = 'failed', finished_at = now(), last_error = %s WHERE id = %s",
                 (PAYLOAD, handle.id))
    served = serve()
    for path in ("/", f"/jobs?q={PAYLOAD}", "/jobs", f"/jobs/{handle.id}"):
        page.goto(served.url + path)
        page.wait_for_load_state("load")
        assert page.evaluate("window.__pwned") is None, path
        assert page.locator("img[src='x']").count() == 0, path  # the markup never became elements
        scripts = page.locator("script").evaluate_all("s => s.map(e => e.textContent).join(' ')")
        assert "__pwned" not in scripts, path
    # It is there, as text (JSON, as stored).
    assert json.dumps(PAYLOAD) in page.locator("#job-args").inner_text()
    assert json.dumps(PAYLOAD) in page.locator("#job-kwargs").inner_text()
    page.goto(served.url + "/jobs")
    assert PAYLOAD in page.locator("#jobs").inner_text()


# --- acting -------------------------------------------------------------------------------------------


def test_retry_a_failed_job_with_the_token_then_a_worker_runs_it(page, serve, conn, db_url):
    # Fails on attempts 1 and 2 (its only ones), succeeds on a third: the retry by hand gives it that.
    handle = apps.flaky.apply_async(args=(2,), max_attempts=2)
    worker = WorkerProcess(db_url, "-c", "2")
    try:
        wait_registered(conn, worker)
        wait_for(lambda: job(conn, handle.id)["status"] == "failed", what="the job to fail for good")
        served = serve(token=TOKEN)
        page.goto(served.url + "/jobs?state=failed")
        page.click(f"#jobs a[href='/jobs/{handle.id}']")
        expect(page.locator("#job-state")).to_have_text("failed")
        expect(page.locator(".attempt")).to_have_count(2)  # both attempts, with their tracebacks
        assert "flaky failure on attempt 2" in page.locator(".attempt").last.inner_text()

        page.click("#action-retry")
        expect(page).to_have_url(re.compile(r"/login\?next="))
        sign_in(page, TOKEN)
        expect(page).to_have_url(f"{served.url}/jobs/{handle.id}/retry")  # the confirmation step
        page.click("#confirm")
        expect(page.locator(".banner.notice")).to_contain_text("Retried")

        assert handle.get(timeout=20) == 3  # the worker ran it again: attempt 3 succeeded
        page.reload()
        expect(page.locator("#job-state")).to_have_text("succeeded")
        expect(page.locator("#timeline")).to_contain_text("retried by hand")
        assert page.js_errors == []  # type: ignore[attr-defined]
    finally:
        worker.stop()


def test_cancel_and_delete_ask_first(page, serve, conn):
    waiting = apps.add.apply_async(args=(1, 2), countdown=3600).id
    served = serve(token=TOKEN)
    page.goto(f"{served.url}/login")
    sign_in(page, TOKEN)
    page.goto(f"{served.url}/jobs/{waiting}")
    expect(page.locator("#action-delete")).to_have_count(0)  # not finished: no delete offered
    page.click("#action-cancel")
    expect(page.locator("h1")).to_have_text(f"Cancel job {waiting}?")
    assert job(conn, waiting)["status"] == "queued"  # nothing happens before the confirmation
    page.click("#confirm")
    expect(page.locator("#job-state")).to_have_text("cancelled")
    page.click("#action-delete")
    page.click("#confirm")
    expect(page.locator(".banner.notice")).to_contain_text("deleted")
    assert scalar(conn, "SELECT count(*) FROM pgq.jobs WHERE id = %s", (waiting,)) == 0


def test_read_only_shows_no_actions_and_refuses_posts(page, serve, conn):
    job_id = finished(conn, "failed")
    served = serve(token=TOKEN, read_only=True)
    page.goto(f"{served.url}/jobs/{job_id}")
    expect(page.locator("#read-only-banner")).to_contain_text("read-only mode")
    expect(page.locator("#actions")).to_have_count(0)
    expect(page.locator("a", has_text="Sign in")).to_have_count(0)
    assert page.goto(f"{served.url}/login").status == 403
    for action in ("retry", "cancel", "delete"):
        r = page.request.post(f"{served.url}/jobs/{job_id}/{action}", form={"csrf_token": "x"},
                              headers={"origin": served.url})
        assert r.status == 403
    assert job(conn, job_id)["status"] == "failed"


def test_wrong_token_cross_site_form_and_bad_csrf_are_refused(page, serve, conn):
    job_id = finished(conn, "failed")
    served = serve(token=TOKEN)
    page.goto(f"{served.url}/login")
    sign_in(page, "not the token")
    expect(page.locator("#login-error")).to_have_text("Wrong token.")
    assert page.context.cookies() == []

    # Signed in for real, then lured to another site whose page posts a form to the dashboard.
    sign_in(page, TOKEN)
    assert [c["name"] for c in page.context.cookies()] == ["pgq_dashboard_session"]
    cookie = page.context.cookies()[0]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    csrf = page.locator("input[name=csrf_token]").first.get_attribute("value")
    evil = f"""<form id=f method=post action="{served.url}/jobs/{job_id}/retry">
               <input name=csrf_token value="{csrf}"></form><script>document.getElementById('f').submit()</script>"""
    page.route("http://evil.example/**", lambda route: route.fulfill(status=200, content_type="text/html", body=evil))
    with page.expect_navigation(url=f"{served.url}/jobs/{job_id}/retry"):
        page.goto("http://evil.example/")
    assert "Refused" in page.content()
    assert job(conn, job_id)["status"] == "failed"

    # Same origin, real session, wrong CSRF token.
    r = page.request.post(f"{served.url}/jobs/{job_id}/retry", form={"csrf_token": "guessed"},
                          headers={"origin": served.url})
    assert r.status == 403 and "CSRF" in r.text()
    assert job(conn, job_id)["status"] == "failed"


# --- the command ----------------------------------------------------------------------------------------


def test_pgq_dashboard_command_on_port_zero(page, db_url, conn):
    finished(conn, "succeeded")
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"pgq-dashboard-{os.getpid()}-{time.monotonic_ns()}.log"
    with open(log, "w+") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pgq", "--database-url", db_url, "-A", "tests.apps",
                                 "dashboard", "--port", "0"], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env={k: v for k, v in os.environ.items() if k != "PGQ_DASHBOARD_TOKEN"})
        try:
            line = wait_for(lambda: re.search(r"pgq dashboard: (http://127\.0\.0\.1:\d+)/ - read-only \(no token\)",
                                              log.read_text()) or proc.poll() is not None,
                            what="the dashboard's URL on stderr")
            assert proc.poll() is None, log.read_text()
            url = line.group(1)
            page.goto(url + "/")
            expect(page.locator("#read-only-banner")).to_contain_text("no token configured")
            expect(page.locator("#queues")).to_contain_text("default")
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=15)
        log.unlink(missing_ok=True)
    assert code == 0
