"""pgq's schema: the migrations produce exactly the declared tables, run idempotently and concurrently,
keep their version table inside the pgq schema, and ship inside the wheel."""

from __future__ import annotations

import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import psycopg
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from pgq import migrate
from pgq.schema import metadata
from tests.helpers import ROOT, scalar


def test_migrations_match_the_declared_tables(db_url):
    engine = sa.create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(db_url))
    try:
        with engine.connect() as connection:
            ctx = MigrationContext.configure(connection, opts={"include_schemas": True,
                                                               "include_name": _only_pgq})
            diff = compare_metadata(ctx, metadata)
    finally:
        engine.dispose()
    assert diff == [], f"schema.py and the migrations disagree: {diff}"


def _only_pgq(name, type_, parent_names):
    if type_ == "schema":
        return name == "pgq"
    return not (type_ == "table" and name == "alembic_version")


def test_migrate_is_idempotent_and_uses_its_own_version_table(empty_db_url):
    migrate.upgrade(empty_db_url)
    migrate.upgrade(empty_db_url)
    with psycopg.connect(empty_db_url) as conn:
        assert migrate.current_revision(conn) == migrate.head_revision()
        # The user's own Alembic history lives in public.alembic_version: pgq never touches it.
        assert scalar(conn, "SELECT to_regclass('public.alembic_version')") is None
        migrate.check(conn)


def test_concurrent_migrations_wait_for_each_other(empty_db_url):
    # Four deploys migrating at once, as separate processes, and two threads of this one.
    code = "import sys, pgq.migrate as m; m.upgrade(sys.argv[1])"
    procs = [subprocess.Popen([sys.executable, "-c", code, empty_db_url], stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    errors: list[BaseException] = []

    def run():
        try:
            migrate.upgrade(empty_db_url)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    failures = []
    for p in procs:
        _, err = p.communicate(timeout=60)
        if p.returncode != 0:
            failures.append(err)
    assert errors == [] and failures == []
    with psycopg.connect(empty_db_url) as conn:
        assert scalar(conn, "SELECT count(*) FROM pgq.alembic_version") == 1


def test_downgrade_removes_everything_and_upgrade_restores_it(empty_db_url):
    migrate.upgrade(empty_db_url)
    migrate.downgrade(empty_db_url, "base")
    with psycopg.connect(empty_db_url) as conn:
        assert scalar(conn, "SELECT to_regclass('pgq.jobs')") is None
    migrate.upgrade(empty_db_url)
    with psycopg.connect(empty_db_url) as conn:
        assert scalar(conn, "SELECT to_regclass('pgq.jobs')") == "pgq.jobs"


def test_check_says_what_to_run(empty_db_url):
    import pytest

    import pgq

    with psycopg.connect(empty_db_url) as conn, pytest.raises(pgq.ConfigurationError, match="pgq migrate"):
        migrate.check(conn)


def test_wheel_ships_the_migrations_and_they_run_from_it(tmp_path, empty_db_url):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True, timeout=300)
    wheel = next(tmp_path.glob("pgq_jobs-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "pgq/migrations/env.py" in names
    assert "pgq/migrations/versions/0001_initial.py" in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import pgq, pgq.migrate as m, sys; "
            "assert pgq.__file__.startswith(sys.argv[1]), pgq.__file__; "
            "print(m.migrations_dir()); m.upgrade(sys.argv[2])")
    out = subprocess.run([sys.executable, "-c", code, str(site), empty_db_url], cwd=tmp_path,
                         env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
                         check=True, capture_output=True, text=True, timeout=120)
    assert Path(out.stdout.strip()) == site / "pgq" / "migrations"
    with psycopg.connect(empty_db_url) as conn:
        assert migrate.current_revision(conn) == migrate.head_revision()


def test_head_revision_is_alembics_head_without_importing_alembic():
    from alembic.script import ScriptDirectory

    assert migrate.head_revision() == ScriptDirectory.from_config(migrate.alembic_config()).get_current_head()
    # What a worker process imports: neither SQLAlchemy nor Alembic (27 MB of resident memory).
    code = ("import sys, pgq.cli, pgq.worker; from pgq import migrate; migrate.head_revision(); "
            "print(sorted(m for m in ('sqlalchemy', 'alembic') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
