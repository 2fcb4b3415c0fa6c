"""The cache-aside races, forced to happen in the worst order, must not leave stale data.

A reader is parked between its database read and its cache fill (helpers.parked_reader);
the tests park it there while a writer commits, then let it fill. Some run again with a
key evicted at the worst moment, as a Redis out of memory may do (test_eviction.py has more).
"""

from __future__ import annotations

import pytest
from flask import Flask
from flask.testing import FlaskClient

from service.cache.keys import Lookup

from .helpers import Read, create, evicted, finish, keys, late_update, parked_reader, read
from .servers import RedisServer


@pytest.mark.parametrize("lease", ["kept", "evicted"])
def test_reader_cannot_fill_a_row_older_than_an_acknowledged_update(
        app: Flask, client: FlaskClient, redis_up: RedisServer, lease: str) -> None:
    user = create(client)
    redis_up.client().flushall()
    thread, release, result = parked_reader(app, f"/users/{user['id']}")
    if lease == "evicted":
        evicted(redis_up, keys(app).lease(keys(app).user(user["id"])))
    new = client.patch(f"/users/{user['id']}", json={"display_name": "new"}).get_json()["data"]
    finish(thread, release)
    assert result[0].data == user  # the reader started first: old data is a fair answer for it
    assert read(client, f"/users/{user['id']}").data == new


@pytest.mark.parametrize("pointers", ["kept", "evicted"])
def test_reader_by_username_cannot_undo_a_rename(
        app: Flask, client: FlaskClient, redis_up: RedisServer, pointers: str) -> None:
    user = create(client, "olga", "olga@example.org")
    redis_up.client().flushall()
    thread, release, _ = parked_reader(app, "/users?username=olga")
    new = client.patch(f"/users/{user['id']}", json={"username": "olivia"}).get_json()["data"]
    if pointers == "evicted":  # the new one, and the row it points at
        evicted(redis_up, keys(app).of(Lookup.of("username", "olivia")), keys(app).user(user["id"]))
    finish(thread, release)
    assert read(client, "/users?username=olga").data == []
    assert read(client, "/users?username=olivia").data == [new]
    assert read(client, f"/users/{user['id']}").data == new


def test_reader_cannot_cache_not_found_over_a_create(app: Flask, client: FlaskClient) -> None:
    thread, release, result = parked_reader(app, "/users?email=dave@example.org")
    dave = create(client, "dave", "dave@example.org")
    finish(thread, release)
    assert result[0].data == []
    assert read(client, "/users?email=dave@example.org") == Read("HIT", [dave])


@pytest.mark.parametrize("tombstone", ["kept", "evicted"])
def test_reader_cannot_bring_back_a_deleted_user(
        app: Flask, client: FlaskClient, redis_up: RedisServer, tombstone: str) -> None:
    user = create(client)
    redis_up.client().flushall()
    thread, release, _ = parked_reader(app, f"/users/{user['id']}")
    assert client.delete(f"/users/{user['id']}").status_code == 204
    if tombstone == "evicted":
        evicted(redis_up, keys(app).user(user["id"]))
    finish(thread, release)
    assert read(client, f"/users/{user['id']}").status == 404


def test_fill_after_flushall_is_refused(
        app: Flask, client: FlaskClient, redis_up: RedisServer) -> None:
    user = create(client)
    redis_up.client().flushall()
    thread, release, _ = parked_reader(app, f"/users/{user['id']}")
    new = client.patch(f"/users/{user['id']}", json={"display_name": "new"}).get_json()["data"]
    redis_up.client().flushall()  # takes the writer's update and the reader's lease with it
    finish(thread, release)
    assert read(client, f"/users/{user['id']}").data == new


def test_older_writer_cannot_overwrite_a_newer_one(app: Flask, client: FlaskClient) -> None:
    user = create(client, "wanda", "wanda@example.org")
    first = late_update(app, user["id"], {"username": "wendy"})
    second = client.patch(f"/users/{user['id']}", json={"username": "willa"}).get_json()["data"]
    first()
    assert read(client, f"/users/{user['id']}").data == second
    for name, expected in (("wanda", []), ("wendy", []), ("willa", [second])):
        assert read(client, f"/users?username={name}").data == expected, name


def test_older_writer_after_a_flush_cannot_restore_its_row(
        app: Flask, client: FlaskClient, redis_up: RedisServer) -> None:
    user = create(client)
    first = late_update(app, user["id"], {"display_name": "first"})
    second = client.patch(f"/users/{user['id']}",
                          json={"display_name": "second"}).get_json()["data"]
    redis_up.client().flushall()
    first()
    assert redis_up.client().get(keys(app).user(user["id"])) is None
    assert read(client, f"/users/{user['id']}").data == second
