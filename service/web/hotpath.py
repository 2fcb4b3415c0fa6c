"""The two busiest routes, `GET /users/<id>` and `POST /users`, answered in front of Flask.

Flask's request handling (request context, routing, Response objects, hooks) costs more CPU
than a near-cache hit's own work, and a large share of a miss or a create (bench/RESULTS.md,
"Measurements behind the code"). So this WSGI middleware gives those two routes a shorter
way in. It writes out the very Replies Flask's routes write out (replies.py), so both doors
give the same answer:
- a request it cannot take whole goes to Flask untouched: an id that does not validate,
  any other method or path, a body that is not plain `application/json` with a
  Content-Length within the limit;
- an exception (a conflict, bad JSON, Postgres down, a bug) is answered by Flask's own
  error handlers, so every error is Flask's JSON error, logged as Flask logs it.
tests/service/test_hotpath.py sends each kind of request both ways and compares the bytes.
What Flask runs around a request it routes (request hooks, request signals) would not run
here, so an app that has any is refused at start-up; what must hold for both doors stands
in front of this one, as WSGI middleware: the API-token check (auth.py) and the timing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from flask import Flask, Response, signals
from werkzeug.exceptions import ClientDisconnected
from werkzeug.http import HTTP_STATUS_CODES

from ..usecases.users import Users
from . import validation
from .errors import ApiError
from .replies import JSON, Reply, create, parse_json, user_by_id
from .routes import users_of

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

USER_PREFIX = "/users/"
STATUS_LINES = {code: f"{code} {reason.upper()}" for code, reason in HTTP_STATUS_CODES.items()}
# Where a Flask app keeps what it runs around the requests it routes, by the decorator
# that adds to it; and the signals it sends for them.
REQUEST_HOOKS = {
    "before_request_funcs": "before_request", "after_request_funcs": "after_request",
    "teardown_request_funcs": "teardown_request",
    "teardown_appcontext_funcs": "teardown_appcontext",
    "url_value_preprocessors": "url_value_preprocessor", "url_default_functions": "url_defaults",
}
REQUEST_SIGNALS = (signals.request_started, signals.request_finished,
                   signals.request_tearing_down, signals.appcontext_pushed,
                   signals.appcontext_popped, signals.appcontext_tearing_down)


def serve_hot_routes(flask_app: Flask) -> WSGIApplication:
    """Wrap `flask_app.wsgi_app`: the hot routes are answered here, every other request there.
    Refuses (RuntimeError) an app with request hooks or request signal receivers."""
    _refuse_request_hooks(flask_app)
    flask_wsgi = flask_app.wsgi_app
    service = users_of(flask_app)
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


def _refuse_request_hooks(flask_app: Flask) -> None:
    """Fail at start-up rather than answer the busiest requests without what the app runs
    around the others. Checked once, when create_app puts this door in front of the app, after
    it registered everything; a hook added after that is not seen (the tests add one that
    way, to count the requests that reach Flask)."""
    found = [decorator for name, decorator in REQUEST_HOOKS.items()
             if _any_registered(getattr(flask_app, name))]
    found += [signal.name for signal in REQUEST_SIGNALS if signal.has_receivers_for(flask_app)]
    if found:
        raise RuntimeError(
            f"the hot routes would skip this app's {', '.join(found)}: put that work in a WSGI "
            "middleware around both doors, as service/web/auth.py and service/web/timing.py do")


def _any_registered(hooks: dict[str | None, list] | list) -> bool:
    """Whether a hook store holds a hook: one list, or a list by blueprint."""
    return any(hooks.values()) if isinstance(hooks, dict) else bool(hooks)


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
