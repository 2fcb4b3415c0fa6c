"""Fixtures for the service tests: real PostgreSQL and Redis on 127.0.0.1, never mocks.

Postgres: the service runs as the stack's least-privileged role (TEST_DATABASE_URL, default
cachestack_app on the database scripts/test-services.sh creates); the database's owner
(TEST_OWNER_DATABASE_URL, default cachestack_owner) migrates it once per session and resets
its data between tests. Redis: a private redis-server per session with the stack's users,
so tests may stop and restart it freely.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import psycopg2
import pytest
from flask import Flask
from flask.testing import FlaskClient

from service import schema
from service.app import create_app
from service.cache import Keys
from service.config import Settings
from tests.support import require

from .servers import RedisServer, ServiceProcess, TlsFiles

DEFAULT_DATABASE_URL = "postgresql://cachestack_app:cachestack_app@127.0.0.1:5432/cachestack_test"
DEFAULT_OWNER_URL = "postgresql://cachestack_owner:cachestack_owner@127.0.0.1:5432/cachestack_test"


def reachable(url: str, what: str) -> str:
    try:
        psycopg2.connect(url, connect_timeout=3).close()
    except psycopg2.OperationalError:
        require(False, f"PostgreSQL at {what} (scripts/test-services.sh)")
    return url


def role_of(url: str) -> str:
    return urlsplit(url).username or ""


def query(url: str, sql: str, args: tuple | dict = ()) -> list[tuple]:
    """Run one statement in its own transaction; its rows, if it has any."""
    conn = psycopg2.connect(url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def migrate(owner_url: str, app_role: str) -> list[str]:
    """What `python -m service migrate` does, in this process; returns what it applied."""
    conn = psycopg2.connect(owner_url)
    try:
        return schema.migrate(conn, app_role)
    finally:
        conn.close()


@pytest.fixture(scope="session")
def owner_url() -> str:
    """The database's owner: it migrates, and resets data between tests."""
    return reachable(os.environ.get("TEST_OWNER_DATABASE_URL", DEFAULT_OWNER_URL),
                     "TEST_OWNER_DATABASE_URL")


@pytest.fixture(scope="session")
def database_url(owner_url: str) -> str:
    """The role the service runs as, on a database its owner has migrated."""
    url = reachable(os.environ.get("TEST_DATABASE_URL", DEFAULT_DATABASE_URL),
                    "TEST_DATABASE_URL")
    migrate(owner_url, role_of(url))
    return url


def private_redis(tls: TlsFiles | None = None) -> Iterator[RedisServer]:
    require(shutil.which("redis-server") is not None, "redis-server (Debian package redis-server)")
    server = RedisServer(tls)
    server.start()
    yield server
    server.close()


def running_and_empty(server: RedisServer) -> RedisServer:
    if server.process is None:
        server.start()
    server.client().flushall()
    return server


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    yield from private_redis()


@pytest.fixture
def redis_up(redis_server: RedisServer) -> RedisServer:
    """The private Redis, running and empty."""
    return running_and_empty(redis_server)


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A CA of the tests' own, and a server certificate it signed for localhost and 127.0.0.1."""
    return TlsFiles.make(tmp_path_factory.mktemp("tls"), ["localhost", "127.0.0.1"])


@pytest.fixture(scope="session")
def tls_redis_server(tls_files: TlsFiles) -> Iterator[RedisServer]:
    """A private Redis that speaks TLS only, with the same users."""
    yield from private_redis(tls_files)


@pytest.fixture
def tls_redis_up(tls_redis_server: RedisServer) -> RedisServer:
    return running_and_empty(tls_redis_server)


def empty_database(owner_url: str) -> None:
    """As if the database were new: no rows, ids from 1, and a new cache namespace (so the
    shared Redis holds nothing this database has ever written). Done as the owner: the
    service's role may not truncate."""
    with psycopg2.connect(owner_url) as conn, conn.cursor() as cur:
        cur.execute("TRUNCATE users, cache_repairs RESTART IDENTITY")
        cur.execute("UPDATE cache_namespace SET value = substr(md5(random()::text), 1, 12)")
    conn.close()


def keys_of(database_url: str) -> Keys:
    """The cache key names a service on this database uses."""
    with psycopg2.connect(database_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT value FROM cache_namespace")
        namespace = cur.fetchone()[0]
    conn.close()
    return Keys.for_namespace(namespace)


def settings_for(database_url: str, redis_url: str, **overrides: object) -> Settings:
    return Settings(database_url=database_url, redis_url=redis_url,
                    **{"cache_cooldown": 0.2, **overrides})


@dataclass(frozen=True)
class ApiTokens:
    """An API_TOKENS_FILE with two tokens, as when one is being rotated out."""

    path: Path
    tokens: tuple[str, str]

    def header(self, which: int = 0) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[which]}"}


@pytest.fixture(scope="session")
def api_tokens(tmp_path_factory: pytest.TempPathFactory) -> ApiTokens:
    tokens = ("first-token.A1b2C3d4E5f6G7h8", "second~token/Zz9+Yy8=")
    path = tmp_path_factory.mktemp("tokens") / "api_tokens"
    path.write_text(f"{tokens[0]}\n\n  {tokens[1]}  \n")  # blank lines and spaces are ignored
    return ApiTokens(path, tokens)


def app_for(database_url: str, owner_url: str, redis_url: str,
            **overrides: object) -> Iterator[Flask]:
    """An app on an emptied database, its pool closed afterwards."""
    empty_database(owner_url)
    app = create_app(settings_for(database_url, redis_url, **overrides))
    yield app
    app.extensions["cachestack.users"].database.close()


@pytest.fixture
def app(database_url: str, owner_url: str, redis_up: RedisServer) -> Iterator[Flask]:
    yield from app_for(database_url, owner_url, redis_up.url)


@pytest.fixture
def guarded_app(database_url: str, owner_url: str, redis_up: RedisServer,
                api_tokens: ApiTokens) -> Iterator[Flask]:
    """An app whose /users routes need one of `api_tokens`."""
    yield from app_for(database_url, owner_url, redis_up.url, api_tokens=api_tokens.tokens)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def serve(database_url: str, owner_url: str, redis_server: RedisServer,
          **env: str) -> Iterator[ServiceProcess]:
    """The real multi-worker server on an emptied database, stopped afterwards."""
    if redis_server.process is None:
        redis_server.start()
    empty_database(owner_url)
    process = ServiceProcess({"DATABASE_URL": database_url, "REDIS_URL": redis_server.url,
                              "CACHE_COOLDOWN_SECONDS": "0.5", **env})
    yield process
    process.close()


@pytest.fixture(scope="module")
def service(database_url: str, owner_url: str,
            redis_server: RedisServer) -> Iterator[ServiceProcess]:
    """The real multi-worker server, for tests of concurrency and faults."""
    yield from serve(database_url, owner_url, redis_server)


@pytest.fixture(scope="module")
def guarded_service(database_url: str, owner_url: str, redis_server: RedisServer,
                    api_tokens: ApiTokens) -> Iterator[ServiceProcess]:
    """The real server, its /users routes guarded by `api_tokens`."""
    yield from serve(database_url, owner_url, redis_server,
                     API_TOKENS_FILE=str(api_tokens.path))
