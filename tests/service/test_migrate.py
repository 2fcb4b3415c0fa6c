"""`python -m service migrate`: the schema and the service role's rights, as the owner sets
them, and a service that waits for them (503) instead of running DDL itself."""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Iterator

import psycopg2
import pytest
import requests
from flask import Flask

from bench.processes import PG_URL, drop_database, recreate_database
from service.process.factory import create_app
from service.web.routes import users_of
from tests.support import free_port

from .helpers import (
    migrate,
    query,
    role_of,
    run_service,
    settings_for,
)
from .servers import ROOT, RedisServer, ServiceProcess, wait_until

MIGRATIONS = ROOT / "service" / "postgres" / "migrations"
PACKAGED = sorted(path.name for path in MIGRATIONS.glob("*.sql"))
TABLES = ("users", "cache_namespace", "schema_migrations")
# What the service's statements need, and nothing else (the contract of issue 10).
EXPECTED_GRANTS = {
    ("users", "SELECT"), ("users", "INSERT"), ("users", "UPDATE"), ("users", "DELETE"),
    ("cache_namespace", "SELECT"), ("schema_migrations", "SELECT"),
}


def run_migrate(owner_url: str, app_role: str, *args: str) -> subprocess.CompletedProcess:
    return run_service("migrate", *args, DATABASE_URL=owner_url, DATABASE_APP_ROLE=app_role)


@pytest.fixture
def bare(owner_url: str, database_url: str) -> Iterator[str]:
    """The test database without any of the service's tables, as before its first migrate;
    migrated again afterwards. Yields the service role's name."""
    query(owner_url, f"DROP TABLE IF EXISTS {', '.join(TABLES)}, cache_repairs")
    yield role_of(database_url)
    migrate(owner_url, role_of(database_url))


def test_migrate_applies_and_records_every_migration_once(owner_url: str, bare: str) -> None:
    first = run_migrate(owner_url, bare)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip().splitlines() == [
        f"schema up to date (applied {', '.join(PACKAGED)}); {bare} may use "
        "users, cache_namespace, schema_migrations and nothing else"]
    assert first.stderr == ""
    recorded = query(owner_url, "SELECT name FROM schema_migrations ORDER BY name")
    assert [name for (name,) in recorded] == PACKAGED
    again = run_migrate(owner_url, bare)
    assert again.returncode == 0 and "(nothing to apply)" in again.stdout
    assert query(owner_url, "SELECT count(*) FROM schema_migrations") == [(len(PACKAGED),)]


def test_the_service_role_gets_exactly_its_grants(owner_url: str, database_url: str) -> None:
    role = role_of(database_url)
    query(owner_url, f"GRANT TRUNCATE, REFERENCES ON users TO {role}")  # by hand, in passing
    migrate(owner_url, role)
    grants = query(owner_url, "SELECT table_name, privilege_type "
                   "FROM information_schema.role_table_grants WHERE grantee = %s", (role,))
    assert set(grants) == EXPECTED_GRANTS
    (rights,) = query(owner_url, """SELECT
        has_sequence_privilege(%(role)s, 'users_id_seq', 'USAGE'),
        has_database_privilege(%(role)s, current_database(), 'CONNECT'),
        has_database_privilege(%(role)s, current_database(), 'CREATE'),
        has_database_privilege(%(role)s, current_database(), 'TEMPORARY'),
        has_database_privilege('public', current_database(), 'CONNECT'),
        has_schema_privilege(%(role)s, 'public', 'CREATE'),
        has_schema_privilege('public', 'public', 'CREATE')""", {"role": role})
    assert rights == (False, True, False, False, False, False, False)


def test_the_service_role_inserts_users_without_a_right_on_their_sequence(
        database_url: str, owner_url: str) -> None:
    """Postgres draws an identity column's values for whoever may insert."""
    (row,) = query(database_url, "INSERT INTO users (username, email) "
                   "VALUES ('seq_check', 'seq@example.org') RETURNING id")
    assert row[0] > 0
    query(owner_url, "DELETE FROM users WHERE username = 'seq_check'")


def test_a_database_made_before_migrations_were_recorded_is_migrated_in_place(
        owner_url: str, bare: str) -> None:
    for name in PACKAGED:  # what the service used to run at start, without recording it
        query(owner_url, (MIGRATIONS / name).read_text())
    query(owner_url, "INSERT INTO users (username, email) VALUES ('kept', 'kept@example.org')")
    (namespace,) = query(owner_url, "SELECT value FROM cache_namespace")
    result = run_migrate(owner_url, bare)
    assert result.returncode == 0, result.stderr
    assert f"applied {', '.join(PACKAGED)}" in result.stdout
    assert query(owner_url, "SELECT username FROM users") == [("kept",)]
    assert query(owner_url, "SELECT value FROM cache_namespace") == [namespace]


