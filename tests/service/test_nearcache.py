"""The in-process near cache: hits cost no Redis command, and no change made elsewhere
(another worker, a flush, a lost subscription) is ever hidden by it. Every test runs against
a plain Redis and against one that speaks TLS only (the listener reads an SSL socket then)."""

from __future__ import annotations

import time

import pytest
from flask import Flask
from flask.testing import FlaskClient

from service.process.factory import create_app
from service.web.routes import users_of

from .helpers import (
    Read,
    create,
    empty_database,
    keys,
    read,
    running_and_empty,
    send_fills,
    settings_for,
)
from .servers import RedisServer, wait_until


@pytest.fixture(params=["plain", "tls"])
def redis_up(request: pytest.FixtureRequest) -> RedisServer:
    """The private Redis, running and empty: each test runs on both kinds."""
    server = "redis_server" if request.param == "plain" else "tls_redis_server"
    return running_and_empty(request.getfixturevalue(server))


def commands(redis_up: RedisServer) -> int:
    return int(redis_up.client().info("stats")["total_commands_processed"])


@pytest.fixture
def other_worker(database_url: str, redis_up: RedisServer) -> FlaskClient:
    """A second app with its own Redis connections and near cache, like another process."""
    return create_app(settings_for(database_url, redis_up.url)).test_client()


def test_repeated_hits_are_served_from_process_memory(
        client: FlaskClient, redis_up: RedisServer) -> None:
    user = create(client)
    assert read(client, f"/users/{user['id']}") == Read("HIT", user)  # from Redis, then kept
    before = commands(redis_up)
    for _ in range(5):
        assert read(client, f"/users/{user['id']}") == Read("HIT", user)
    assert commands(redis_up) - before == 1  # only the INFO call above


def test_a_write_by_another_worker_is_seen_at_once(
        client: FlaskClient, other_worker: FlaskClient) -> None:
    user = create(client)
    read(client, f"/users/{user['id']}")
    read(client, f"/users/{user['id']}")
    new = other_worker.patch(f"/users/{user['id']}",
                             json={"display_name": "changed"}).get_json()["data"]
    assert read(client, f"/users/{user['id']}").data == new
    assert other_worker.delete(f"/users/{user['id']}").status_code == 204
    assert read(client, f"/users/{user['id']}").status == 404


def test_flushall_empties_the_near_cache(
        app: Flask, client: FlaskClient, redis_up: RedisServer) -> None:
    user = create(client)
    read(client, f"/users/{user['id']}")
    near = users_of(app).cache.near
    assert near.get(str(user["id"])) is not None
    redis_up.client().flushall()
    # Redis may write a flush's message just after the flusher's own reply (unlike a write's,
    # which it sends first); a flush changes no user, so soon is soon enough.
    wait_until(lambda: near.get(str(user["id"])) is None, 1, "the flush's invalidation")


def test_a_fill_elsewhere_leaves_the_near_cache_alone(
        app: Flask, client: FlaskClient, other_worker: FlaskClient,
        redis_up: RedisServer) -> None:
    """Only writes announce changes: a user another worker merely read back into Redis
    (here after its key went away, as on expiry) is still answered from memory."""
    user = create(client)
    read(client, f"/users/{user['id']}")  # from Redis, then kept
    redis_up.client().delete(keys(app).user(user["id"]))
    assert read(other_worker, f"/users/{user['id']}") == Read("MISS", user)
    send_fills(other_worker)
    assert redis_up.client().exists(keys(app).user(user["id"]))
    before = commands(redis_up)
    assert read(client, f"/users/{user['id']}") == Read("HIT", user)
    assert commands(redis_up) - before == 1  # only the INFO call above


def test_a_lost_subscription_turns_the_near_cache_off_then_on(
        client: FlaskClient, other_worker: FlaskClient, redis_up: RedisServer) -> None:
    user = create(client)
    read(client, f"/users/{user['id']}")
    redis_up.client().client_kill_filter(_type="pubsub")  # every listener, both "workers"
    new = other_worker.patch(f"/users/{user['id']}",
                             json={"display_name": "after kill"}).get_json()["data"]
    assert read(client, f"/users/{user['id']}").data == new
    time.sleep(1.1)  # past the wait before subscribing again
    read(client, f"/users/{user['id']}")
    read(client, f"/users/{user['id']}")
    before = commands(redis_up)
    assert read(client, f"/users/{user['id']}") == Read("HIT", new)
    assert commands(redis_up) - before == 1


