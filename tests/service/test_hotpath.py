"""The hot routes answered in front of Flask (service/web/hotpath.py): the same bytes Flask
sends, for answers and errors alike, and every request they cannot take reaches Flask.
With API tokens, both doors refuse alike a request without a valid one."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterator

import pytest
from flask import Flask, request
from prometheus_client import REGISTRY

from service.process.factory import create_app
from service.web.routes import users_of

from .helpers import (
    ApiTokens,
    Sent,
    after_each_load,
    call,
    create,
    empty_database,
    environ,
    flask_alone,
    settings_for,
    via_proxy,
)
from .servers import RedisServer, TcpProxy, wait_until


def calls_to(app: Flask) -> list[str]:
    """The paths of the requests that reach Flask's routing, from now on."""
    calls: list[str] = []
    app.before_request(lambda: calls.append(request.full_path.rstrip("?")))
    return calls


@pytest.fixture
def flask_calls(app: Flask) -> list[str]:
    return calls_to(app)


@pytest.fixture
def guarded_calls(guarded_app: Flask) -> list[str]:
    return calls_to(guarded_app)


def nothing() -> None:
    pass


def both_ways(app: Flask, path: str, method: str = "GET", before: Callable[[], object] = nothing,
              **options: object) -> tuple[Sent, Sent]:
    """The same request through the app (hot path first) and through Flask alone, each after
    `before()`."""
    before()
    hot = call(app.wsgi_app, environ(path, method, **options))
    before()
    return hot, call(flask_alone(app), environ(path, method, **options))


def held_user(app: Flask) -> dict:
    """A user this process now holds in its near cache."""
    user = create(app.test_client())
    assert app.test_client().get(f"/users/{user['id']}").headers["X-Cache"] == "HIT"
    return user


def test_reads_by_id_are_answered_without_flask_with_the_bytes_flask_sends(
        app: Flask, redis_up: RedisServer, flask_calls: list[str]) -> None:
    user = held_user(app)
    client = app.test_client()
    deleted = create(client, "bob", "bob@example.org")["id"]
    assert client.delete(f"/users/{deleted}").status_code == 204
    near = users_of(app).cache.near

    def flush() -> None:
        """FLUSHALL, then wait until the near cache heard of it: Redis writes a flush's news
        to the listeners after the flusher's reply (a write's, it writes before)."""
        generation = near.generation
        redis_up.client().flushall()
        wait_until(lambda: near.get("0") is None and near.generation != generation, 1,
                   "the near cache to hear of the flush")

    cases = [  # (path, what to do before each way, expected status and X-Cache)
        (f"/users/{user['id']}", nothing, "200 OK", "HIT"),  # near cache
        (f"/users/00{user['id']}", nothing, "200 OK", "HIT"),  # the same id, written otherwise
        (f"/users/{deleted}", nothing, "404 NOT FOUND", "HIT"),  # its tombstone
        (f"/users/{user['id']}", flush, "200 OK", "MISS"),
        (f"/users/{user['id'] + 100}", flush, "404 NOT FOUND", "MISS"),  # nobody
    ]
    for path, before, status, cache_status in cases:
        flask_calls.clear()
        hot, flask = both_ways(app, path, before=before)
        assert flask_calls == [path], path  # only the Flask-alone request reached Flask
        assert hot == flask, path
        assert hot.status == status and ("X-Cache", cache_status) in hot.headers, path


def test_creates_are_answered_without_flask_as_flask_answers_them(
        app: Flask, flask_calls: list[str]) -> None:
    hot = call(app.wsgi_app, environ("/users", "POST",
                                     json={"username": "alice", "email": "a@example.org"}))
    assert flask_calls == []
    flask = call(flask_alone(app), environ("/users", "POST",
                                          json={"username": "bob", "email": "b@example.org"}))
    assert flask_calls == ["/users"]

    def shape(answer: Sent) -> tuple:
        status, headers, body = answer
        document = json.loads(body)
        user_id = document["data"]["id"]
        return (status, [(name, value.replace(str(user_id), "<id>")) for name, value in headers
                         if name != "Content-Length"],
                document["message"], document["source"], sorted(document["data"]))

    assert shape(hot) == shape(flask)
    created = json.loads(hot.body)["data"]
    assert hot.status == "201 CREATED" and ("Location", f"/users/{created['id']}") in hot.headers
    assert app.test_client().get(f"/users/{created['id']}").get_json()["data"] == created


