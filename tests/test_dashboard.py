"""The dashboard's routes through Starlette's TestClient, on a real database: pages, filters, escaping,
the token, sessions, CSRF and Origin checks, read-only mode, the actions, and least-privilege roles."""

from __future__ import annotations

import re
import uuid
import warnings
from collections.abc import Iterator
from datetime import timedelta

import psycopg
import pytest
from click.testing import CliRunner
from psycopg.conninfo import make_conninfo

pytest.importorskip("starlette")
with warnings.catch_warnings():
    # Starlette >= 1.1 asks for the httpx2 package and warns on plain httpx, which works the same.
    warnings.filterwarnings("ignore", message=".*install `httpx2`")
    from starlette.testclient import TestClient

import pgq
from pgq.cli import main
from pgq.dashboard import create_app, data, security
from tests import apps
from tests.helpers import job, scalar

TOKEN = "correct horse battery staple"
ORIGIN = {"origin": "http://testserver"}
PAYLOAD = "<script>window.__pwned=1</script><img src=x onerror=\"window.__pwned=2\">"


def client_for(db_url: str, **options) -> TestClient:
    return TestClient(create_app(db_url, app=apps.app, **options), follow_redirects=False)


@pytest.fixture
def client(db_url: str, app) -> Iterator[TestClient]:
    with client_for(db_url, token=TOKEN) as c:
        yield c


def sign_in(c: TestClient, token: str = TOKEN) -> str:
    """Sign in; returns the session's CSRF token, read from a page as a browser would."""
    r = c.post("/login", data={"token": token, "next": "/jobs"}, headers=ORIGIN)
    assert r.status_code == 303, r.text
    return csrf_of(c.get("/jobs").text)