def test_a_value_read_before_another_thread_drained_its_invalidation_is_not_kept(
        app: Flask, client: FlaskClient, other_worker: FlaskClient,
        redis_up: RedisServer) -> None:
    """Thread A reads a row from Redis; a write elsewhere invalidates it; thread B drains
    that invalidation; only then does A try to keep its (now old) copy."""
    user = create(client)
    near = users_of(app).cache.near
    assert near.get(str(user["id"])) is None
    epoch = near.epoch  # A's read of Redis starts here
    old = redis_up.client().get(keys(app).user(user["id"]))
    new = other_worker.patch(f"/users/{user['id']}",
                             json={"display_name": "newer"}).get_json()["data"]
    near.get(str(user["id"] + 1))  # B drains the invalidation of A's user
    near.put(str(user["id"]), old, epoch)  # A, late
    assert read(client, f"/users/{user['id']}").data == new


def test_a_worker_that_fell_behind_trusts_nothing_it_held(
        app: Flask, client: FlaskClient, redis_up: RedisServer) -> None:
    """Invalidations of other keys pile up in this idle worker's socket. Past BEHIND_BYTES
    the buffers may have been full, with newer ones still in Redis: everything is dropped."""
    user = create(client)
    read(client, f"/users/{user['id']}")  # from Redis, then kept
    near = users_of(app).cache.near
    elsewhere = redis_up.client()  # as writes elsewhere announce other users
    for n in range(1, 4):
        elsewhere.set(keys(app).changes + str(user["id"] + n), "x")
    assert near.get(str(user["id"])) is not None  # a few messages: still trusted
    burst = elsewhere.pipeline(transaction=False)
    for n in range(1, 200):  # one message naming them all, ~9 KB
        burst.set(keys(app).changes + str(user["id"] + n), "x")
    burst.execute()
    assert near.get(str(user["id"])) is None
    assert read(client, f"/users/{user['id']}") == Read("HIT", user)  # from Redis again


def test_an_idle_worker_still_reads_what_redis_sends_it(
        client: FlaskClient, redis_up: RedisServer) -> None:
    """No request comes to drain the listener, yet Redis must not keep what it cannot send
    (it would hold it in memory and, past its limit for subscribers, drop the connection)."""
    user = create(client)
    read(client, f"/users/{user['id']}")  # subscribed
    elsewhere = redis_up.client()
    changes = keys(client.application).changes + "x" * 200
    for batch in range(40):  # 40 messages of ~230 KB: more than the socket buffers hold
        burst = elsewhere.pipeline(transaction=False)
        for n in range(1000):
            burst.set(f"{changes}{batch}:{n}", "x")
        burst.execute()

    def waiting_in_redis() -> int:
        return sum(int(c["omem"]) for c in elsewhere.client_list() if c["sub"] != "0")

    wait_until(lambda: waiting_in_redis() == 0, 2, "the listener to read its messages")


def test_the_near_cache_works_over_a_unix_socket(database_url: str, owner_url: str,
                                                  redis_up: RedisServer) -> None:
    empty_database(owner_url)
    over_socket = [create_app(settings_for(database_url, redis_up.unix_url)).test_client()
                   for _ in range(2)]
    user = create(over_socket[0])
    read(over_socket[0], f"/users/{user['id']}")
    before = commands(redis_up)
    assert read(over_socket[0], f"/users/{user['id']}") == Read("HIT", user)
    assert commands(redis_up) - before == 1  # only the INFO call above
    new = over_socket[1].patch(f"/users/{user['id']}",
                               json={"display_name": "changed"}).get_json()["data"]
    assert read(over_socket[0], f"/users/{user['id']}").data == new


def test_the_least_recently_read_user_is_the_one_that_goes(
        database_url: str, owner_url: str, redis_up: RedisServer) -> None:
    """A near cache of two: reading the first user again keeps it, the second one goes."""
    empty_database(owner_url)
    client = create_app(settings_for(database_url, redis_up.url,
                                     cache={"near_size": 2})).test_client()
    first, second, third = (create(client, name, f"{name}@example.org")
                            for name in ("ann", "ben", "cid"))
    for user in (first, second, first):  # into the near cache; the first read last
        read(client, f"/users/{user['id']}")
        read(client, f"/users/{user['id']}")
    read(client, f"/users/{third['id']}")  # in, and the least recently read goes out
    send_fills(client)
    before = commands(redis_up)
    assert read(client, f"/users/{first['id']}") == Read("HIT", first)
    assert commands(redis_up) - before == 1  # from memory: only the INFO call above
    before = commands(redis_up)
    assert read(client, f"/users/{second['id']}") == Read("HIT", second)
    assert commands(redis_up) - before > 1  # the INFO call, and a READ from Redis