@pytest.mark.parametrize("body", [
    b"{", b"[]", b'{"username": "carol"}', b'{"username": "x", "email": "c@example.org"}',
    b'{"username": "carol", "email": "c@example.org", "age": 3}',
    b'{"username": "alice", "email": "new@example.org"}',  # taken: 409
])
def test_create_errors_are_flasks_errors(app: Flask, flask_calls: list[str], body: bytes) -> None:
    create(app.test_client(), "alice", "a@example.org")
    flask_calls.clear()
    hot, flask = both_ways(app, "/users", "POST", data=body, content_type="application/json")
    assert flask_calls == ["/users"]  # only the Flask-alone request was routed by Flask
    assert hot == flask
    assert hot.status[:3] in {"400", "409"} and json.loads(hot.body)["error"]["code"]


def test_a_body_shorter_than_its_content_length_is_flasks_400(app: Flask) -> None:
    def short_body() -> dict:
        env = environ("/users", "POST", data=b'{"username": "alice"}',
                      content_type="application/json")
        env["CONTENT_LENGTH"], env["wsgi.input"] = "100", io.BytesIO(b'{"username"')
        return env

    hot = call(app.wsgi_app, short_body())
    assert hot == call(flask_alone(app), short_body())
    assert hot.status == "400 BAD REQUEST"


def test_requests_the_hot_path_cannot_take_whole_reach_flask(
        app: Flask, flask_calls: list[str]) -> None:
    user = held_user(app)
    big = json.dumps({"username": "dave", "email": "d@example.org",
                      "display_name": "x" * 70_000}).encode()
    requests = [  # (path, method, request options, expected status)
        ("/users/0", "GET", {}, 400),
        ("/users/abc", "GET", {}, 400),
        ("/users/99999999999999999999", "GET", {}, 400),
        (f"/users/{user['id']}/", "GET", {}, 404),
        (f"/users/{user['id']}/x", "GET", {}, 404),
        (f"/users/{user['id']}", "HEAD", {}, 200),
        (f"/users?id={user['id']}", "GET", {}, 200),
        ("/users", "POST", {"data": b"{}", "content_type": "text/plain"}, 415),
        ("/users", "POST", {"data": big, "content_type": "application/json"}, 413),
        ("/users", "POST", {"json": {"username": "erin", "email": "e@example.org"},
                            "content_type": "application/merge-patch+json"}, 201),
        ("/users/", "POST", {"json": {}}, 404),
        (f"/users/{user['id']}", "PATCH", {"json": {"display_name": "A"}}, 200),
    ]
    for path, method, options, status in requests:
        flask_calls.clear()
        answer = call(app.wsgi_app, environ(path, method, **options))
        assert answer.status[:3] == str(status), (method, path, answer)
        assert flask_calls == [path], (method, path)


def test_a_body_of_unknown_length_reaches_flask(app: Flask, flask_calls: list[str]) -> None:
    env = environ("/users", "POST", json={"username": "frank", "email": "f@example.org"})
    del env["CONTENT_LENGTH"]
    call(app.wsgi_app, env)
    assert flask_calls == ["/users"]


@pytest.fixture
def postgres_proxy(database_url: str, owner_url: str,
                   redis_up: RedisServer) -> Iterator[tuple[Flask, TcpProxy]]:
    """An app whose Postgres can be cut off."""
    empty_database(owner_url)
    proxy = TcpProxy(5432)
    app = create_app(settings_for(via_proxy(database_url, proxy.port), redis_up.url))
    yield app, proxy
    users_of(app).close()
    proxy.close()


def test_postgres_down_is_flasks_503_on_the_hot_routes(
        postgres_proxy: tuple[Flask, TcpProxy], redis_up: RedisServer) -> None:
    app, proxy = postgres_proxy
    user = create(app.test_client())
    proxy.cut()
    for path, method, options in [
        (f"/users/{user['id'] + 1}", "GET", {}),
        ("/users", "POST", {"json": {"username": "grace", "email": "g@example.org"}}),
    ]:
        hot, flask = both_ways(app, path, method, before=redis_up.client().flushall, **options)
        assert hot == flask
        assert hot.status == "503 SERVICE UNAVAILABLE" and ("Retry-After", "1") in hot.headers


