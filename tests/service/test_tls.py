"""TLS on the service's connections: with a `rediss://` URL every Redis connection it opens
(the pool's and the near cache's listener) speaks TLS from its first byte, and a wrong CA or
host name fails with one clear line, at once; Postgres's TLS is libpq's, set in DATABASE_URL.
The near cache over TLS is tested with the rest of it (test_nearcache.py)."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask

from service.process.factory import create_app
from service.web.routes import users_of

from .helpers import create, empty_database, settings_for
from .servers import RedisServer, TcpProxy, TlsFiles

TLS_HANDSHAKE = 0x16  # the first byte of a TLS record that carries a handshake


def subscribers(server: RedisServer) -> set[str]:
    return {client["id"] for client in server.client().client_list() if client["sub"] != "0"}


def test_every_redis_connection_speaks_tls_from_its_first_byte(
        database_url: str, owner_url: str, tls_redis_up: RedisServer) -> None:
    proxy = TcpProxy(tls_redis_up.port)  # records what the service sends
    others = subscribers(tls_redis_up)  # other tests' apps' listeners
    empty_database(owner_url)
    app = create_app(settings_for(database_url, tls_redis_up.url_for("service", proxy.port)))
    try:
        client = app.test_client()
        user = create(client)
        for _ in range(3):  # from Redis, then from the near cache: its listener is subscribed
            assert client.get(f"/users/{user['id']}").headers["X-Cache"] == "HIT"
        # (Not read back: a relay between Redis and the service, like this proxy, may deliver
        # the listener's invalidation after the writer's reply; see nearcache.py.)
        assert client.patch(f"/users/{user['id']}", json={"display_name": "B"}).status_code == 200
        assert len(subscribers(tls_redis_up) - others) == 1  # the listener, through the proxy
        assert len(proxy.sent) >= 2
        password = tls_redis_up.passwords["service"].encode()
        for sent in proxy.sent:
            assert sent[0] == TLS_HANDSHAKE, bytes(sent[:16])
            assert password not in sent and b"AUTH" not in sent
    finally:
        users_of(app).close()
        proxy.close()


def test_a_plaintext_client_gets_no_answer_from_the_tls_port(tls_redis_up: RedisServer) -> None:
    with socket.create_connection(("127.0.0.1", tls_redis_up.port), timeout=2) as plain:
        plain.sendall(b"PING\r\n")
        try:
            answer = plain.recv(100)
        except ConnectionResetError:
            answer = b""
    assert answer == b""


def assert_one_clear_line_and_no_hang(app: Flask, caplog: pytest.LogCaptureFixture,
                                      logger: str, reason: str, path: str) -> None:
    """Requests over more than a breaker's cool-down: each answered at once, and one log
    line in all that names the reason."""
    client = app.test_client()
    with caplog.at_level(logging.WARNING, logger=logger):
        for _ in range(6):
            started = time.monotonic()
            client.get(path)
            assert time.monotonic() - started < 1.5
            time.sleep(0.1)
    lines = [record.getMessage() for record in caplog.records if record.name == logger]
    assert len(lines) == 1 and reason in lines[0], lines


@pytest.fixture
def misconfigured(database_url: str, owner_url: str) -> Iterator[list[Flask]]:
    """Apps a test makes with a wrong setting; their pools are closed afterwards."""
    empty_database(owner_url)
    apps: list[Flask] = []
    yield apps
    for app in apps:
        users_of(app).close()


def test_a_redis_certificate_from_another_ca_is_one_line_and_no_hang(
        database_url: str, tls_redis_up: RedisServer, tmp_path: Path,
        misconfigured: list[Flask], caplog: pytest.LogCaptureFixture) -> None:
    other = TlsFiles.make(tmp_path, ["127.0.0.1"])  # a CA that signed nothing of Redis's
    url = tls_redis_up.url.replace(str(tls_redis_up.tls.ca), str(other.ca))
    app = create_app(settings_for(database_url, url))
    misconfigured.append(app)
    user = create(app.test_client())  # acknowledged: Postgres has it, Redis was skipped
    assert app.test_client().get(f"/users/{user['id']}").headers["X-Cache"] == "BYPASS"
    assert app.test_client().get("/readyz").get_json()["cache"] == "degraded"
    assert_one_clear_line_and_no_hang(app, caplog, "service.cache.trust",
                                      "certificate verify failed", f"/users/{user['id']}")


def test_a_redis_certificate_for_another_host_is_one_line_and_no_hang(
        database_url: str, tls_files: TlsFiles, tmp_path: Path, misconfigured: list[Flask],
        caplog: pytest.LogCaptureFixture) -> None:
    """Our CA signed it, but for a name that is not the one the service connects to."""
    elsewhere = RedisServer(TlsFiles.make(tmp_path, ["redis.example.org"], tls_files.authority()))
    try:
        elsewhere.start()
        app = create_app(settings_for(database_url, elsewhere.url))
        misconfigured.append(app)
        assert_one_clear_line_and_no_hang(app, caplog, "service.cache.trust", "mismatch",
                                          "/users/1")
    finally:
        elsewhere.close()


def test_a_postgres_certificate_from_another_ca_is_one_line_and_503(
        database_url: str, redis_up: RedisServer, tls_files: TlsFiles,
        misconfigured: list[Flask], caplog: pytest.LogCaptureFixture) -> None:
    """The host's Postgres has Debian's self-signed certificate, which our CA did not sign."""
    url = f"{database_url}?sslmode=verify-full&sslrootcert={tls_files.ca}"
    app = create_app(settings_for(url, redis_up.url))
    misconfigured.append(app)
    assert app.test_client().get("/readyz").status_code == 503
    assert_one_clear_line_and_no_hang(app, caplog, "service.postgres.pool",
                                      "certificate verify failed", "/readyz")


def test_postgres_over_tls_as_the_url_asks(database_url: str, redis_up: RedisServer,
                                           misconfigured: list[Flask]) -> None:
    app = create_app(settings_for(f"{database_url}?sslmode=require", redis_up.url))
    misconfigured.append(app)
    assert app.test_client().get("/readyz").status_code == 200
    database = users_of(app).database

    def own_session(cur: object) -> tuple:
        cur.execute("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        return cur.fetchone()

    encrypted, version = database.run(own_session)
    assert encrypted and version.startswith("TLS")
