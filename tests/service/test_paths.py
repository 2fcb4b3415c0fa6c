"""Every spelling of a path is judged as written (service/auth.py, service/app.py): without a
token only the exact probe and scraper paths are open, and a route is reached only by its
exact spelling, so `//users`, a dot segment, a percent-encoded slash or a trailing slash
can neither skip the token check nor reach a route by another name. Through both doors
(the hot path and Flask) in this process, and through the real multi-worker server, whose
PATH_INFO is what granian makes of the request target."""

from __future__ import annotations

import http.client
import json
from urllib.parse import unquote

import pytest
from flask import Flask

from .helpers import ApiTokens, call, create, environ, flask_alone, query
from .servers import ServiceProcess

# The guarded routes spelled otherwise than as written, as a client sends them; {id} is a
# user's. granian percent-decodes the target into PATH_INFO (so `/%2Fusers` arrives as
# `//users`) and keeps dot segments and doubled slashes as sent.
COLLECTION = ["//users", "/./users", "/users/../users", "/%2Fusers", "/USERS", "/users/",
              "/users/%2e%2e/users", "/%2e/users", "/users/."]
ITEM = ["///users/{id}", "//users/{id}", "/users//{id}", "/./users/{id}", "/users/{id}/",
        "/users/../users/{id}", "/%2Fusers/{id}", "/USERS/{id}", "/users/{id}%2F",
        "/users/{id}/.", "/users/x/../{id}"]
SPELLINGS = COLLECTION + ITEM
METHODS = ["GET", "POST", "PATCH", "DELETE", "PUT", "HEAD"]
# What each method sends: a create, a change, a lookup.
CREATE = {"username": "mallory", "email": "mallory@example.org"}
CHANGE = {"display_name": "pwned"}
OPEN = ["/healthz", "/readyz", "/metrics", "/openapi.json"]
# The open paths spelled otherwise: not open.
NOT_OPEN = ["//healthz", "/healthz/", "/HEALTHZ", "/./metrics", "/%2Fmetrics", "/metrics/.",
            "/openapi.json/", "/healthz%00", "/nowhere", "/", "/users/1/../../healthz"]


def body_for(method: str) -> dict | None:
    return {"POST": CREATE, "PATCH": CHANGE, "PUT": CHANGE}.get(method)


def target(spelling: str, user_id: int, method: str) -> str:
    """The request target: the spelling with the user's id, and a lookup for a GET."""
    path = spelling.format(id=user_id)
    return path + "?username=victim" if method == "GET" and "{id}" not in spelling else path


def path_info(request_target: str) -> str:
    """The PATH_INFO granian gives the app for `request_target` (PEP 3333: the percent-decoded
    bytes as Latin-1)."""
    return unquote(request_target.partition("?")[0], encoding="latin-1")


def wsgi_environ(request_target: str, method: str, headers: dict[str, str]) -> dict:
    path, _, query_string = request_target.partition("?")
    body = body_for(method)
    env = environ("/", method, headers=headers, query_string=query_string,
                  **({"json": body} if body else {}))
    env["PATH_INFO"] = path_info(request_target)
    return env


def victim_unchanged(owner_url: str, victim: dict, rows_before: int) -> None:
    """The victim is still there as it was, and no row was added."""
    rows = query(owner_url, "SELECT username, display_name FROM users WHERE id = %s",
                 (victim["id"],))
    assert rows == [(victim["username"], victim["display_name"])]
    assert query(owner_url, "SELECT count(*) FROM users") == [(rows_before,)]
    assert query(owner_url, "SELECT count(*) FROM users WHERE username = 'mallory'") == [(0,)]


@pytest.fixture
def victim(guarded_app: Flask, api_tokens: ApiTokens) -> dict:
    client = guarded_app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = api_tokens.header()["Authorization"]
    return create(client, "victim", "victim@example.org")


@pytest.mark.parametrize("method", METHODS)
def test_no_spelling_of_a_guarded_route_passes_without_a_token_on_either_door(
        guarded_app: Flask, victim: dict, owner_url: str, method: str) -> None:
    for spelling in SPELLINGS:
        request_target = target(spelling, victim["id"], method)
        status, headers, body = call(guarded_app.wsgi_app,
                                     wsgi_environ(request_target, method, {}))
        assert status == "401 UNAUTHORIZED", (method, request_target, status, body)
        assert ("WWW-Authenticate", 'Bearer realm="cachestack"') in headers
    victim_unchanged(owner_url, victim, 1)