def test_an_unexpected_error_is_a_500_with_a_json_body_and_its_traceback_only_logged(
        app: Flask, redis_up: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    """On either door, the hot path's and Flask's: the client learns that it failed, and
    nothing of why."""
    user = create(app.test_client())

    def fail() -> None:
        raise RuntimeError("boom between the read and the fill")

    after_each_load(app, fail)
    expected = b'{"error": {"code": "internal_error", "message": "an unexpected error occurred"}}'
    for path in (f"/users/{user['id'] + 1}", f"/users?id={user['id'] + 1}"):
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            # each way afresh: the lease a failed read left would make the next one wait it out
            hot, flask = both_ways(app, path, before=redis_up.client().flushall)
        assert hot == flask, path
        assert hot == Sent("500 INTERNAL SERVER ERROR", [
            ("Content-Length", str(len(expected))), ("Content-Type", "application/json")],
            expected), path
        assert "boom between the read and the fill" in caplog.text  # with its traceback
        assert "Traceback" in caplog.text


def test_hot_requests_are_counted_like_any_other(app: Flask) -> None:
    user = held_user(app)

    def counted() -> tuple[float, float]:
        return (REGISTRY.get_sample_value("cache_hits_total"),
                REGISTRY.get_sample_value("http_request_duration_seconds_count",
                                          {"method": "GET", "status": "200"}))

    hits, requests = counted()
    for _ in range(3):
        app.test_client().get(f"/users/{user['id']}")
    assert counted() == (hits + 3, requests + 3)


# With API_TOKENS_FILE, one check in front of both doors (service/web/auth.py): every /users
# route and method, whichever door would have answered, is refused alike without a token.
USERS_ROUTES = [  # (method, path, request options)
    ("GET", "/users/1", {}),  # the hot path's
    ("POST", "/users", {"json": {"username": "mallory", "email": "m@example.org"}}),  # hot too
    ("GET", "/users?username=mallory", {}),
    ("PATCH", "/users/1", {"json": {"display_name": "x"}}),
    ("DELETE", "/users/1", {}),
    ("HEAD", "/users/1", {}),
    ("PUT", "/users/1", {}),  # a method no route has
    ("GET", "/users/abc", {}),  # an id no route takes
    ("POST", "/users/", {"json": {}}),
]
MISSING = ('Bearer realm="cachestack"', "missing_token")
INVALID = ('Bearer realm="cachestack", error="invalid_token"', "invalid_token")
# (Authorization header or None, the challenge and error code expected): one of each kind;
# every kind of bad credential is judged in tests/unit/test_auth.py.
BAD_CREDENTIALS = [
    (None, MISSING),
    ("Bearer first-token.A1b2C3d4E5f6G7h", INVALID),  # all but the last character
]


def counters() -> tuple[float | None, ...]:
    return tuple(REGISTRY.get_sample_value(name) for name in (
        "db_queries_total", "cache_hits_total", "cache_misses_total", "cache_bypasses_total"))


@pytest.mark.parametrize(("authorization", "expected"), BAD_CREDENTIALS)
def test_every_users_route_refuses_a_missing_or_bad_token_alike_on_both_doors(
        guarded_app: Flask, guarded_calls: list[str], authorization: str | None,
        expected: tuple[str, str]) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    before = counters()
    answers = [call(guarded_app.wsgi_app, environ(path, method, headers=headers, **options))
               for method, path, options in USERS_ROUTES]
    assert all(answer == answers[0] for answer in answers), answers
    status, response_headers, body = answers[0]
    challenge, code = expected
    assert status == "401 UNAUTHORIZED"
    assert ("WWW-Authenticate", challenge) in response_headers
    assert ("Content-Type", "application/json") in response_headers
    error = json.loads(body)["error"]
    assert error["code"] == code and error["message"]
    echoed = body + repr(response_headers).encode()
    assert not [word for word in (authorization or "").split()
                if word not in ("Bearer", "Basic") and word.encode() in echoed]
    assert guarded_calls == [] and counters() == before  # neither door was reached


@pytest.mark.parametrize("which", [0, 1])
def test_with_either_token_both_doors_answer_as_without_tokens(
        guarded_app: Flask, guarded_calls: list[str], api_tokens: ApiTokens,
        redis_up: RedisServer, which: int) -> None:
    client = guarded_app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = api_tokens.header(which)["Authorization"]
    user = create(client)
    assert guarded_calls == []  # the hot path took the create
    for path, before, status in [(f"/users/{user['id']}", nothing, "200 OK"),
                                 (f"/users/{user['id'] + 9}", redis_up.client().flushall,
                                  "404 NOT FOUND")]:
        guarded_calls.clear()
        hot, flask = both_ways(guarded_app, path, before=before, headers=api_tokens.header(which))
        assert guarded_calls == [path]  # only the Flask-alone request reached Flask
        assert hot == flask and hot.status == status, path
    changed = client.patch(f"/users/{user['id']}", json={"display_name": "Z"})
    assert changed.status_code == 200 and client.delete(f"/users/{user['id']}").status_code == 204


def test_the_routes_outside_users_stay_open(guarded_app: Flask) -> None:
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        assert call(guarded_app.wsgi_app, environ(path)).status == "200 OK", path
