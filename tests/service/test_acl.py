"""The stack's Redis users (docker/redis/users.acl), on the tests' private Redis: the service's
user may run only what the service sends, on its own keys, and the service sends nothing else."""

from __future__ import annotations

import fnmatch
import socket
import time

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient

from service.cache.keys import FORMAT
from service.wire.listener import CHANNEL

from .helpers import create, query, send_fills
from .servers import ACL_TEMPLATE, RedisServer


def as_user(server: RedisServer, user: str) -> redis.Redis:
    return redis.Redis.from_url(server.url_for(user))


@pytest.mark.parametrize("command", [
    ("FLUSHALL",), ("FLUSHDB",), ("CONFIG", "GET", "maxmemory"), ("CONFIG", "SET", "save", ""),
    ("KEYS", "*"), ("ACL", "LIST"), ("ACL", "SETUSER", "service", "+@all"), ("SCRIPT", "FLUSH"),
    ("SET", "elsewhere", "x"), ("GET", "elsewhere"), ("DEBUG", "SLEEP", "0"),
    ("REPLICAOF", "127.0.0.1", "1"), ("CLIENT", "KILL", "TYPE", "pubsub"),
    ("SUBSCRIBE", "another-channel"),
])
def test_the_service_user_is_refused(redis_up: RedisServer, command: tuple[str, ...]) -> None:
    with pytest.raises(redis.exceptions.NoPermissionError):
        as_user(redis_up, "service").execute_command(*command)


def test_a_script_of_the_service_user_cannot_reach_other_keys(redis_up: RedisServer) -> None:
    with pytest.raises(redis.ResponseError, match="can't access"):
        as_user(redis_up, "service").eval("return redis.call('GET', 'elsewhere')", 0)


def test_the_service_user_may_use_its_own_keys(redis_up: RedisServer) -> None:
    service = as_user(redis_up, "service")
    assert service.set("cs:1:ns:id:1", "v") and service.get("cs:1:ns:id:1") == b"v"


def test_the_default_user_cannot_log_in(redis_up: RedisServer) -> None:
    with socket.create_connection(("127.0.0.1", redis_up.port), timeout=2) as anonymous:
        anonymous.sendall(b"PING\r\n")
        assert anonymous.recv(100).startswith(b"-NOAUTH")
        anonymous.sendall(b"AUTH default anything\r\n")
        assert anonymous.recv(100).startswith(b"-WRONGPASS")


def test_the_health_user_may_only_ping(redis_up: RedisServer) -> None:
    health = as_user(redis_up, "health")
    assert health.ping()
    with pytest.raises(redis.exceptions.NoPermissionError):
        health.get("cs:1:ns:id:1")


def service_user_rules() -> list[str]:
    (line,) = [line for line in ACL_TEMPLATE.read_text().splitlines()
               if line.startswith("user service ")]
    return line.split()


def test_the_services_keys_and_channel_fall_under_its_user_rules() -> None:
    rules = service_user_rules()
    key_patterns = [rule[1:] for rule in rules if rule.startswith("~")]
    channels = [rule[1:] for rule in rules if rule.startswith("&")]
    some_key = f"{FORMAT}0123456789ab:lease:username:alice"
    assert any(fnmatch.fnmatchcase(some_key, pattern) for pattern in key_patterns), key_patterns
    assert channels == [CHANNEL.decode()]


def test_the_service_sends_only_what_its_user_may_run(
        app: Flask, client: FlaskClient, redis_up: RedisServer, owner_url: str) -> None:
    """Every kind of request, a fill, a flush, a repair after an outage: Redis logged no
    refusal (it logs each one in ACL LOG)."""
    redis_up.client().acl_log_reset()
    user = create(client)
    for path in (f"/users/{user['id']}", f"/users/{user['id']}", "/users?username=ALICE",
                 "/users?email=nobody@example.org", "/users/999"):
        assert client.get(path).status_code in (200, 404)
    assert client.patch(f"/users/{user['id']}", json={"username": "alicia"}).status_code == 200
    redis_up.client().flushall()
    assert client.get(f"/users/{user['id']}").headers["X-Cache"] == "MISS"
    send_fills(client)
    assert redis_up.client().acl_log() == []
    redis_up.stop()
    assert client.delete(f"/users/{user['id']}").status_code == 204  # keys left to repair
    redis_up.start()
    time.sleep(0.3)  # past the breaker's cool-down
    assert client.get(f"/users/{user['id']}").status_code == 404
    assert query(owner_url, "SELECT count(*) FROM cache_repairs") == [(0,)]  # repaired
    assert redis_up.client().acl_log() == []
