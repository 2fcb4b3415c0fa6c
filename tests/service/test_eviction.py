"""A Redis with bounded memory (the stack's `allkeys-lru`) may evict any key at any moment:
leases, tombstones, pointers (username:/email:) and "nobody" entries alike. Each test evicts
one kind at the moment a race makes it matter (as the admin, deleting it as an eviction
would) and checks that no stale answer follows. The near cache is off here, so that every
read asks Redis. Eviction throughout a whole concurrent run is in test_consistency.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from flask import Flask
from flask.testing import FlaskClient

from service import db
from service.cache import Lookup

from .conftest import app_for
from .servers import RedisServer
from .test_api import create
from .test_cache import keys, read
from .test_races import finish, late_update, parked_reader


@pytest.fixture
def app(database_url: str, owner_url: str, redis_up: RedisServer) -> Iterator[Flask]:
    yield from app_for(database_url, owner_url, redis_up.url, near_cache_size=0)


def evict(redis_up: RedisServer, *names: str) -> None:
    assert redis_up.client().delete(*names) >= 1, names


def test_a_writers_evicted_lease_taken_by_a_reader_cannot_fill_the_old_row(
        app: Flask, client: FlaskClient, redis_up: RedisServer) -> None:
    user = create(client)
    users = app.extensions["cachestack.users"]
    key = keys(app).user(user["id"])
    token = users.cache.lease_for_write(user["id"])  # the writer, before its transaction
    evict(redis_up, keys(app).lease(key), key)
    thread, release, result = parked_reader(app, f"/users/{user['id']}")  # takes the lease
    change = db.update_user(users.database, user["id"], {"display_name": "new"})  # commits
    users.cache.updated(change, token)  # its lease is gone: it deletes instead of writing
    finish(thread, release)  # the reader's lease went with it: its old row is refused
    assert result[0][1] == user
    assert read(client, f"/users/{user['id']}")[1]["display_name"] == "new"


def test_a_readers_evicted_lease_leaves_it_nothing_to_fill(
        app: Flask, client: FlaskClient, redis_up: RedisServer) -> None:
    user = create(client)
    redis_up.client().flushall()
    thread, release, _ = parked_reader(app, f"/users/{user['id']}")
    evict(redis_up, keys(app).lease(keys(app).user(user["id"])))
    new = client.patch(f"/users/{user['id']}", json={"display_name": "new"}).get_json()["data"]
    finish(thread, release)
    assert read(client, f"/users/{user['id']}")[1] == new


def test_an_evicted_tombstone_lets_no_older_write_through_back_in(
        app: Flask, client: FlaskClient, redis_up: RedisServer) -> None:
    user = create(client)
    older = late_update(app, user["id"], {"display_name": "older"})  # committed, not yet cached
    assert client.delete(f"/users/{user['id']}").status_code == 204  # leaves a tombstone
    evict(redis_up, keys(app).user(user["id"]))
    older()
    assert read(client, f"/users/{user['id']}")[2] == 404


def test_an_evicted_tombstone_lets_no_parked_reader_bring_a_user_back(
        app: Flask, client: FlaskClient, redis_up: RedisServer) -> None:
    user = create(client)
    redis_up.client().flushall()
    thread, release, _ = parked_reader(app, f"/users/{user['id']}")
    assert client.delete(f"/users/{user['id']}").status_code == 204
    evict(redis_up, keys(app).user(user["id"]))
    finish(thread, release)
    assert read(client, f"/users/{user['id']}")[2] == 404


def test_evicted_pointers_let_no_parked_reader_undo_a_rename(
        app: Flask, client: FlaskClient, redis_up: RedisServer) -> None:
    user = create(client, "olga", "olga@example.org")
    redis_up.client().flushall()
    thread, release, _ = parked_reader(app, "/users?username=olga")
    new = client.patch(f"/users/{user['id']}", json={"username": "olivia"}).get_json()["data"]
    evict(redis_up, keys(app).of(Lookup.of("username", "olivia")), keys(app).user(user["id"]))
    finish(thread, release)
    assert read(client, "/users?username=olga")[1] == []
    assert read(client, "/users?username=olivia")[1] == [new]
    assert read(client, "/users?email=olga@example.org")[1] == [new]


@pytest.mark.parametrize(("path", "lookup"), [("/users?username=dave", ("username", "dave")),
                                              ("/users/1", ("id", 1))])  # ids start at 1
def test_an_evicted_nobody_entry_hides_no_user_created_after_it(
        app: Flask, client: FlaskClient, redis_up: RedisServer, path: str,
        lookup: tuple[str, str | int]) -> None:
    read(client, path)
    assert read(client, path)[0] == "HIT"  # "nobody", cached
    nobody = keys(app).of(Lookup.of(*lookup))
    evict(redis_up, nobody)
    thread, release, _ = parked_reader(app, path)  # a miss: it finds nobody in Postgres
    evict(redis_up, keys(app).lease(nobody))
    dave = create(client, "dave", "dave@example.org")
    finish(thread, release)
    assert read(client, path)[:2] in (("HIT", [dave]), ("HIT", dave))
