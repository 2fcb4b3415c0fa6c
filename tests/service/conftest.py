"""Fixtures for the service tests: real PostgreSQL and Redis on 127.0.0.1, never mocks.

Postgres: TEST_DATABASE_URL (default: the database `.ci/run` creates). Redis: a private
redis-server per session, so tests may stop and restart it freely.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import psycopg2
import pytest
from flask import Flask
from flask.testing import FlaskClient

from service.app import create_app
from service.cache import Keys
from service.config import Settings
from tests.support import require

from .servers import RedisServer, ServiceProcess

DEFAULT_DATABASE_URL = "postgresql://cachestack:cachestack@127.0.0.1:5432/cachestack_test"


@pytest.fixture(scope="session")
def database_url() -> str:
    url = os.environ.get("TEST_DATABASE_URL", DEFAULT_DATABASE_URL)
    try:
        psycopg2.connect(url, connect_timeout=3).close()
    except psycopg2.OperationalError:
        require(False, "PostgreSQL at TEST_DATABASE_URL")
    return url


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    require(shutil.which("redis-server") is not None, "redis-server (Debian package redis-server)")
    server = RedisServer()
    server.start()
    yield server
    server.close()


@pytest.fixture
def redis_up(redis_server: RedisServer) -> RedisServer:
    """The private Redis, running and empty."""
    if redis_server.process is None:
        redis_server.start()
    redis_server.client().flushall()
    return redis_server


def empty_database(database_url: str) -> None:
    """As if the database were new: no rows, ids from 1, and a new cache namespace (so the
    shared Redis holds nothing this database has ever written)."""
    with psycopg2.connect(database_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT to_regclass('cache_namespace') IS NOT NULL")
        if cur.fetchone()[0]:
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


def settings_for(database_url: str, redis_url: str, **overrides: float) -> Settings:
    return Settings(database_url=database_url, redis_url=redis_url,
                    **{"cache_cooldown": 0.2, **overrides})


@pytest.fixture
def app(database_url: str, redis_up: RedisServer) -> Iterator[Flask]:
    empty_database(database_url)
    app = create_app(settings_for(database_url, redis_up.url))
    yield app
    app.extensions["cachestack.users"].database.close()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture(scope="module")
def service(database_url: str, redis_server: RedisServer) -> Iterator[ServiceProcess]:
    """The real multi-worker server, for tests of concurrency and faults."""
    if redis_server.process is None:
        redis_server.start()
    empty_database(database_url)
    process = ServiceProcess({"DATABASE_URL": database_url, "REDIS_URL": redis_server.url,
                              "CACHE_COOLDOWN_SECONDS": "0.5"})
    yield process
    process.close()
