"""The two busiest routes, `GET /users/<id>` and `POST /users`, answered in front of Flask.

Flask's request handling (request context, routing, Response objects, hooks) costs about
100 µs of CPU per request on this project's 2-core machines: measured under wrk, a third
of a cache miss, a third of a create and two thirds of a near-cache hit (see bench/README.md).
So this WSGI middleware gives those two routes a shorter way in. It calls the very functions
Flask's routes call (`api.user_by_id`, `api.create`), so both doors give the same answer:
- a request it cannot take whole goes to Flask untouched: an id that does not validate,
  any other method or path, a body that is not plain `application/json` with a
  Content-Length within the limit;
- an exception (a conflict, bad JSON, Postgres down, a bug) is answered by Flask's own
  error handlers, so every error is Flask's JSON error, logged as Flask logs it.
tests/service/test_hotpath.py sends each kind of request both ways and compares the bytes.
Flask's request hooks (`before_request` and the like) do not run for the requests answered
here; the app registers none, and one added later must be added here too. What must hold for
both doors stands in front of this one: the API-token check (auth.py) and the timing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from flask import Flask, Response
from werkzeug.exceptions import ClientDisconnected
from werkzeug.http import HTTP_STATUS_CODES

from . import validation
from .api import JSON, Reply, create, parse_json, user_by_id
from .errors import ApiError
from .users import Users

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

USER_PREFIX = "/users/"
STATUS_LINES = {code: f"{code} {reason.upper()}" for code, reason in HTTP_STATUS_CODES.items()}


def serve_hot_routes(flask_app: Flask) -> WSGIApplication:
    """Wrap `flask_app.wsgi_app`: the hot routes are answered here, every other request there."""
    flask_wsgi = flask_app.wsgi_app
    service: Users = flask_app.extensions["cachestack.users"]
    body_limit: int = flask_app.config["MAX_CONTENT_LENGTH"]

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        work = _hot_route(environ, service, body_limit)
        if work is None:
            return flask_wsgi(environ, start_response)
        try:
            reply = work()
        except Exception as exc:  # answered, and logged, by Flask's error handlers
            return _flask_error(flask_app, environ, exc)(environ, start_response)
        start_response(STATUS_LINES[reply.status], [
            *reply.headers, ("Content-Type", JSON), ("Content-Length", str(len(reply.body)))])
        return [reply.body]

    return app


def _hot_route(environ: WSGIEnvironment, service: Users,
               body_limit: int) -> Callable[[], Reply] | None:
    """The work that answers this request, or None to leave it to Flask."""
    method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
    if method == "GET" and path.startswith(USER_PREFIX):
        raw_id = path[len(USER_PREFIX):]
        try:
            user_id = validation.user_id(raw_id)  # no id with a "/" in it passes
        except ApiError:
            return None
        return lambda: user_by_id(service, user_id)
    if method == "POST" and path == "/users":
        length = _plain_json_length(environ, body_limit)
        if length is None:
            return None
        return lambda: create(service, parse_json(_request_body(environ, length)))
    return None


def _plain_json_length(environ: WSGIEnvironment, body_limit: int) -> int | None:
    """The body's length if it is declared `application/json` and its length is known and
    allowed; None for anything Flask should judge (415, 413, chunked bodies)."""
    mimetype = environ.get("CONTENT_TYPE", "").partition(";")[0].strip().lower()
    length = environ.get("CONTENT_LENGTH", "")
    if mimetype != JSON or not length.isascii() or not length.isdigit():
        return None
    return int(length) if int(length) <= body_limit else None


def _request_body(environ: WSGIEnvironment, length: int) -> bytes:
    body = environ["wsgi.input"].read(length)
    if len(body) < length:
        raise ClientDisconnected()
    return body


def _flask_error(flask_app: Flask, environ: WSGIEnvironment, exc: Exception) -> Response:
    """Flask's answer to an exception: the app's error handlers, in a request context.
    Called while `exc` is being handled, so a handler that logs it logs its traceback."""
    with flask_app.request_context(environ):
        return flask_app.make_response(flask_app.handle_user_exception(exc))
