"""Passwords that rotate under a running service (what `python -m orchestrate rotate` does):
with DATABASE_PASSWORD_FILE and REDIS_PASSWORD_FILE, each new connection logs in with what the
file holds then, so the role's and the Redis user's passwords change without a restart and
without a failed request, and the old values are refused afterwards. Postgres keeps one
password per role, so a login the file's password cannot make is tried once more with the
last one that logged in. The API token file is in test_auth.py."""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import psycopg2
import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient

from service.files import SecretFile
from service.postgres.changes import ChangeStream
from service.process.config import Settings, with_password
from service.process.factory import create_app
from service.settings import PostgresSettings
from service.web.routes import users_of

from .helpers import Read, create, empty_database, private_redis, query, read, running_and_empty
from .servers import RedisServer, wait_until

PASSWORD_REFUSED = "password authentication failed"


def without_password(url: str) -> str:
    parts = urlsplit(url)
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", "@")).geturl()


class RolePassword:
    """The service role's password, changed as the role itself (any role may change its
    own; the owner may not change another's) and put back afterwards."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.original = self.current = urlsplit(url).password or ""

    def change(self, password: str) -> None:
        query(with_password(self.url, self.current), "ALTER ROLE CURRENT_USER PASSWORD %s",
              (password,))
        self.current = password

    def refuses(self, password: str) -> bool:
        try:
            psycopg2.connect(with_password(self.url, password), connect_timeout=3).close()
        except psycopg2.OperationalError as exc:
            return PASSWORD_REFUSED in str(exc)
        return False


@pytest.fixture
def role_password(database_url: str) -> Iterator[RolePassword]:
    role = RolePassword(database_url)
    yield role
    if role.current != role.original:
        role.change(role.original)


def app_from_env(env: dict[str, str]) -> Flask:
    """An app made as `python -m service` makes it, from these settings alone."""
    return create_app(Settings.from_env({"CACHE_COOLDOWN_SECONDS": "0.2", **env}))


@pytest.fixture
def password_file(tmp_path: Path, role_password: RolePassword) -> Path:
    path = tmp_path / "postgres_app_password"
    path.write_text(role_password.original + "\n")
    return path


@pytest.fixture
def app_with_password_file(database_url: str, owner_url: str, redis_up: RedisServer,
                           password_file: Path) -> Iterator[Flask]:
    """An app whose DATABASE_URL has no password: it is in DATABASE_PASSWORD_FILE."""
    empty_database(owner_url)
    app = app_from_env({"DATABASE_URL": without_password(database_url),
                        "DATABASE_PASSWORD_FILE": str(password_file),
                        "REDIS_URL": redis_up.url})
    yield app
    users_of(app).close()


def new_login(app: Flask) -> FlaskClient:
    """A client of `app` whose next request logs in to Postgres anew: the pool's idle
    connections are closed, as after Postgres closed them."""
    users_of(app).close()
    return app.test_client()


def test_the_rotations_order_file_then_role_fails_no_request(
        app_with_password_file: Flask, password_file: Path, role_password: RolePassword,
        caplog: pytest.LogCaptureFixture) -> None:
    """What `rotate` does: the file first, ALTER ROLE a moment later."""
    app, old, new = app_with_password_file, role_password.original, secrets.token_urlsafe(24)
    with caplog.at_level(logging.INFO):
        create(new_login(app), "before", "before@example.org")
        password_file.write_text(new + "\n")
        # Postgres still has the old one: the file's is refused, the last that logged in works.
        create(new_login(app), "between", "between@example.org")
        role_password.change(new)
        create(new_login(app), "after", "after@example.org")
    assert role_password.refuses(old)
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]
    assert old not in caplog.text and new not in caplog.text


def test_a_change_stream_reader_starting_mid_rotation_logs_in(
        stream_url: str, slot: str, tmp_path: Path) -> None:
    """The stream's role rotates as the service's does, file first: a reader that starts
    before Postgres is given the new password logs in with the last one that worked. (A
    REPLICATION role's password takes a superuser to change: the new one is refused here.)"""
    role, new = RolePassword(stream_url), secrets.token_urlsafe(24)
    path = tmp_path / "postgres_stream_password"
    path.write_text(role.original + "\n")
    stream = ChangeStream(PostgresSettings(
        url=without_password(stream_url),
        password=SecretFile("DATABASE_PASSWORD", str(path), role.original)), slot)
    try:
        stream.start(lambda made_anew: None)
        stream.close()
        path.write_text(new + "\n")
        stream.start(lambda made_anew: None)
    finally:
        stream.close()
    assert role.refuses(new)


def test_the_role_first_then_the_file_fails_no_request(
        app_with_password_file: Flask, password_file: Path,
        role_password: RolePassword) -> None:
    """Sessions that logged in stay logged in; new ones read the new file."""
    app, new = app_with_password_file, secrets.token_urlsafe(24)
    client = new_login(app)
    create(client, "before", "before@example.org")
    role_password.change(new)
    create(client, "between", "between@example.org")  # the pooled session
    password_file.write_text(new + "\n")
    create(new_login(app), "after", "after@example.org")
    assert role_password.refuses(role_password.original)


def test_when_neither_password_logs_in_it_is_a_503_and_one_line_until_the_file_is_right(
        app_with_password_file: Flask, password_file: Path, role_password: RolePassword,
        caplog: pytest.LogCaptureFixture) -> None:
    app, new = app_with_password_file, secrets.token_urlsafe(24)
    create(new_login(app), "before", "before@example.org")
    role_password.change(new)
    password_file.write_text("a-wrong-one\n")
    with caplog.at_level(logging.INFO, logger="service.postgres.pool"):
        for _ in range(3):
            refused = new_login(app).post("/users", json={"username": "nobody",
                                                          "email": "nobody@example.org"})
            assert refused.status_code == 503 and refused.headers["Retry-After"]
        password_file.write_text(new + "\n")
        create(new_login(app), "after", "after@example.org")
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 2 and PASSWORD_REFUSED in lines[0], lines
    assert lines[1] == "database available again"
    assert new not in caplog.text and "a-wrong-one" not in caplog.text


@pytest.mark.parametrize("spoil", ["remove", "empty"])
def test_a_password_file_that_goes_missing_or_empty_keeps_the_value_it_held(
        app_with_password_file: Flask, password_file: Path, spoil: str,
        caplog: pytest.LogCaptureFixture) -> None:
    app = app_with_password_file
    with caplog.at_level(logging.WARNING, logger="service.process.config"):
        if spoil == "remove":
            password_file.unlink()
        else:
            password_file.write_text("")
        for n in range(3):
            create(new_login(app), f"while{n}", f"while{n}@example.org")
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 1 and "DATABASE_PASSWORD_FILE" in lines[0], lines
    assert str(password_file) in lines[0]


# -- Redis --------------------------------------------------------------------------------


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A Redis of the test's own, since its users' passwords change."""
    yield from private_redis()


def acl_password(admin: redis.Redis, *rules: str) -> None:
    admin.execute_command("ACL", "SETUSER", "service", *rules)


def sha256(password: str) -> str:
    return hashlib.sha256(password.encode()).hexdigest()


def from_memory(client: FlaskClient, redis_up: RedisServer, user: dict) -> bool:
    """Whether a read of `user` is a hit that sent Redis nothing (the near cache's), once the
    service is connected again."""
    before = redis_up.client().info("stats")["total_commands_processed"]
    found = read(client, f"/users/{user['id']}")
    assert found.status == 200 and found.data == user  # whether from Redis or Postgres
    sent = redis_up.client().info("stats")["total_commands_processed"] - before - 1
    return found.cache == "HIT" and sent == 0


def reconnected(client: FlaskClient, redis_up: RedisServer, user: dict) -> None:
    """Drop every connection the service has to Redis, the pool's and the near cache's
    listener's; each read meanwhile answers right, and the near cache serves again soon."""
    redis_up.client().client_kill_filter(user="service")
    wait_until(lambda: from_memory(client, redis_up, user), 5, "the near cache", interval=0.1)


def test_a_redis_password_rotates_under_the_pool_and_the_near_cache(
        database_url: str, owner_url: str, own_redis: RedisServer, tmp_path: Path) -> None:
    """As `rotate` does it: the new password beside the old, the file, then only the new."""
    redis_up = running_and_empty(own_redis)
    old, new = redis_up.passwords["service"], secrets.token_urlsafe(24)
    path = tmp_path / "redis_service_password"
    path.write_text(old + "\n")
    empty_database(owner_url)
    app = app_from_env({"DATABASE_URL": database_url,
                        "REDIS_URL": f"redis://service@127.0.0.1:{redis_up.port}/0",
                        "REDIS_PASSWORD_FILE": str(path)})
    try:
        client = app.test_client()
        user = create(client)
        reconnected(client, redis_up, user)
        admin = redis_up.client()
        acl_password(admin, f"#{sha256(new)}")
        path.write_text(new + "\n")
        reconnected(client, redis_up, user)
        acl_password(admin, "resetpass", f"#{sha256(new)}")
        reconnected(client, redis_up, user)  # only the new password logs in now
        renamed = client.patch(f"/users/{user['id']}", json={"display_name": "Rotated"})
        assert renamed.status_code == 200
        assert read(client, f"/users/{user['id']}") == Read("HIT", renamed.get_json()["data"])
        with pytest.raises(redis.AuthenticationError):
            redis.Redis.from_url(f"redis://service:{old}@127.0.0.1:{redis_up.port}/0").ping()
        assert redis.Redis.from_url(f"redis://service:{new}@127.0.0.1:{redis_up.port}/0").ping()
    finally:
        users_of(app).close()
