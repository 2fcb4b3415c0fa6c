"""Fixtures for the service tests: real PostgreSQL and Redis on 127.0.0.1, never mocks.

Postgres: the service runs as the stack's least-privileged role (TEST_DATABASE_URL, default
cachestack_app on the database scripts/test-services.sh creates); the database's owner
(TEST_OWNER_DATABASE_URL, default cachestack_owner) migrates it once per session and resets
its data between tests. Redis: a private redis-server per session with the stack's users,
so tests may stop and restart it freely. The helpers these are made of are in helpers.py.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import psycopg2
import pytest
from flask import Flask
from flask.testing import FlaskClient

from service.process.config import Settings
from service.process.factory import create_app
from service.web.routes import users_of
from tests.support import require

from .helpers import (
    ApiTokens,
    app_for,
    drop_slot,
    migrate,
    new_slot_name,
    private_redis,
    role_of,
    running_and_empty,
    serve,
    stream_url_for,
)
from .servers import RedisServer, ServiceProcess, TlsFiles, wait_until

DEFAULT_DATABASE_URL = "postgresql://cachestack_app:cachestack_app@127.0.0.1:5432/cachestack_test"
DEFAULT_OWNER_URL = "postgresql://cachestack_owner:cachestack_owner@127.0.0.1:5432/cachestack_test"


def reachable(url: str, what: str) -> str:
    try:
        psycopg2.connect(url, connect_timeout=3).close()
    except psycopg2.OperationalError:
        require(False, f"PostgreSQL at {what} (scripts/test-services.sh)")
    return url


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


@pytest.fixture(scope="session")
def stream_url(database_url: str) -> str:
    """The stream's role on the test database."""
    return stream_url_for(database_url)


@pytest.fixture
def slot(stream_url: str) -> Iterator[str]:
    """A replication slot of this test's own, dropped after."""
    name = new_slot_name()
    yield name
    wait_until(lambda: drop_slot(stream_url, name), 10, f"slot {name} to be dropped")


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


@pytest.fixture(scope="session")
def api_tokens(tmp_path_factory: pytest.TempPathFactory) -> ApiTokens:
    tokens = ("first-token.A1b2C3d4E5f6G7h8", "second~token/Zz9+Yy8=")
    path = tmp_path_factory.mktemp("tokens") / "api_tokens"
    path.write_text(f"{tokens[0]}\n\n  {tokens[1]}  \n")  # blank lines and spaces are ignored
    return ApiTokens(path, tokens)


@pytest.fixture
def app(database_url: str, owner_url: str, redis_up: RedisServer) -> Iterator[Flask]:
    yield from app_for(database_url, owner_url, redis_up.url)


@pytest.fixture
def guarded_app(database_url: str, owner_url: str, redis_up: RedisServer,
                api_tokens: ApiTokens) -> Iterator[Flask]:
    """An app whose /users routes need one of `api_tokens`."""
    yield from app_for(database_url, owner_url, redis_up.url, api_tokens=api_tokens.tokens)


@pytest.fixture
def new_app() -> Iterator[Callable[[Settings], Flask]]:
    """Make apps like another worker's, each with its own pool, Redis connections and near
    cache; all closed at the end of the test."""
    made: list[Flask] = []

    def make(settings: Settings) -> Flask:
        made.append(create_app(settings))
        return made[-1]

    yield make
    for app in made:
        users_of(app).close()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


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
