"""Near-cache hits answered in front of Flask (service/hotpath.py): the same bytes Flask
would send, counted like any hit, and every other request still reaches Flask."""

from __future__ import annotations

import pytest
from flask import Flask, request
from prometheus_client import REGISTRY

from service.app import create_app

from .conftest import empty_database, settings_for
from .servers import RedisServer
from .test_api import create


@pytest.fixture
def flask_calls(app: Flask) -> list[str]:
    """The paths of the requests that reached Flask."""
    calls: list[str] = []
    app.before_request(lambda: calls.append(request_path()))
    return calls


def request_path() -> str:
    return request.full_path.rstrip("?")


def flask_answer(app: Flask, path: str, method: str = "GET") -> tuple[int, list, bytes]:
    with app.test_request_context(path, method=method):
        response = app.full_dispatch_request()
        return response.status_code, sorted(response.headers), response.get_data()


def answer(app: Flask, path: str, method: str = "GET") -> tuple[int, list, bytes]:
    response = app.test_client().open(path, method=method)
    return response.status_code, sorted(response.headers), response.get_data()


def held_user(app: Flask) -> dict:
    """A user this process now holds in its near cache."""
    user = create(app.test_client())
    assert app.test_client().get(f"/users/{user['id']}").headers["X-Cache"] == "HIT"
    return user


def test_a_held_user_is_answered_without_flask_with_the_bytes_flask_sends(
        app: Flask, flask_calls: list[str]) -> None:
    user = held_user(app)
    path = f"/users/{user['id']}"
    flask_calls.clear()
    hot = answer(app, path)
    assert flask_calls == []
    assert hot == flask_answer(app, path)
    assert hot[0] == 200 and ("X-Cache", "HIT") in hot[1]
    assert answer(app, f"/users/00{user['id']}") == hot  # the same id, written differently


def test_every_other_request_reaches_flask(app: Flask, flask_calls: list[str]) -> None:
    user = held_user(app)
    client = app.test_client()
    assert client.delete(f"/users/{create(client, 'bob', 'bob@example.org')['id']}"
                         ).status_code == 204
    others = {
        f"/users/{user['id'] + 100}": 404,  # nobody
        f"/users/{user['id'] + 1}": 404,  # deleted, and its tombstone held
        "/users/0": 400,
        "/users/abc": 400,
        "/users/99999999999999999999": 400,
        f"/users/{user['id']}/": 404,
        f"/users?id={user['id']}": 200,
    }
    for path, status in others.items():
        flask_calls.clear()
        assert answer(app, path)[0] == status, path
        assert flask_calls == [path], path
    flask_calls.clear()
    assert answer(app, f"/users/{user['id']}", "HEAD")[0] == 200
    assert flask_calls == [f"/users/{user['id']}"]


def test_hot_hits_are_counted_like_any_other(app: Flask) -> None:
    user = held_user(app)

    def counted() -> tuple[float, float]:
        return (REGISTRY.get_sample_value("cache_hits_total"),
                REGISTRY.get_sample_value("http_request_duration_seconds_count",
                                          {"method": "GET", "status": "200"}))

    hits, requests = counted()
    for _ in range(3):
        app.test_client().get(f"/users/{user['id']}")
    assert counted() == (hits + 3, requests + 3)


def test_without_a_near_cache_flask_answers_everything(
        database_url: str, redis_up: RedisServer) -> None:
    empty_database(database_url)
    app = create_app(settings_for(database_url, redis_up.url, near_cache_size=0))
    calls: list[str] = []
    app.before_request(lambda: calls.append(request_path()))
    user = create(app.test_client())
    for _ in range(3):
        assert app.test_client().get(f"/users/{user['id']}").headers["X-Cache"] == "HIT"
    assert len(calls) == 4
    app.extensions["cachestack.users"].database.close()