@pytest.mark.parametrize("method", METHODS)
def test_with_a_token_a_route_answers_only_to_its_exact_spelling(
        guarded_app: Flask, victim: dict, owner_url: str, api_tokens: ApiTokens,
        method: str) -> None:
    """Flask's router alone too: it never reads a path otherwise than written."""
    for spelling in SPELLINGS:
        request_target = target(spelling, victim["id"], method)
        for door in (guarded_app.wsgi_app, flask_alone(guarded_app)):
            env = wsgi_environ(request_target, method, api_tokens.header())
            status, headers, body = call(door, env)
            assert status == "404 NOT FOUND", (method, request_target, status, body)
            assert ("Content-Type", "application/json") in headers
            if method != "HEAD":
                assert json.loads(body)["error"]["code"] == "not_found"
    victim_unchanged(owner_url, victim, 1)


def test_only_the_exact_open_paths_are_open(guarded_app: Flask) -> None:
    for path in OPEN:
        assert call(guarded_app.wsgi_app, environ(path)).status == "200 OK", path
    for request_target in NOT_OPEN:
        status = call(guarded_app.wsgi_app, wsgi_environ(request_target, "GET", {})).status
        assert status == "401 UNAUTHORIZED", (request_target, status)


# -- the real server: raw request targets, as an attacker sends them -----------------------


def send(service: ServiceProcess, method: str, request_target: str, headers: dict[str, str],
         body: dict | None = None) -> tuple[int, bytes]:
    """One request with `request_target` exactly as given (http.client does not normalise
    it, as requests and urllib3 would); by default with the method's body."""
    body = body or body_for(method)
    connection = http.client.HTTPConnection("127.0.0.1", service.port, timeout=10)
    try:
        connection.request(method, request_target,
                           body=json.dumps(body).encode() if body else None,
                           headers={**headers, "Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@pytest.fixture
def server_victim(guarded_service: ServiceProcess, api_tokens: ApiTokens,
                  owner_url: str) -> tuple[dict, int]:
    """A user on the real server, and how many rows its table holds (the module's server
    is shared by its tests)."""
    query(owner_url, "DELETE FROM users WHERE username = 'victim'")
    status, body = send(guarded_service, "POST", "/users", api_tokens.header(),
                        {"username": "victim", "email": "victim@example.org"})
    assert status == 201, body
    ((rows,),) = query(owner_url, "SELECT count(*) FROM users")
    return json.loads(body)["data"], rows


def test_the_real_server_refuses_every_other_spelling_with_or_without_a_token(
        guarded_service: ServiceProcess, server_victim: tuple[dict, int], owner_url: str,
        api_tokens: ApiTokens) -> None:
    victim, rows = server_victim
    for method in METHODS:
        for spelling in SPELLINGS:
            request_target = target(spelling, victim["id"], method)
            status, body = send(guarded_service, method, request_target, {})
            assert status == 401, (method, request_target, status, body)
            status, body = send(guarded_service, method, request_target, api_tokens.header())
            assert status == 404, (method, request_target, status, body)
    victim_unchanged(owner_url, victim, rows)
    for path in OPEN:
        assert send(guarded_service, "GET", path, {})[0] == 200, path
    for request_target in NOT_OPEN:
        assert send(guarded_service, "GET", request_target, {})[0] == 401, request_target


def test_the_real_server_decodes_percent_escapes_before_the_check_sees_the_path(
        guarded_service: ServiceProcess, server_victim: tuple[dict, int],
        api_tokens: ApiTokens) -> None:
    """`/%75sers/<id>` is `/users/<id>` by the time PATH_INFO is made: the same route, with
    the same need of a token, which is why the check must judge PATH_INFO as the router
    will, never the target as sent."""
    victim, _ = server_victim
    status, body = send(guarded_service, "GET", f"/%75sers/{victim['id']}", api_tokens.header())
    assert status == 200 and json.loads(body)["data"] == victim
    assert send(guarded_service, "GET", f"/%75sers/{victim['id']}", {})[0] == 401
