"""The cache's pool of Redis connections (service/wire/client.py, RedisClient), against the
tests' private redis-server, logged in as the service's Redis user (so on keys under cs:
only). The invalidation listener is tested with the near cache (test_nearcache.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import redis

from service.settings import RedisSettings
from service.wire.client import RedisClient

from .servers import RedisServer, wait_until

# A library of the tests' own, which the admin loads as Redis's admin loads the cache's.
LIBRARY = """#!lua name=redis_io_tests
redis.register_function('set_and_echo', function(keys, args)
  redis.call('SET', keys[1], args[1]) return args[1] end)
redis.register_function('failing', function() return redis.error_reply('NOPE on purpose') end)
"""
KEY = "cs:test:k"


@pytest.fixture
def pool(redis_up: RedisServer) -> Iterator[RedisClient]:
    redis_up.client().function_load(LIBRARY, replace=True)
    pool = RedisClient(RedisSettings(url=redis_up.url, timeout=0.2))
    yield pool
    pool.close()


def test_a_function_is_called_by_name(pool: RedisClient, redis_up: RedisServer) -> None:
    assert pool.call("set_and_echo", [KEY], ["one"]) == b"one"
    assert redis_up.client().get(KEY) == b"one"


def test_an_unawaited_call_takes_effect_soon(pool: RedisClient, redis_up: RedisServer) -> None:
    """Another connection must see its effect without this one being used again (a fill left
    unsent would leave its lease held and make other readers wait)."""
    assert pool.call("set_and_echo", [KEY], ["filled"], wait=False) is None
    wait_until(lambda: redis_up.client().get(KEY) == b"filled", 0.5, "the flusher to send it")


def test_an_unawaited_reply_is_read_before_the_next_command(pool: RedisClient) -> None:
    pool.command("PING")  # one connection, idle in the pool
    assert pool.call("set_and_echo", [KEY], ["later"], wait=False) is None
    # Sent with the next command on the same (only) connection, and its reply read first:
    # had it been left unread, the first GET would get "later".
    assert pool.command("GET", "cs:test:missing") is None
    assert pool.command("GET", KEY) == b"later"


def test_every_new_connection_is_handed_to_on_connect_before_its_first_command(
        pool: RedisClient, redis_up: RedisServer) -> None:
    seen: list[bytes] = []

    def on_connect(connection: redis.Connection) -> None:
        connection.send_command("GET", KEY)
        seen.append(connection.read_response())

    pool.on_connect = on_connect
    redis_up.client().set(KEY, "first")
    assert pool.command("SET", KEY, "second") == b"OK"
    assert pool.command("SET", KEY, "third") == b"OK"  # the same connection again
    assert seen == [b"first"]


def test_a_closed_pool_drops_the_connections_that_were_in_use(redis_up: RedisServer) -> None:
    """close() in one thread while another's command is under way: that connection is not
    used again, so nothing sent after the close goes to the Redis of before it."""
    pool = RedisClient(RedisSettings(url=redis_up.url, timeout=5))
    admin = redis_up.client()
    pool.command("PING")
    before = admin.info("stats")["total_connections_received"]
    admin.execute_command("CLIENT", "PAUSE", "300")  # well within the pool's timeout
    answers: list[bytes] = []
    in_use = threading.Thread(target=lambda: answers.append(pool.command("PING")))
    in_use.start()
    time.sleep(0.05)  # under way, waiting for Redis
    pool.close()
    in_use.join()
    assert answers == [b"PONG"]  # it was answered, and then not pooled again
    pool.command("PING")
    assert admin.info("stats")["total_connections_received"] - before == 1  # a new one
    pool.close()


def test_an_unawaited_error_does_not_break_the_connection(pool: RedisClient) -> None:
    pool.call("failing", [], [], wait=False)
    assert pool.command("PING") == b"PONG"


def test_an_error_reply_raises_and_leaves_the_connection_usable(pool: RedisClient) -> None:
    pool.command("SET", KEY, "kept")
    with pytest.raises(redis.ResponseError):
        pool.command("SET", KEY, "lost", "PX", "soon")
    assert pool.command("GET", KEY) == b"kept"


def test_connections_are_reused_not_opened_per_command(pool: RedisClient,
                                                       redis_up: RedisServer) -> None:
    admin = redis_up.client()
    before = admin.info("stats")["total_connections_received"]
    for _ in range(20):
        pool.command("PING")
    assert admin.info("stats")["total_connections_received"] - before == 1


def test_a_dead_redis_raises_and_a_restarted_one_is_used_again(
        pool: RedisClient, redis_up: RedisServer) -> None:
    pool.command("PING")
    redis_up.stop()
    try:
        with pytest.raises(redis.ConnectionError):
            pool.command("PING")
    finally:
        redis_up.start()
    assert pool.command("PING") == b"PONG"


def test_a_stalled_redis_times_out(pool: RedisClient, redis_up: RedisServer) -> None:
    pool.command("PING")
    stall = threading.Thread(target=lambda: redis_up.client().execute_command(
        "DEBUG", "SLEEP", "1"))
    stall.start()
    time.sleep(0.1)
    started = time.monotonic()
    with pytest.raises(redis.TimeoutError):
        pool.command("PING")
    assert time.monotonic() - started < 0.6
    stall.join()
    assert pool.command("PING") == b"PONG"
