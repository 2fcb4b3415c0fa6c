"""The stack's Redis users (docker/redis/users.acl), on the tests' private Redis: the service's
user may run only what the service sends, on its own keys, and the service sends nothing else."""

from __future__ import annotations

import socket
import time

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient

from .helpers import create, send_fills
from .servers import RedisServer


def as_user(server: RedisServer, user: str) -> redis.Redis:
    return redis.Redis.from_url(server.url_for(user))


@pytest.mark.parametrize("command", [
    ("FLUSHALL",), ("FLUSHDB",), ("CONFIG", "GET", "maxmemory"), ("CONFIG", "SET", "save", ""),
    ("KEYS", "*"), ("ACL", "LIST"), ("ACL", "SETUSER", "service", "+@all"), ("SCRIPT", "FLUSH"),
    ("SET", "elsewhere", "x"), ("GET", "elsewhere"), ("DEBUG", "SLEEP", "0"),
    ("REPLICAOF", "127.0.0.1", "1"), ("CLIENT", "KILL", "TYPE", "pubsub"),
    ("SUBSCRIBE", "another-channel"),
    # No Lua of its own: not as a script, not as a function.
    ("EVAL", "return 1", "0"), ("EVALSHA", "e0e1f9fabfc9d4800c877a703b823ac0578ff8db", "0"),
    ("EVAL_RO", "return 1", "0"), ("SCRIPT", "LOAD", "return 1"),
    ("FUNCTION", "LOAD", "#!lua name=mine\nredis.register_function('f', function() end)"),
    ("FUNCTION", "DELETE", "cachestack"), ("FUNCTION", "FLUSH"), ("FUNCTION", "RESTORE", "x"),
])
def test_the_service_user_is_refused(redis_up: RedisServer, command: tuple[str, ...]) -> None:
    with pytest.raises(redis.exceptions.NoPermissionError):
        as_user(redis_up, "service").execute_command(*command)


def test_a_lua_loop_that_would_outgrow_redis_is_refused_and_redis_runs_on(
        redis_up: RedisServer) -> None:
    """Eviction runs between commands, not inside a script: one EVAL of a loop of SETs could
    grow Redis past its memory limit within the one call. The service's user may not send it."""
    loop = "for i = 1, 700000 do redis.call('SET', 'cs:fill:' .. i, string.rep('x', 300)) end"
    with pytest.raises(redis.exceptions.NoPermissionError):
        as_user(redis_up, "service").eval(loop, 0)
    assert redis_up.client().ping() and redis_up.client().dbsize() == 0


def test_a_function_called_by_the_service_user_cannot_reach_other_keys(
        redis_up: RedisServer) -> None:
    """The commands a function runs are the caller's: follow, told that users' entries are
    under a prefix outside cs:, is refused the GET it would send there."""
    admin = redis_up.client()
    admin.set("cs:t:epoch", "e")
    admin.set("cs:t:e:username:ann", "7")
    with pytest.raises(redis.ResponseError, match="can't access"):
        as_user(redis_up, "service").fcall("cachestack_follow", 4, "cs:t:epoch",
                                           "cs:t:e:username:ann", "cs:t:e:lease:username:ann",
                                           "cs:t:timeline", "e", "token", 1000, "elsewhere:",
                                           "username", "ann")


def test_the_service_user_may_call_the_cache_functions(redis_up: RedisServer) -> None:
    name = as_user(redis_up, "service").fcall("cachestack_epoch", 1, "cs:t:epoch", "", "n1")
    assert name.endswith(b":n1") and redis_up.client().get("cs:t:epoch") == name


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


def test_the_service_sends_only_what_its_user_may_run(
        app: Flask, client: FlaskClient, redis_up: RedisServer, owner_url: str) -> None:
    """Every kind of request, a fill, a flush, a new epoch after an outage: Redis logged no
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
    assert client.delete(f"/users/{user['id']}").status_code == 204  # its write-through lost
    redis_up.start()  # with its append-only file: the user's entry of the old epoch is back
    time.sleep(0.3)  # past the breaker's cool-down
    assert client.get(f"/users/{user['id']}").status_code == 404
    assert redis_up.client().acl_log() == []