def csrf_of(page: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert match, "no CSRF token on the page"
    return match.group(1)


def finished(conn, status: str = "failed", **columns) -> int:
    """A finished job row written directly (with a stored outcome), as a worker would have left it."""
    values = {"queue": "default", "task_name": "tests.fail", "args": "[]", **columns}
    job_id = scalar(conn, f"""
        INSERT INTO pgq.jobs (queue, task_name, args, status, attempts, max_attempts, started_at, finished_at,
                              last_error, errors)
        VALUES (%(queue)s, %(task_name)s, %(args)s::jsonb, '{status}', 1, 1, now(), now(), %(error)s,
                jsonb_build_array(jsonb_build_object('attempt', 1, 'at', now(), 'type', 'ValueError',
                                                     'message', 'boom', 'traceback', 'Traceback: line 1')))
        RETURNING id""", {**values, "error": "ValueError: boom" if status == "failed" else None})
    conn.execute("INSERT INTO pgq.results (job_id, status, result, error_type, error_message) "
                 "VALUES (%s, %s, %s, %s, %s)",
                 (job_id, status, "42" if status == "succeeded" else None,
                  None if status == "succeeded" else "ValueError", None if status == "succeeded" else "boom"))
    return job_id


# --- pages ------------------------------------------------------------------------------------------


def test_pages_render_real_jobs(client, app, conn):
    failing = apps.fail.delay("it broke")
    ok = apps.add.delay(2, 3)
    waiting = apps.send_email.apply_async(args=("ada@example.com",), countdown=3600)
    with app.worker(concurrency=1).running():
        assert ok.get(timeout=10) == 5
        with pytest.raises(pgq.TaskFailed, match="it broke"):
            failing.get(timeout=10)

    overview = client.get("/")
    assert overview.status_code == 200
    assert 'id="queues"' in overview.text and ">emails<" in overview.text and ">default<" in overview.text
    assert 'id="throughput-data"' in overview.text
    assert f'href="/jobs/{failing.id}"' in overview.text  # the latest failures
    assert "ValueError: it broke" in overview.text
    partial = client.get("/partials/overview", headers={"hx-request": "true"})
    assert partial.status_code == 200 and partial.text.lstrip().startswith('<div id="overview"')
    assert "<html" not in partial.text

    page = client.get(f"/jobs/{failing.id}").text
    assert "it broke" in page and "Traceback (most recent call last)" in page  # every attempt's traceback
    assert page.count('class="attempt"') == 2  # tests.fail makes two attempts
    assert 'id="timeline"' in page and "attempt 1 failed" in page and "attempt 2 failed" in page
    assert ">5<" in client.get(f"/jobs/{ok.id}").text.replace("\n", "").replace(" ", "")  # the result
    assert re.search(r"\(in (59|60)m\)", client.get(f"/jobs/{waiting.id}").text)  # due in an hour

    assert client.get("/workers").status_code == 200
    assert client.get("/jobs/999999").status_code == 404
    assert client.get("/static/vendor/htmx-2.0.11.min.js").status_code == 200
    assert client.get("/static/vendor/uPlot-1.6.32.iife.min.js").status_code == 200


def test_overview_chart_counts_the_last_hour(client, conn):
    for _ in range(3):
        finished(conn, "succeeded")
    finished(conn, "failed")
    old = finished(conn, "failed")
    conn.execute("UPDATE pgq.jobs SET finished_at = now() - interval '2 hours' WHERE id = %s", (old,))
    with psycopg.connect(client.app.state.dashboard.database_url, autocommit=True) as c:
        ov = data.overview(c)
    assert len(ov.chart["x"]) == data.CHART_MINUTES
    assert sum(ov.chart["succeeded"]) == 3 and sum(ov.chart["failed"]) == 1
    assert ov.chart["succeeded"][-1] == 3  # the current minute is the last point
    assert ov.last_hour == {"succeeded": 3, "failed": 1, "cancelled": 0}
    assert [f["id"] for f in ov.failures] == [old - 1, old]  # both failed within 24 hours, newest first


def test_throughput_rereads_only_the_last_two_minutes(conn, db_url):
    minute = scalar(conn, "SELECT date_trunc('minute', now())")
    conn.execute("UPDATE pgq.jobs SET finished_at = %s WHERE id = %s", (minute, finished(conn, "succeeded")))
    throughput = data.Throughput()
    with psycopg.connect(db_url, autocommit=True) as c:
        first = throughput.read(c, minute)
        assert list(first) == [minute - timedelta(minutes=59 - i) for i in range(60)]
        assert first[minute] == [("default", "succeeded", 1)]
        # Jobs recorded now under minutes already read: the current and previous minute are read again, older
        # ones are final and kept (such late rows never happen: finished_at is the recording transaction's time).
        for ago in (0, 1, 5):
            job_id = finished(conn, "failed")
            conn.execute("UPDATE pgq.jobs SET finished_at = %s WHERE id = %s", (minute - timedelta(minutes=ago),
                                                                                   job_id))
        second = throughput.read(c, minute)
    assert sorted(second[minute]) == [("default", "failed", 1), ("default", "succeeded", 1)]
    assert second[minute - timedelta(minutes=1)] == [("default", "failed", 1)]
    assert second[minute - timedelta(minutes=5)] == []  # kept from the first read
    assert data.Throughput().read(conn, minute)[minute - timedelta(minutes=5)] == [("default", "failed", 1)]


def test_job_list_filters_and_search(client, conn):
    a = finished(conn, "failed", queue="emails", task_name="emails.send", args='["ada@example.com"]')
    b = finished(conn, "succeeded", queue="default", task_name="tests.add", args="[1, 2]")
    c = finished(conn, "failed", queue="default", task_name="tests.add", args='["needle_100%"]')

    def ids(**params) -> list[int]:
        r = client.get("/jobs", params=params)
        assert r.status_code == 200, r.text
        return [int(i) for i in re.findall(r'data-job-id="(\d+)"', r.text)]

    assert ids() == [c, b, a]
    assert ids(state="failed") == [c, a]
    assert ids(queue="default") == [c, b]
    assert ids(task="tests.add", state="failed") == [c]
    assert ids(q="ada@") == [a]
    assert ids(q="100%") == [c]  # % and _ are literal text, not patterns
    assert ids(q="100_") == []
    assert ids(q=str(b)) == [b] and ids(q=f"#{b}") == [b]
    assert ids(q="ValueError") == [c, a]  # the last error
    assert ids(before=str(c)) == [b, a]
    assert client.get("/jobs", params={"state": "nonsense"}).status_code == 400
    # htmx asks for the table only.
    table = client.get("/jobs", params={"state": "failed"}, headers={"hx-request": "true", "hx-target": "jobs-table"})
    assert table.text.lstrip().startswith('<div id="jobs-table">')


def test_job_list_pages_by_id(client, conn):
    conn.execute("INSERT INTO pgq.jobs (task_name) SELECT 'tests.noop' FROM generate_series(1, 120)")
    first = client.get("/jobs").text
    older = re.search(r'href="/jobs\?([^"]+)" id="older"', first)
    assert older and len(re.findall(r"data-job-id=", first)) == data.PAGE_SIZE
    second = client.get("/jobs?" + older.group(1).replace("&amp;", "&")).text
    ids = [int(i) for i in re.findall(r'data-job-id="(\d+)"', second)]
    assert ids == list(range(120 - data.PAGE_SIZE, 120 - 2 * data.PAGE_SIZE, -1))


def test_payloads_are_escaped_everywhere(client, app, conn):
    handle = app.send_task(PAYLOAD, args=[PAYLOAD], kwargs={PAYLOAD: PAYLOAD})
    conn.execute("UPDATE pgq.jobs SET status = 'failed', finished_at = now(), last_error = %s WHERE id = %s",
                 (PAYLOAD, handle.id))
    for path in ("/", "/partials/overview", "/jobs", f"/jobs?q={PAYLOAD}", f"/jobs/{handle.id}"):
        r = client.get(path)
        assert r.status_code == 200, path
        assert "<script>window.__pwned" not in r.text and "<img src=x" not in r.text, path
        assert "&lt;script&gt;window.__pwned=1&lt;/script&gt;" in r.text or "\\u003cscript\\u003e" in r.text, path
    assert "script-src 'self'" in client.get("/").headers["content-security-policy"]


def test_security_headers(client):
    r = client.get("/")
    assert r.headers["x-frame-options"] == "DENY"
    assert r.headers["x-content-type-options"] == "nosniff"
    assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    assert "unsafe-inline" not in r.headers["content-security-policy"]


def test_schedules_page(db_url, conn):
    from tests import periodic_apps

    with TestClient(create_app(db_url, app=periodic_apps.app), follow_redirects=False) as c:
        page = c.get("/schedules").text
    assert 'id="schedules"' in page
    for name in periodic_apps.app.schedules:
        assert name in page


def test_metrics_route(client):
    pytest.importorskip("pgq.metrics", reason="pgq.metrics (render_database) is not in this checkout")
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    assert b"pgq_" in r.content


# --- read-only ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [{}, {"token": TOKEN, "read_only": True}], ids=["no token", "--read-only"])
def test_read_only_offers_and_accepts_no_action(db_url, conn, options):
    job_id = finished(conn, "failed")
    with client_for(db_url, **options) as c:
        page = c.get(f"/jobs/{job_id}").text
        assert 'id="read-only-banner"' in page and "actions are disabled" in page
        assert 'id="actions"' not in page and "Retry" not in page
        assert c.get("/login").status_code == 403
        assert c.post("/login", data={"token": TOKEN}, headers=ORIGIN).status_code == 403
        assert c.get(f"/jobs/{job_id}/retry").status_code == 403
        for action in ("retry", "cancel", "delete"):
            assert c.post(f"/jobs/{job_id}/{action}", data={"csrf_token": "x"}, headers=ORIGIN).status_code == 403
    assert job(conn, job_id)["status"] == "failed"


def test_under_a_path_prefix(db_url, conn):
    job_id = finished(conn, "failed")
    asgi = create_app(db_url, token=TOKEN, app=apps.app)
    for _ in range(2):  # the application can be started again after its lifespan ended
        with TestClient(asgi, root_path="/pgq", follow_redirects=False) as c:
            page = c.get(f"/jobs/{job_id}").text
            assert 'href="/pgq/jobs"' in page and 'src="/pgq/static/vendor/htmx-2.0.11.min.js"' in page
            assert 'hx-get="/pgq/partials/overview"' in c.get("/").text
            assert c.get(f"/jobs/{job_id}/retry").headers["location"] == (
                f"/pgq/login?next=%2Fpgq%2Fjobs%2F{job_id}%2Fretry")
            r = c.post("/login", data={"token": TOKEN, "next": f"/pgq/jobs/{job_id}/retry"}, headers=ORIGIN)
            assert r.headers["location"] == f"/pgq/jobs/{job_id}/retry" and "Path=/pgq" in r.headers["set-cookie"]
            assert c.post("/login", data={"token": TOKEN, "next": "/elsewhere"}, headers=ORIGIN).headers[
                "location"] == "/pgq/"


def test_no_token_page_says_why(db_url):
    with client_for(db_url) as c:
        assert "no token configured" in c.get("/").text


# --- the token, sessions, CSRF, Origin ------------------------------------------------------------------


def test_wrong_or_missing_token_is_refused(client, conn):
    job_id = finished(conn, "failed")
    assert client.get(f"/jobs/{job_id}/retry").headers["location"] == f"/login?next=%2Fjobs%2F{job_id}%2Fretry"
    r = client.post("/login", data={"token": "wrong"}, headers=ORIGIN)
    assert r.status_code == 403 and "Wrong token" in r.text
    assert security.COOKIE not in r.cookies
    assert client.post("/login", data={}, headers=ORIGIN).status_code == 403
    # No session at all: refused, whatever the form says.
    r = client.post(f"/jobs/{job_id}/retry", data={"csrf_token": "anything"}, headers=ORIGIN)
    assert r.status_code == 403 and "sign in" in r.text
    # A forged cookie is no session either.
    client.cookies.set(security.COOKIE, "abc.9999999999.forged")
    assert client.post(f"/jobs/{job_id}/retry", data={"csrf_token": "x"}, headers=ORIGIN).status_code == 403
    assert job(conn, job_id)["status"] == "failed"


def test_session_cookie_is_httponly_and_strict(client):
    r = client.post("/login", data={"token": TOKEN, "next": "/jobs/1"}, headers=ORIGIN)
    assert r.status_code == 303 and r.headers["location"] == "/jobs/1"
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    assert TOKEN not in cookie


def test_login_never_redirects_elsewhere(client):
    for target in ("//evil.example/x", "https://evil.example/", "/\\evil.example", "javascript:alert(1)",
                   "/\t/evil.example", "/\n/evil.example", " //evil.example"):
        r = client.post("/login", data={"token": TOKEN, "next": target}, headers=ORIGIN)
        assert r.headers["location"] == "/", target


def test_csrf_token_and_origin_are_checked(client, conn):
    job_id = finished(conn, "failed")
    csrf = sign_in(client)
    url = f"/jobs/{job_id}/retry"
    for headers, form, why in [
        (ORIGIN, {}, "CSRF"),
        (ORIGIN, {"csrf_token": "wrong"}, "CSRF"),
        (ORIGIN, {"csrf_token": security.Guard(TOKEN).csrf_token("another-session")}, "CSRF"),
        ({"origin": "http://evil.example"}, {"csrf_token": csrf}, "did not come from"),
        ({"origin": "null"}, {"csrf_token": csrf}, "did not come from"),
        ({}, {"csrf_token": csrf}, "did not come from"),  # neither Origin nor Referer
        ({"referer": "http://evil.example/page"}, {"csrf_token": csrf}, "did not come from"),
    ]:
        r = client.post(url, data=form, headers=headers)
        assert r.status_code == 403 and why in r.text, (headers, form)
    assert job(conn, job_id)["status"] == "failed"
    # A same-origin Referer stands in for a missing Origin.
    r = client.post(url, data={"csrf_token": csrf}, headers={"referer": f"http://testserver/jobs/{job_id}/retry"})
    assert r.status_code == 303
    assert job(conn, job_id)["status"] == "queued"
    # A cross-site login is refused too.
    assert client.post("/login", data={"token": TOKEN}, headers={"origin": "http://evil.example"}).status_code == 403


def test_sign_out_ends_the_session(client, conn):
    job_id = finished(conn, "failed")
    csrf = sign_in(client)
    assert client.post("/logout", data={"csrf_token": csrf}, headers=ORIGIN).status_code == 303
    assert 'id="action-retry"' in client.get(f"/jobs/{job_id}").text  # offered, behind a sign-in
    r = client.post(f"/jobs/{job_id}/retry", data={"csrf_token": csrf}, headers=ORIGIN)
    assert r.status_code == 403


def test_repeated_wrong_tokens_are_throttled(client):
    for _ in range(security.LOGIN_FAILURES):
        assert client.post("/login", data={"token": "guess"}, headers=ORIGIN).status_code == 403
    r = client.post("/login", data={"token": TOKEN}, headers=ORIGIN)
    assert r.status_code == 429 and security.COOKIE not in r.cookies


# --- actions -----------------------------------------------------------------------------------------


def test_retry_cancel_delete(client, conn):
    failed = finished(conn, "failed")
    waiting = apps.add.apply_async(args=(1, 2), countdown=3600).id
    running = finished(conn, "succeeded")
    conn.execute("UPDATE pgq.jobs SET status = 'running', finished_at = NULL, worker_id = 'w', "
                 "lease_expires_at = now() + interval '1 minute' WHERE id = %s", (running,))
    done = finished(conn, "succeeded")
    csrf = sign_in(client)

    def act(job_id: int, action: str) -> str:
        confirm = client.get(f"/jobs/{job_id}/{action}")
        assert confirm.status_code == 200 and 'id="confirm"' in confirm.text
        r = client.post(f"/jobs/{job_id}/{action}", data={"csrf_token": csrf_of(confirm.text)}, headers=ORIGIN)
        assert r.status_code == 303, r.text
        return r.headers["location"]

    assert csrf
    assert act(failed, "retry") == f"/jobs/{failed}?notice=retried"
    assert job(conn, failed)["status"] == "queued"
    assert scalar(conn, "SELECT count(*) FROM pgq.results WHERE job_id = %s", (failed,)) == 0
    assert "queued again" in client.get(f"/jobs/{failed}?notice=retried").text
    assert act(waiting, "cancel").endswith("notice=cancelled")
    assert job(conn, waiting)["status"] == "cancelled"
    assert act(running, "cancel").endswith("notice=cancel-requested")
    assert job(conn, running)["cancel_requested_at"] is not None
    # Delete takes finished jobs only, with their results.
    assert act(running, "delete").endswith("notice=delete-refused")
    assert act(failed, "delete").endswith("notice=delete-refused")  # queued again: not finished
    assert act(done, "delete") == "/jobs?notice=deleted"
    assert scalar(conn, "SELECT count(*) FROM pgq.jobs WHERE id = %s", (done,)) == 0
    assert scalar(conn, "SELECT count(*) FROM pgq.results WHERE job_id = %s", (done,)) == 0
    assert act(waiting, "delete") == "/jobs?notice=deleted"  # cancelled is finished
    r = client.post(f"/jobs/{done}/retry", data={"csrf_token": csrf}, headers=ORIGIN)
    assert r.status_code == 404
    assert client.post(f"/jobs/{failed}/explode", data={"csrf_token": csrf}, headers=ORIGIN).status_code == 404


def test_delete_finished_leaves_unfinished_jobs(conn, db_url, app):
    succeeded, failed, cancelled = (finished(conn, s) for s in ("succeeded", "failed", "cancelled"))
    queued = apps.add.delay(1, 1).id
    with psycopg.connect(db_url, autocommit=True) as c:
        assert sorted(data.delete_finished(c, [succeeded, failed, cancelled, queued, 999])) == [
            succeeded, failed, cancelled]
    assert scalar(conn, "SELECT array_agg(id) FROM pgq.jobs") == [queued]
    assert scalar(conn, "SELECT count(*) FROM pgq.results") == 0
    with pytest.raises(ValueError):
        data.delete_finished(conn, [])


# --- least-privilege roles ---------------------------------------------------------------------------


@pytest.fixture
def roles(conn, db_url):
    """A `monitor` role, and a role granted both `monitor` and `control`, made with `pgq grants --apply`."""
    suffix = uuid.uuid4().hex[:8]
    kinds = {f"pgq_dash_ro_{suffix}": ("monitor",), f"pgq_dash_rw_{suffix}": ("monitor", "control")}
    urls = []
    for name, grant_kinds in kinds.items():
        conn.execute(psycopg.sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'secret-pw'").format(psycopg.sql.Identifier(name)))
        for kind in grant_kinds:
            result = CliRunner().invoke(main, ["--database-url", db_url, "grants", "--role", name, "--kind", kind,
                                               "--apply"])
            assert result.exit_code == 0, result.output
        urls.append(make_conninfo(db_url, user=name, password="secret-pw"))
    yield urls
    for name in kinds:
        conn.execute(psycopg.sql.SQL("DROP OWNED BY {}").format(psycopg.sql.Identifier(name)))
        conn.execute(psycopg.sql.SQL("DROP ROLE {}").format(psycopg.sql.Identifier(name)))


def test_monitor_role_reads_every_page(roles, conn):
    from tests import periodic_apps

    monitor, _ = roles
    job_id = finished(conn, "failed", args=f'["{uuid.uuid4().hex}"]')
    with TestClient(create_app(monitor, token=TOKEN, app=periodic_apps.app), follow_redirects=False) as c:
        for path in ("/", "/partials/overview", "/jobs", "/jobs?state=failed&q=boom", f"/jobs/{job_id}", "/workers"):
            r = c.get(path)
            assert r.status_code == 200, (path, r.text)
        page = c.get("/schedules")
        assert page.status_code == 200 and 'id="schedules-problem"' not in page.text
        assert all(name in page.text for name in periodic_apps.app.schedules)
        # Signed in, it still may change nothing: the database says no, and the page says why.
        csrf = sign_in(c)
        r = c.post(f"/jobs/{job_id}/retry", data={"csrf_token": csrf}, headers=ORIGIN)
        assert r.status_code == 403 and "Permission denied" in r.text and "--kind control" in r.text
    assert job(conn, job_id)["status"] == "failed"


def test_control_role_acts(roles, conn):
    _, control = roles
    failed = finished(conn, "failed")
    waiting = apps.add.apply_async(args=(1, 2), countdown=3600).id
    with TestClient(create_app(control, token=TOKEN, app=apps.app), follow_redirects=False) as c:
        assert c.get("/").status_code == 200
        csrf = sign_in(c)
        assert c.post(f"/jobs/{failed}/retry", data={"csrf_token": csrf}, headers=ORIGIN).status_code == 303
        assert c.post(f"/jobs/{waiting}/cancel", data={"csrf_token": csrf}, headers=ORIGIN).status_code == 303
        assert job(conn, waiting)["status"] == "cancelled"
        r = c.post(f"/jobs/{waiting}/delete", data={"csrf_token": csrf}, headers=ORIGIN)
        assert r.headers["location"] == "/jobs?notice=deleted"
    assert job(conn, failed)["status"] == "queued"
    assert scalar(conn, "SELECT count(*) FROM pgq.jobs WHERE id = %s", (waiting,)) == 0


# --- pure parts ---------------------------------------------------------------------------------------


def test_guard_sessions_and_csrf():
    guard = security.Guard("t0ken")
    cookie = guard.new_session(now=1000.0)
    sid = guard.session_id(cookie, now=1000.0 + security.SESSION_SECONDS - 1)
    assert sid is not None
    assert guard.session_id(cookie, now=1000.0 + security.SESSION_SECONDS + 1) is None  # expired
    assert guard.session_id(cookie.replace(".", "x.", 1), now=1000.0) is None  # tampered
    assert security.Guard("other").session_id(cookie, now=1000.0) is None  # another token's key
    assert security.Guard("t0ken", read_only=True).session_id(cookie, now=1000.0) is None
    assert guard.check_csrf(sid, guard.csrf_token(sid))
    assert not guard.check_csrf(sid, guard.csrf_token("other")) and not guard.check_csrf(None, "x")
    assert guard.check_token("t0ken") and not guard.check_token("t0ke") and not guard.check_token("")
    assert not security.Guard(None).check_token("")
    assert security.Guard(None).why_read_only and security.Guard("t", read_only=True).why_read_only
    assert security.Guard("t").why_read_only is None


def test_same_origin():
    assert security.same_origin("http://127.0.0.1:5555", None, "127.0.0.1:5555")
    assert security.same_origin("https://dash.example.com", None, "dash.example.com")  # TLS at the proxy
    assert security.same_origin(None, "http://h:1/jobs/1", "h:1")
    assert not security.same_origin("http://127.0.0.1:5556", None, "127.0.0.1:5555")
    assert not security.same_origin("http://evil.example", "http://h:1/", "h:1")  # Origin wins
    assert not security.same_origin(None, None, "h:1")
    assert not security.same_origin("null", None, "h:1")
    assert not security.same_origin("http://h:1", None, None)


def test_timeline_orders_events():
    from datetime import datetime, timedelta, timezone

    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    events = data.timeline({
        "created_at": t0, "run_at": t0, "queue": "q", "status": "succeeded", "attempts": 2, "worker_id": "w1",
        "started_at": t0 + timedelta(seconds=10), "finished_at": t0 + timedelta(seconds=11),
        "cancel_requested_at": None,
        "errors": [{"attempt": 1, "at": "2026-01-01T00:00:05.1234+00:00", "type": "KeyError", "message": "x"}],
    })
    assert [e["what"] for e in events] == ["enqueued", "attempt 1 failed", "attempt 2 started", "succeeded"]
    assert events[1]["at"] == t0 + timedelta(seconds=5, microseconds=123400)
