"""What the service tests share besides fixtures (conftest.py) and real servers (servers.py):
the test database, apps and servers on it, and requests with what they answered. No test
module imports another; they all import from here."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlsplit

import psycopg2
import requests
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import EnvironBuilder

from service.cache.keys import Keys, Lookup
from service.postgres import schema, statements
from service.process.config import Settings
from service.process.factory import create_app
from service.settings import CacheSettings, PostgresSettings, RedisSettings
from service.web.routes import users_of
from tests.support import require

from .servers import ROOT, RedisServer, ServiceProcess, TlsFiles, wait_until

# -- the database -------------------------------------------------------------------


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
    """What `python -m service migrate` does, in this process (for the change stream's role
    too, which scripts/test-services.sh makes); returns what it applied."""
    conn = psycopg2.connect(owner_url)
    try:
        return schema.migrate(conn, app_role, "cachestack_stream")
    finally:
        conn.close()


def empty_database(owner_url: str) -> None:
    """As if the database were new: no rows, ids from 1, and a new cache namespace (so the
    shared Redis holds nothing this database has ever written). Done as the owner: the
    service's role may not truncate."""
    query(owner_url, "TRUNCATE users RESTART IDENTITY; "
          "UPDATE cache_namespace SET value = substr(md5(random()::text), 1, 12)")


def keys_of(database_url: str, redis_server: RedisServer) -> Keys:
    """The cache key names a service on this database uses in Redis's current epoch."""
    ((namespace,),) = query(database_url, "SELECT value FROM cache_namespace")
    names = Keys.for_namespace(namespace)
    return names.in_epoch(redis_server.client().get(names.epoch).decode())


def via_proxy(database_url: str, proxy_port: int) -> str:
    """`database_url` by way of a proxy on `proxy_port` (servers.TcpProxy)."""
    return re.sub(r"@[^/]+/", f"@127.0.0.1:{proxy_port}/", database_url)


# -- apps and servers ---------------------------------------------------------------


def settings_for(database_url: str, redis_url: str, *, postgres: dict | None = None,
                 cache: dict | None = None, **overrides: object) -> Settings:
    """Settings for an app of the tests: `postgres` and `cache` override fields of those
    layers' records, the rest the process's own. The auditor is off unless asked for (the
    tests make hundreds of apps), and Redis is tried again soon after a failure."""
    return Settings(postgres=PostgresSettings(url=database_url, **(postgres or {})),
                    redis=RedisSettings(url=redis_url),
                    cache=CacheSettings(**{"cooldown": 0.2, "audit_per_second": 0,
                                           **(cache or {})}),
                    **overrides)


def app_for(database_url: str, owner_url: str, redis_url: str,
            **overrides: object) -> Iterator[Flask]:
    """An app on an emptied database, its pool closed afterwards."""
    empty_database(owner_url)
    app = create_app(settings_for(database_url, redis_url, **overrides))
    yield app
    users_of(app).close()


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


@dataclass(frozen=True)
class ApiTokens:
    """An API_TOKENS_FILE with two tokens, as when one is being rotated out."""

    path: Path
    tokens: tuple[str, str]

    def header(self, which: int = 0) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[which]}"}


class Sent(NamedTuple):
    """What a WSGI app sent: the status line, the headers (sorted) and the body."""

    status: str
    headers: list[tuple[str, str]]
    body: bytes


def environ(path: str, method: str = "GET", **options: object) -> dict:
    """A WSGI environ for a request, made as Werkzeug's test client makes it."""
    return EnvironBuilder(path=path, method=method, **options).get_environ()


def call(wsgi_app: Callable, env: dict) -> Sent:
    """Send `env` to a WSGI app; what it answered."""
    started: list = []
    body = b"".join(wsgi_app(env, lambda status, headers, *_: started.extend([status, headers])))
    return Sent(started[0], sorted(started[1]), body)


def flask_alone(app: Flask) -> Callable:
    """Flask's own WSGI app, which the app factory wrapped with the hot path and the token
    check."""
    return lambda env, start: Flask.wsgi_app(app, env, start)


def counter(base_url: str, name: str) -> float:
    """A counter's value on a real server's /metrics."""
    text = requests.get(base_url + "/metrics", timeout=5).text
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


# -- requests and the cache behind them ------------------------------------------------


def create(client: FlaskClient, username: str = "alice", email: str = "Alice@Example.org",
           **extra: object) -> dict:
    """Create a user (201, or the test fails); returns it."""
    response = client.post("/users", json={"username": username, "email": email, **extra})
    assert response.status_code == 201, response.get_json()
    return response.get_json()["data"]


class Read(NamedTuple):
    """What a GET answered: its X-Cache ('' without one), its data (a user, a list of users,
    or None for an error) and its status."""

    cache: str
    data: object
    status: int = 200


def read(client: FlaskClient, path: str) -> Read:
    """GET `path`; a body's "source" must agree with its X-Cache."""
    response = client.get(path)
    body = response.get_json()
    if "source" in body:
        assert body["source"] == ("cache" if response.headers["X-Cache"] == "HIT" else "db")
    return Read(response.headers.get("X-Cache", ""), body.get("data"), response.status_code)


