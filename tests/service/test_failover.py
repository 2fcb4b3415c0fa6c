"""The service's pool when Postgres is a cluster whose leader changes (`up --ha`): its URL
names every member, and it must find the one that takes writes, whatever the others do, ride
out a planned handover, never acknowledge a commit the synchronous standby did not confirm, and
never answer a read from a leader deposed since a write was acknowledged (tests/orchestrate/
test_ha.py pauses a real one). Real servers: the test database, a proxy that stops answering,
and a private Postgres whose synchronous standby never answers."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest
from flask import Flask

from service.postgres import schema
from service.postgres.pool import HANDOVER_SECONDS, Database, DatabaseUnavailable
from service.settings import PostgresSettings
from service.web.routes import users_of
from tests.support import free_port, require

from .helpers import create, keys, query, read, send_fills, via_proxy
from .servers import RedisServer, TcpProxy, wait_until


def several(database_url: str, *ports: int) -> str:
    """`database_url` naming 127.0.0.1 at each of `ports` in turn, as a URL of a cluster's
    members does, keeping the one that takes writes."""
    url = via_proxy(database_url, ports[0]).replace(
        f"127.0.0.1:{ports[0]}", ",".join(f"127.0.0.1:{port}" for port in ports))
    return url + ("&" if "?" in url else "?") + "target_session_attrs=read-write"


def pool(url: str, **settings: object) -> Database:
    return Database(PostgresSettings(url=url, **{"connect_timeout": 2, **settings}),
                    name="failover-test")


def test_a_member_that_stops_answering_does_not_hold_up_the_login_to_another(
        database_url: str) -> None:
    """The first member named hangs (a paused container: its port takes the connection,
    nothing answers); the login goes to the next one at once, not after the timeout."""
    hung = TcpProxy(5432)
    hung.hold()
    database = pool(several(database_url, hung.port, 5432))
    try:
        started = time.monotonic()
        database.ping()
        assert time.monotonic() - started < 1.0
    finally:
        database.close()
        hung.close()


@pytest.fixture
def read_only_for_a_while(owner_url: str) -> Iterator[threading.Event]:
    """Logins to the test database find it read-only (as every member is while the lead is
    handed over) until the event is set; then it takes writes again."""
    (database,) = query(owner_url, "SELECT current_database()")[0]
    query(owner_url, f'ALTER DATABASE "{database}" SET default_transaction_read_only = on')
    handed_over = threading.Event()

    def hand_over() -> None:
        handed_over.wait()
        conn = psycopg2.connect(owner_url, options="-c default_transaction_read_only=off")
        try:
            with conn, conn.cursor() as cur:
                cur.execute(f'ALTER DATABASE "{database}" RESET default_transaction_read_only')
        finally:
            conn.close()

    thread = threading.Thread(target=hand_over)
    thread.start()
    yield handed_over
    handed_over.set()
    thread.join()


def test_a_login_waits_out_a_handover_of_the_lead(
        database_url: str, read_only_for_a_while: threading.Event) -> None:
    database = pool(several(database_url, 5432))
    timer = threading.Timer(1.0, read_only_for_a_while.set)
    try:
        timer.start()
        database.ping()  # on the code before: "session is read-only" at once
    finally:
        timer.cancel()
        database.close()


def test_a_member_promoted_while_another_keeps_the_login_waiting_is_found_at_once(
        database_url: str, read_only_for_a_while: threading.Event) -> None:
    """A failover from a leader that stopped answering: the first member named hangs, the
    other refuses writes until it is promoted, half a second in. The login takes it then, not
    once the hung one's connect timeout (2 s) is up."""
    hung = TcpProxy(5432)
    hung.hold()
    database = pool(several(database_url, hung.port, 5432))
    timer = threading.Timer(0.5, read_only_for_a_while.set)
    try:
        started = time.monotonic()
        timer.start()
        database.ping()  # on the code before: DatabaseUnavailable after 2 s
        assert time.monotonic() - started < 1.5
    finally:
        timer.cancel()
        database.close()
        hung.close()


def test_a_member_that_stopped_answering_a_statement_keeps_no_idle_session(
        database_url: str) -> None:
    """Each idle session on a server that stopped answering would hold a statement for its
    timeout in turn, while its successor may be promoted: one that did not answer in time
    closes them all."""
    server = TcpProxy(5432)
    database = pool(several(database_url, server.port), statement_timeout_ms=300, pool_size=3)
    sessions = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'failover-test'"
    try:
        threads = [threading.Thread(target=database.run,
                                    args=(lambda cur: cur.execute("SELECT pg_sleep(0.1)"),))
                   for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert query(database_url, sessions) == [(3,)]
        server.hold()
        with pytest.raises(DatabaseUnavailable, match="did not answer"):
            database.ping()
        server.flow()
        wait_until(lambda: query(database_url, sessions) == [(0,)], 5,
                   "the idle sessions to be closed")  # on the code before: 2 stayed
    finally:
        database.close()
        server.close()


def test_a_handover_that_lasts_fails_fast_after_a_few_seconds(
        database_url: str, read_only_for_a_while: threading.Event) -> None:
    """No member takes writes for longer than a handover takes (a failover is under way):
    the first request gives up after the wait, and the next ones at once."""
    database = pool(several(database_url, 5432))
    try:
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailable, match="read-only"):
            database.ping()
        waited = time.monotonic() - started
        assert 1.0 < waited < 5.0, waited
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailable):
            database.ping()
        assert time.monotonic() - started < 0.2
    finally:
        database.close()


