"""Flask's door: every route parses its request, and the /users routes write out the Reply
that replies.py builds (the hot path in front of Flask writes out the same ones)."""

from __future__ import annotations

import json

from flask import Blueprint, Flask, Request, Response, current_app, request
from werkzeug.exceptions import NotFound
from werkzeug.routing import MapAdapter

from .. import metrics
from ..cache.keys import Lookup
from ..postgres.pool import DatabaseUnavailable
from ..usecases.users import Users
from . import replies, validation
from .errors import ApiError
from .openapi import OPENAPI_JSON
from .replies import JSON, Reply

# What a path segment never is in a route: empty (a doubled or trailing slash), "." or "..".
NOT_SEGMENTS = frozenset({"", ".", ".."})


def canonical(path: str) -> bool:
    """Whether `path` is spelled as a route is: "/" and segments, none of them NOT_SEGMENTS."""
    first, *segments = path.split("/")
    return first == "" and bool(segments) and NOT_SEGMENTS.isdisjoint(segments)


class CanonicalFlask(Flask):
    """Flask whose router takes a path only as it is written: any other is a 404.

    Werkzeug's router reads some paths otherwise: it drops leading slashes (`//users` is
    routed as `/users`, whatever its `merge_slashes`) and merges doubled ones elsewhere. So a
    route could be reached by a spelling that whatever judged the request before it (the token
    check, a proxy's rules, the logs) saw as another path. Here every request that reaches a
    route spells it exactly, as the hot path (hotpath.py) only ever takes exact spellings too.
    Checked when Flask makes the request's URL adapter, before it routes, so the 404 is its
    own, answered by the app's error handlers."""

    def create_url_adapter(self, request: Request | None) -> MapAdapter | None:
        if request is not None and not canonical(request.environ.get("PATH_INFO", "")):
            raise NotFound()
        return super().create_url_adapter(request)


bp = Blueprint("api", __name__)
EXTENSION = "cachestack.users"  # where an app keeps the Users its routes serve, in app.extensions


def users_of(app: Flask) -> Users:
    """The use cases `app` serves (as Flask's tutorial's `get_db`: the blueprint owns its
    accessor, the factory puts them there)."""
    return app.extensions[EXTENSION]


def _users() -> Users:
    return users_of(current_app)


def _response(reply: Reply) -> Response:
    return Response(reply.body, reply.status, list(reply.headers), mimetype=JSON)


def _body() -> object:
    """The request's JSON document: 415 if it is not declared JSON, 400 if it does not parse."""
    if not request.is_json:
        raise ApiError(415, "unsupported_media_type", "send the body as application/json")
    return replies.parse_json(request.get_data(cache=False))


@bp.post("/users")
def create_user() -> Response:
    return _response(replies.create(_users(), _body()))


@bp.get("/users/<raw_id>")
def get_user(raw_id: str) -> Response:
    return _response(replies.user_by_id(_users(), validation.user_id(raw_id)))


@bp.get("/users")
def find_users() -> Response:
    field, value = validation.lookup(request.args.to_dict(flat=False))
    return _response(replies.find(_users(), Lookup.of(field, value)))


@bp.patch("/users/<raw_id>")
def update_user(raw_id: str) -> Response:
    return _response(replies.update(_users(), validation.user_id(raw_id), _body()))


@bp.delete("/users/<raw_id>")
def delete_user(raw_id: str) -> Response:
    user_id = validation.user_id(raw_id)
    if not _users().delete(user_id):
        return _response(replies.not_found(user_id))
    return Response(status=204)


@bp.get("/healthz")
def healthz() -> Response:
    return _response(Reply(200, b'{"status":"ok"}'))


@bp.get("/readyz")
def readyz() -> Response:
    users = _users()
    try:
        state = users.state()
    except DatabaseUnavailable:
        cache = "ok" if users.cache.available() else "degraded"
        return _response(Reply(503, json.dumps({"database": "unavailable", "cache": cache})
                               .encode(), (("Retry-After", "1"),)))
    return _response(Reply(200, json.dumps(state).encode()))


@bp.get("/metrics")
def metrics_endpoint() -> Response:
    body, content_type = metrics.render()
    return Response(body, 200, content_type=content_type)


@bp.get("/openapi.json")
def openapi() -> Response:
    return _response(Reply(200, OPENAPI_JSON))
