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
from service.wire.client import RedisClient, Script

from .servers import RedisServer, wait_until

SET_AND_ECHO = Script("redis.call('SET', KEYS[1], ARGV[1]) return ARGV[1]")
KEY = "cs:test:k"
FAILING = Script("return redis.error_reply('NOPE on purpose')")


@pytest.fixture
def pool(redis_up: RedisServer) -> Iterator[RedisClient]:
    pool = RedisClient(RedisSettings(url=redis_up.url, timeout=0.2))
    yield pool
    pool.close()


def test_a_script_redis_does_not_know_is_sent_whole_and_then_known(
        pool: RedisClient, redis_up: RedisServer) -> None:
    redis_up.client().script_flush()
    assert pool.run_script(SET_AND_ECHO, [KEY], ["one"]) == b"one"
    assert redis_up.client().script_exists(SET_AND_ECHO.sha) == [True]
    assert pool.run_script(SET_AND_ECHO, [KEY], ["two"]) == b"two"


def test_an_unawaited_script_takes_effect_soon_on_a_fresh_redis(
        pool: RedisClient, redis_up: RedisServer) -> None:
    """Another connection must see its effect without this one being used again (a fill
    left unsent, or one that met NOSCRIPT, would leave its lease held and make other
    readers wait)."""
    redis_up.client().script_flush()
    pool.run_script(SET_AND_ECHO, [KEY], ["filled"], wait=False)
    wait_until(lambda: redis_up.client().get(KEY) == b"filled", 0.5, "the flusher to send it")


def test_a_script_redis_lost_after_it_was_queued_is_sent_again_whole(
        pool: RedisClient, redis_up: RedisServer) -> None:
    pool.run_script(SET_AND_ECHO, [KEY], ["filled"])
    redis_up.client().script_flush()
    pool.run_script(SET_AND_ECHO, [KEY], ["again"], wait=False)  # by SHA1: NOSCRIPT
    assert pool.command("GET", KEY) == b"filled"  # the NOSCRIPT reply was settled first
    wait_until(lambda: redis_up.client().get(KEY) == b"again", 0.5, "the script sent whole")
    assert redis_up.client().script_exists(SET_AND_ECHO.sha) == [True]


def test_an_unawaited_reply_is_read_before_the_next_command(pool: RedisClient) -> None:
    pool.run_script(SET_AND_ECHO, [KEY], ["filled"])  # known to Redis: the next is an EVALSHA
    assert pool.run_script(SET_AND_ECHO, [KEY], ["later"], wait=False) is None
    # Sent with the next command on the same (only) connection, and its reply read first:
    # had it been left unread, GET would get "later".
    assert pool.command("GET", "cs:test:missing") is None
    assert pool.command("GET", KEY) == b"later"


def test_an_unawaited_error_does_not_break_the_connection(pool: RedisClient) -> None:
    pool.run_script(FAILING, [], [], wait=False)
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