def test_a_statement_cut_off_by_a_shutdown_runs_again(database_url: str) -> None:
    """A leader that hands over ends every session (`terminating connection due to
    administrator command`) before its transaction commits: the statement runs again on a
    new session, rather than fail the request."""
    database = pool(database_url, pool_size=1)
    done: list[object] = []
    running = threading.Thread(target=lambda: done.append(database.run(
        lambda cur: (cur.execute("SELECT pg_sleep(0.5), 'slept'"), cur.fetchone())[1])))
    try:
        running.start()
        wait_until(lambda: query(
            database_url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'failover-test' AND query LIKE '%%pg_sleep%%' "
            "AND state = 'active'"), 5, "the statement to be cut off")
        running.join()
        assert done and done[0][1] == "slept"
    finally:
        database.close()


def timeline_of(database_url: str) -> int:
    """The timeline the server is on (1 until a promotion)."""
    [(wal_file,)] = query(database_url, "SELECT pg_walfile_name(pg_current_wal_lsn())")
    return int(wal_file[:8], 16)


def test_a_session_on_an_older_timeline_than_known_is_given_up(database_url: str) -> None:
    """A leader deposed by a failover (paused, say, while a replica was promoted onto the
    next timeline) still answers, with what it had, until Patroni demotes it. Once the pool
    knows of a newer timeline, neither its session kept from before nor a new login to that
    server runs anything: as when no server takes writes, 503s after the handover wait."""
    database = pool(database_url)
    try:
        database.ping()  # leaves a session idle in the pool
        assert database.timeline == timeline_of(database_url)
        database.follow_timeline(database.timeline + 1)
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailable, match="deposed"):
            database.ping()
        assert HANDOVER_SECONDS - 0.5 < time.monotonic() - started < HANDOVER_SECONDS + 2
    finally:
        database.close()


def test_a_miss_reads_postgres_on_no_older_timeline_than_a_write_committed_on(
        app: Flask, redis_up: RedisServer) -> None:
    """A write-through records the timeline its write committed on; a reader that then
    misses reads Postgres on that timeline or a later one, in every worker: told of a later
    one than its server's (a write acknowledged by a new leader), it answers 503, not the
    deposed leader's row, and caches nothing."""
    client = app.test_client()
    user = create(client)
    timeline = keys(app).timeline
    assert int(redis_up.client().get(timeline)) == users_of(app).database.timeline >= 1
    redis_up.client().incr(timeline)
    users_of(app).cache.forget([keys(app).user(user["id"])])
    assert read(client, f"/users/{user['id']}").status == 503
    send_fills(client)
    assert redis_up.client().get(keys(app).user(user["id"])) is None
    redis_up.client().decr(timeline)
    assert read(client, f"/users/{user['id']}").status == 503  # a timeline never goes back


@pytest.fixture(scope="module")
def unconfirmed_postgres() -> Iterator[str]:
    """A private Postgres whose every commit waits for a synchronous standby that never
    comes (as a leader cut off from its standby); its URL, as its superuser (the owner of its
    migrated database)."""
    binaries = Path(subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True,
                                   check=False).stdout.strip() or "/nonexistent")
    require((binaries / "initdb").exists() and shutil.which("runuser") is not None
            and os.geteuid() == 0, "PostgreSQL's initdb, and root to run it as postgres")
    folder = tempfile.mkdtemp(prefix="cachestack-unconfirmed-")
    shutil.chown(folder, "postgres", "postgres")
    port = free_port()

    def as_postgres(*command: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *command], check=True,
                       capture_output=True)

    as_postgres(str(binaries / "initdb"), "-D", f"{folder}/data", "-U", "postgres",
                "--auth=trust")
    as_postgres(str(binaries / "pg_ctl"), "-D", f"{folder}/data", "-l", f"{folder}/log", "-w",
                "-o",
                f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 "
                "-c synchronous_standby_names=nobody", "start")
    url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    try:
        conn = psycopg2.connect(url, options="-c synchronous_commit=local")
        try:
            with conn, conn.cursor() as cur:
                cur.execute("CREATE ROLE app")
            schema.migrate(conn, "app", "cachestack_stream")
        finally:
            conn.close()
        yield url
    finally:
        as_postgres(str(binaries / "pg_ctl"), "-D", f"{folder}/data", "-m", "immediate",
                    "stop")
        shutil.rmtree(folder)


def test_a_commit_the_standby_did_not_confirm_is_not_acknowledged(
        unconfirmed_postgres: str) -> None:
    """A commit waits for the synchronous standby, and someone cancels the wait (an operator's
    pg_cancel_backend; Postgres's own statement_timeout ends before the commit): Postgres then
    reports the commit done, with only a warning, though the change is on this server alone,
    which a failover throws away. The pool answers as for a lost session (the caller says
    503), never as if it were done."""
    database = pool(unconfirmed_postgres)
    failed: list[Exception] = []

    def insert() -> None:
        try:
            database.run(lambda cur: cur.execute(
                "INSERT INTO users (username, email) VALUES ('alone', 'alone@example.org')"))
        except DatabaseUnavailable as exc:
            failed.append(exc)

    writer = threading.Thread(target=insert)
    try:
        writer.start()
        wait_until(lambda: query(unconfirmed_postgres, (
            "SELECT pg_cancel_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'failover-test' AND wait_event = 'SyncRep'")),
            5, "a commit waiting for the standby")
        writer.join()
    finally:
        database.close()
    assert failed and "standby" in str(failed[0]), failed
    local = psycopg2.connect(unconfirmed_postgres, options="-c synchronous_commit=local")
    try:
        with local.cursor() as cur:
            cur.execute("SELECT count(*) FROM users WHERE username = 'alone'")
            assert cur.fetchone() == (1,)  # committed here: what makes the case real
    finally:
        local.close()
