"""A Redis with bounded memory (the stack's `allkeys-lru`) may evict any key at any moment:
leases, tombstones, pointers (username:/email:) and "nobody" entries alike. Each test evicts
one kind at the moment a race makes it matter (as the admin, deleting it as an eviction
would) and checks that no stale answer follows; test_races.py also runs its races with the
reader's lease, the pointers of a rename and a tombstone evicted. The near cache is off
here, so that every read asks Redis. Eviction throughout a whole concurrent run is in
test_consistency.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from flask import Flask
from flask.testing import FlaskClient

from service.cache.keys import Lookup
from service.postgres import statements
from service.web.routes import users_of

from .helpers import (
    Read,
    app_for,
    create,
    evicted,
    finish,
    keys,
    late_update,
    parked_reader,
    read,
)
from .servers import RedisServer


@pytest.fixture
def app(database_url: str, owner_url: str, redis_up: RedisServer) -> Iterator[Flask]:
    yield from app_for(database_url, owner_url, redis_up.url, cache={"near_size": 0})


def test_a_writers_evicted_lease_taken_by_a_reader_cannot_fill_the_old_row(
        app: Flask, client: FlaskClient, redis_up: RedisServer) -> None:
    user = create(client)
    users = users_of(app)
    key = keys(app).user(user["id"])
    token = users.cache.lease_for_write(user["id"])  # the writer, before its transaction
    evicted(redis_up, keys(app).lease(key), key)
    thread, release, result = parked_reader(app, f"/users/{user['id']}")  # takes the lease
    change = statements.update_user(users.database, user["id"], {"display_name": "new"})  # commits
    users.cache.updated(change, token)  # its lease is gone: it deletes instead of writing
    finish(thread, release)  # the reader's lease went with it: its old row is refused
    assert result[0].data == user
    assert read(client, f"/users/{user['id']}").data["display_name"] == "new"


def test_an_evicted_tombstone_lets_no_older_write_through_back_in(
        app: Flask, client: FlaskClient, redis_up: RedisServer) -> None:
    user = create(client)
    older = late_update(app, user["id"], {"display_name": "older"})  # committed, not yet cached
    assert client.delete(f"/users/{user['id']}").status_code == 204  # leaves a tombstone
    evicted(redis_up, keys(app).user(user["id"]))
    older()
    assert read(client, f"/users/{user['id']}").status == 404


@pytest.mark.parametrize(("path", "lookup"), [("/users?username=dave", ("username", "dave")),
                                              ("/users/1", ("id", 1))])  # ids start at 1
def test_an_evicted_nobody_entry_hides_no_user_created_after_it(
        app: Flask, client: FlaskClient, redis_up: RedisServer, path: str,
        lookup: tuple[str, str | int]) -> None:
    read(client, path)
    assert read(client, path).cache == "HIT"  # "nobody", cached
    nobody = keys(app).of(Lookup.of(*lookup))
    evicted(redis_up, nobody)
    thread, release, _ = parked_reader(app, path)  # a miss: it finds nobody in Postgres
    evicted(redis_up, keys(app).lease(nobody))
    dave = create(client, "dave", "dave@example.org")
    finish(thread, release)
    assert read(client, path) == Read("HIT", [dave] if "?" in path else dave)