def schema_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "database schema is behind" in line]


def test_the_service_waits_for_migrate_and_then_serves_without_a_restart(
        database_url: str, owner_url: str, redis_server: RedisServer, bare: str) -> None:
    if redis_server.process is None:
        redis_server.start()
    service = ServiceProcess({"DATABASE_URL": database_url, "REDIS_URL": redis_server.url},
                             ready_path="/healthz")
    try:
        for _ in range(10):
            for response in (requests.get(f"{service.url}/readyz", timeout=5),
                             requests.get(f"{service.url}/users/1", timeout=5),
                             requests.post(f"{service.url}/users", timeout=5,
                                           json={"username": "early", "email": "e@example.org"})):
                assert response.status_code == 503, response.text
                assert response.headers["Retry-After"] and response.json()
        lines = schema_lines(service.output())
        assert 1 <= len(lines) <= 2, service.output()  # one per worker that was asked
        assert 'relation "schema_migrations" does not exist; run `python -m service migrate`' \
            in lines[0]
        migrate(owner_url, bare)
        wait_until(lambda: requests.get(f"{service.url}/readyz", timeout=5).ok, 10, "recovery")
        created = requests.post(f"{service.url}/users", timeout=5,
                                json={"username": "later", "email": "l@example.org"})
        assert created.status_code == 201, created.text
        assert schema_lines(service.output()) == lines
    finally:
        service.close()


@pytest.fixture
def one_behind(owner_url: str, database_url: str) -> Iterator[str]:
    """A database that lacks the last packaged migration; whole again afterwards."""
    query(owner_url, "DELETE FROM schema_migrations WHERE name = %s", (PACKAGED[-1],))
    yield PACKAGED[-1]
    migrate(owner_url, role_of(database_url))


def test_a_missing_migration_is_one_log_line_and_503_until_migrate_runs(
        database_url: str, owner_url: str, redis_up: RedisServer, one_behind: str,
        caplog: pytest.LogCaptureFixture) -> None:
    app: Flask = create_app(settings_for(database_url, redis_up.url))
    client = app.test_client()
    with caplog.at_level(logging.INFO, logger="service.postgres.pool"):
        for _ in range(5):
            assert client.get("/readyz").status_code == 503
            assert client.get("/users?username=anyone").status_code == 503
        migrate(owner_url, role_of(database_url))
        assert client.get("/readyz").status_code == 200
        assert client.get("/users?username=anyone").status_code == 200
    assert [record.getMessage() for record in caplog.records] == [
        f"database schema is behind: {one_behind} not applied; run `python -m service migrate`",
        "database available again"]
    users_of(app).close()


def test_migrate_waits_for_postgres_then_fails_with_one_line() -> None:
    closed = f"postgresql://cachestack_owner@127.0.0.1:{free_port()}/cachestack_test"
    started = time.monotonic()
    result = run_migrate(closed, "cachestack_app", "--wait", "1.5")
    elapsed = time.monotonic() - started
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and 1.5 <= elapsed < 6, (elapsed, result.stderr)
    assert len(lines) == 2, result.stderr
    assert lines[0].startswith("waiting up to 1.5 s for postgres: connection to server at")
    assert lines[1].startswith("error: could not connect to postgres within 1.5 s: ")
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_migrate_as_the_service_role_is_refused(database_url: str) -> None:
    result = run_migrate(database_url, role_of(database_url), "--wait", "0")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: the service's role {role_of(database_url)} is the role migrate runs as: "
        "run migrate as the database's owner"]


@pytest.fixture
def foreign() -> Iterator[str]:
    """A database that another role made (the one bench/ uses to create databases), as the
    bootstrap superuser made the stack's before; yields its URL as that role."""
    try:
        url = recreate_database("cachestack_test_foreign")
    except psycopg2.OperationalError:
        pytest.skip("no role that may create databases (BENCH_PG_URL)")
    yield url
    drop_database("cachestack_test_foreign")


@pytest.mark.parametrize("what", ["table", "database"])
def test_migrate_refuses_what_another_role_owns(owner_url: str, database_url: str,
                                                foreign: str, what: str) -> None:
    """Migrate says what to do instead of granting what it cannot."""
    if what == "table":
        query(foreign, "CREATE TABLE users (id bigint)")
    url = owner_url.rsplit("/", 1)[0] + "/cachestack_test_foreign"
    result = run_migrate(url, role_of(database_url), "--wait", "0")
    creator, me = role_of(PG_URL), role_of(owner_url)
    name = "users" if what == "table" else "cachestack_test_foreign"
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: {what} {name} is owned by {creator}, not by {me} (the role migrate runs as): "
        f"ALTER {what.upper()} {name} OWNER TO {me}, or migrate as {creator}"]
