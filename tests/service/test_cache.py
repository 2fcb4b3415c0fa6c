"""Cache semantics: write-through on every lookup key, no stale reads after a write,
TTLs on everything, and right answers from Postgres when Redis is down, slow or flushed."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
from flask import Flask
from flask.testing import FlaskClient

from service.cache.keys import Lookup
from service.process.config import Settings

from .helpers import (
    Read,
    create,
    empty_database,
    keys,
    lookups,
    read,
    send_fills,
    settings_for,
)
from .servers import RedisServer


def test_first_reads_after_create_are_hits_by_every_key(client: FlaskClient) -> None:
    user = create(client)
    for path, data in lookups(user):
        assert read(client, path) == Read("HIT", data), path


def test_miss_then_hit(client: FlaskClient, redis_up: RedisServer) -> None:
    user = create(client)
    redis_up.client().flushall()
    for path, data in lookups(user)[1:]:  # /users/<id> and ?id= share one key
        assert read(client, path) == Read("MISS", data), path
        assert read(client, path) == Read("HIT", data), path


def test_no_read_returns_old_data_after_patch(client: FlaskClient) -> None:
    old = create(client, "alice", "alice@example.org")
    for path, _ in lookups(old):  # warm every key that could go stale
        read(client, path)
    new = client.patch(f"/users/{old['id']}", json={"username": "alicia",
                                                    "email": "alicia@example.org",
                                                    "display_name": "A"}).get_json()["data"]
    assert read(client, f"/users/{old['id']}") == Read("HIT", new)
    assert read(client, f"/users?id={old['id']}").data == [new]
    assert read(client, "/users?username=alice").data == []
    assert read(client, "/users?email=alice@example.org").data == []
    for path, data in lookups(new):
        assert read(client, path) == Read("HIT", data), path


def test_no_read_returns_old_data_after_delete(client: FlaskClient) -> None:
    user = create(client)
    for path, _ in lookups(user):
        read(client, path)
    assert client.delete(f"/users/{user['id']}").status_code == 204
    assert read(client, f"/users/{user['id']}").status == 404
    for path, _ in lookups(user)[1:]:
        assert read(client, path).data == [], path


def test_cached_not_found_is_gone_once_the_user_is_created(client: FlaskClient) -> None:
    queries = ["/users?username=carol", "/users?email=carol@example.org"]
    for path in queries:
        assert read(client, path) == Read("MISS", [])
        assert read(client, path) == Read("HIT", [])
    carol = create(client, "carol", "carol@example.org")
    for path in queries:
        assert read(client, path) == Read("HIT", [carol])


def test_cached_404_by_id_is_gone_once_the_id_exists(client: FlaskClient) -> None:
    assert read(client, "/users/1") == Read("MISS", None, 404)
    assert read(client, "/users/1") == Read("HIT", None, 404)
    user = create(client)
    assert read(client, "/users/1") == Read("HIT", user)


def test_stale_index_entry_is_a_miss(
        app: Flask, client: FlaskClient, redis_up: RedisServer) -> None:
    alice = create(client, "alice", "alice@example.org")
    bob = create(client, "bob", "bob@example.org")
    redis_up.client().set(keys(app).of(Lookup("username", "alice")), str(bob["id"]))
    assert read(client, "/users?username=alice") == Read("MISS", [alice])


def ttls(app: Flask, redis_up: RedisServer) -> dict[str, float]:
    """The TTL of every key but the epoch and timeline keys, which never expire (only an
    eviction takes them: which begins a new epoch, or leaves each worker's pool what it
    knows of the timeline until the next write records it again)."""
    client = redis_up.client()
    return {key.decode(): client.pttl(key) / 1000 for key in client.scan_iter()
            if key.decode() not in (keys(app).epoch, keys(app).timeline)}


def test_the_epoch_and_timeline_keys_alone_never_expire(
        app: Flask, client: FlaskClient, redis_up: RedisServer) -> None:
    create(client)
    assert redis_up.client().pttl(keys(app).epoch) == -1
    assert redis_up.client().pttl(keys(app).timeline) == -1


def test_every_key_has_a_jittered_ttl(
        app: Flask, client: FlaskClient, redis_up: RedisServer) -> None:
    for n in range(20):
        create(client, f"user{n}", f"user{n}@example.org")
    client.get("/users?username=ghost")
    client.get("/users/999")
    send_fills(client)
    found = ttls(app, redis_up)
    assert found and all(ttl > 0 for ttl in found.values()), found
    positive = [t for k, t in found.items() if "ghost" not in k and not k.endswith(":999")]
    negative = [t for k, t in found.items() if "ghost" in k or k.endswith(":999")]
    assert all(300 * 0.9 - 2 <= ttl <= 300 * 1.1 for ttl in positive)
    assert len({round(ttl) for ttl in positive}) > 5, "TTLs should be jittered"
    assert len(negative) == 2 and all(0 < ttl <= 60 for ttl in negative)


def test_ttls_are_configurable(database_url: str, redis_up: RedisServer,
                               new_app: Callable[[Settings], Flask]) -> None:
    app = new_app(settings_for(database_url, redis_up.url, cache={"ttl": 20, "negative_ttl": 5}))
    client = app.test_client()
    create(client, "tina", "tina@example.org")
    client.get("/users?username=nobody")
    send_fills(client)
    found = ttls(app, redis_up)
    assert all(18 - 1 <= ttl <= 22 for key, ttl in found.items() if "nobody" not in key)
    assert 0 < found[keys(app).of(Lookup("username", "nobody"))] <= 5


def test_failed_write_changes_neither_postgres_nor_redis(
        client: FlaskClient, redis_up: RedisServer) -> None:
    alice = create(client, "alice", "alice@example.org")
    bob = create(client, "bob", "bob@example.org")
    client.get("/users?username=carol")
    send_fills(client)
    snapshot = {key: redis_up.client().get(key) for key in redis_up.client().scan_iter()}
    assert client.patch(f"/users/{bob['id']}", json={"email": "ALICE@example.org"}).status_code \
        == 409
    assert client.post("/users", json={"username": "carol", "email": "bob@example.org"}) \
        .status_code == 409
    after = {key: redis_up.client().get(key) for key in redis_up.client().scan_iter()}
    assert after == snapshot
    assert read(client, f"/users/{bob['id']}").data == bob
    assert read(client, "/users?username=carol").data == []
    assert read(client, f"/users/{alice['id']}").data == alice


@pytest.fixture
def stopped_redis(redis_up: RedisServer):
    yield redis_up
    if redis_up.process is None:
        redis_up.start()


def test_redis_stopped_mid_run_every_answer_still_right(
        client: FlaskClient, stopped_redis: RedisServer) -> None:
    user = create(client)
    stopped_redis.stop()
    for path, data in lookups(user):
        assert read(client, path) == Read("BYPASS", data), path
    assert client.get("/readyz").get_json() == {"database": "ok", "cache": "degraded",
                                                "stream": "absent"}
    assert client.get("/readyz").status_code == 200
    # writes keep working and are acknowledged while Redis is gone
    changed = client.patch(f"/users/{user['id']}", json={"display_name": "during outage"})
    assert changed.status_code == 200
    bob = create(client, "bob", "bob@example.org")
    assert read(client, "/users?username=bob") == Read("BYPASS", [bob])


def test_redis_back_with_old_data_never_serves_it(
        client: FlaskClient, stopped_redis: RedisServer) -> None:
    user = create(client)
    assert read(client, f"/users/{user['id']}").cache == "HIT"
    stopped_redis.stop()  # the append-only file keeps the old row
    new = client.patch(f"/users/{user['id']}", json={"username": "renamed"}).get_json()["data"]
    stopped_redis.start()
    time.sleep(0.3)  # past the breaker's cool-down
    assert read(client, f"/users/{user['id']}").data == new
    assert read(client, f"/users?username={user['username']}").data == []
    deadline = time.monotonic() + 5
    while read(client, f"/users/{user['id']}").cache != "HIT":
        assert time.monotonic() < deadline, "no cache hits within 5 s of Redis coming back"
        time.sleep(0.1)


def test_slow_redis_costs_at_most_the_timeout(client: FlaskClient, redis_up: RedisServer) -> None:
    user = create(client)
    blocker = threading.Thread(target=lambda: redis_up.client().execute_command("DEBUG", "SLEEP",
                                                                                 "2"))
    blocker.start()
    time.sleep(0.1)
    try:
        started = time.monotonic()
        for _ in range(10):
            assert read(client, f"/users/{user['id']}") == Read("BYPASS", user)
        elapsed = time.monotonic() - started
    finally:
        blocker.join()
    # one 100 ms timeout, then the breaker skips Redis; far below 10 timeouts or the 2 s stall
    assert elapsed < 0.9, elapsed


def test_flushed_redis_refills(client: FlaskClient, redis_up: RedisServer) -> None:
    users = [create(client, f"user{n}", f"user{n}@example.org") for n in range(3)]
    redis_up.client().flushall()
    for user in users:
        assert read(client, f"/users/{user['id']}") == Read("MISS", user)
        assert read(client, f"/users/{user['id']}") == Read("HIT", user)


def test_app_starts_without_redis_and_uses_it_once_it_appears(
        database_url: str, stopped_redis: RedisServer,
        new_app: Callable[[Settings], Flask]) -> None:
    stopped_redis.stop()
    app = new_app(settings_for(database_url, stopped_redis.url))
    client = app.test_client()
    user = create(client)
    assert read(client, f"/users/{user['id']}") == Read("BYPASS", user)
    stopped_redis.start()
    stopped_redis.client().flushall()
    time.sleep(0.3)
    assert read(client, f"/users/{user['id']}") == Read("MISS", user)
    assert read(client, f"/users/{user['id']}") == Read("HIT", user)


def test_a_recreated_database_never_reads_its_predecessors_entries(
        app: Flask, client: FlaskClient, database_url: str, owner_url: str,
        redis_up: RedisServer, new_app: Callable[[Settings], Flask]) -> None:
    old = create(client, "alice", "alice@example.org")
    client.patch(f"/users/{old['id']}", json={"display_name": "version 2"})
    empty_database(owner_url)  # ids and versions start over; Redis keeps its entries
    fresh = new_app(settings_for(database_url, redis_up.url)).test_client()
    bob = create(fresh, "bob", "bob@example.org")
    assert bob["id"] == old["id"]
    assert read(fresh, f"/users/{bob['id']}").data == bob
    assert read(fresh, "/users?username=alice").data == []