def lookups(user: dict) -> list[tuple[str, object]]:
    """Every way to read `user`, each with the data it answers: by its id, the user; by
    its id, username or email as a query, a list of it."""
    return [(f"/users/{user['id']}", user), (f"/users?id={user['id']}", [user]),
            (f"/users?username={user['username'].upper()}", [user]),
            (f"/users?email={user['email']}", [user])]


def keys(app: Flask) -> Keys:
    return users_of(app).cache.keys


def send_fills(client: FlaskClient) -> None:
    """A miss's fill goes out with the next Redis command or a few milliseconds later;
    send it now, before looking into Redis."""
    users_of(client.application).cache.redis.flush()


# -- races: a reader parked between its Postgres read and its fill, a late writer ---------


def after_each_load(app: Flask, then: Callable[[], None]) -> None:
    """Call `then` in each reader of `app` that missed, between its Postgres read and its
    fill: the cache's read is given a loader that calls it after loading."""
    cache = users_of(app).cache
    read = cache.read

    def read_then(lookup: Lookup, load: Callable) -> object:
        def load_then() -> object:
            row = load()
            then()
            return row

        return read(lookup, load_then)

    cache.read = read_then  # an attribute of this one cache, for this one app


def parked_reader(app: Flask, path: str) -> tuple[threading.Thread, threading.Event, list[Read]]:
    """Start a GET of `path` that stops after reading Postgres, before filling Redis; its
    Read lands in the list once `finish` let it go on."""
    reached, release, result = threading.Event(), threading.Event(), []

    def hold() -> None:
        if threading.current_thread().name == "parked-reader":
            reached.set()
            release.wait(5)

    after_each_load(app, hold)
    thread = threading.Thread(name="parked-reader",
                              target=lambda: result.append(read(app.test_client(), path)))
    thread.start()
    assert reached.wait(5), "the reader never reached its fill"
    return thread, release, result


def finish(thread: threading.Thread, release: threading.Event) -> None:
    release.set()
    thread.join(5)


def evicted(redis_up: RedisServer, *names: str) -> None:
    """Gone, as Redis evicts a key when it is out of memory."""
    assert redis_up.client().delete(*names) == len(names), names


def late_update(app: Flask, user_id: int, changes: dict) -> Callable[[], None]:
    """Commit an update now but hold back its write-through: returns the write-through."""
    users = users_of(app)
    token = users.cache.lease_for_write(user_id)
    change = statements.update_user(users.database, user_id, changes)
    return lambda: users.cache.updated(change, token)


# -- the change stream ---------------------------------------------------------------


def stream_url_for(database_url: str) -> str:
    """The stream's role (LOGIN REPLICATION) on the test database."""
    return os.environ.get("TEST_STREAM_DATABASE_URL") or re.sub(
        r"//[^@]+@", "//cachestack_stream:cachestack_stream@", database_url)


def new_slot_name() -> str:
    """A replication slot name of one test's own (slots belong to the whole cluster)."""
    return f"cachestack_test_{uuid.uuid4().hex[:8]}"


def drop_slot(url: str, name: str) -> bool:
    """Drop the slot unless a reader has it; True once it is gone."""
    rows = query(url, "SELECT active FROM pg_replication_slots WHERE slot_name = %s", (name,))
    if rows and not rows[0][0]:
        query(url, "SELECT pg_drop_replication_slot(%s)", (name,))
    return not query(url, "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (name,))


def stream_process(stream_url: str, redis_url: str, slot: str,
                   port: int = 0) -> subprocess.Popen:
    """`python -m service stream`, as deployed, its /readyz and metrics at `port`."""
    return subprocess.Popen(
        [sys.executable, "-m", "service", "stream", "--port", str(port)],
        env={**os.environ, "DATABASE_URL": stream_url, "REDIS_URL": redis_url,
             "STREAM_SLOT": slot}, cwd=ROOT, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)


def reading(stream_url: str, slot: str) -> int | None:
    """The process id of the reader that has the slot (its application_name says it)."""
    rows = query(stream_url, "SELECT application_name FROM pg_replication_slots JOIN "
                 "pg_stat_replication ON pid = active_pid WHERE slot_name = %s", (slot,))
    return int(rows[0][0].split()[-1]) if rows else None


def streaming(stream_url: str, redis_url: str) -> Iterator[subprocess.Popen]:
    """A stream process on a slot of its own, once it reads it; killed, its slot dropped."""
    slot = new_slot_name()
    process = stream_process(stream_url, redis_url, slot)
    try:
        wait_until(lambda: reading(stream_url, slot) is not None, 30, "the stream to read")
        yield process
    finally:
        process.kill()
        process.wait()
        wait_until(lambda: drop_slot(stream_url, slot), 10, f"slot {slot} to be dropped")


# -- the command line -----------------------------------------------------------------

SECRET = "do-not-print-this-3f9a"


def run_service(*args: str, **env: str) -> subprocess.CompletedProcess:
    """`python -m service ARGS` with `env` and none of the caller's service settings."""
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("DATABASE_", "REDIS_", "API_TOKENS"))}
    return subprocess.run([sys.executable, "-m", "service", *args], cwd=ROOT, timeout=30,
                          env={**clean, **env}, capture_output=True, text=True)


def assert_one_line_error(result: subprocess.CompletedProcess, *words: str) -> None:
    """Status 2 and one `error:` line naming each of `words`: no traceback, no SECRET."""
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert SECRET not in result.stderr + result.stdout
    for word in words:
        assert word in lines[0]
