"""HTTP routes: parse and validate, call the use case, shape the JSON answer."""

from __future__ import annotations

import json
from dataclasses import dataclass

from flask import Blueprint, Response, current_app, request

from . import metrics, validation
from .cache import HIT, Answer, Lookup
from .db import DatabaseUnavailable, UserRow
from .errors import ApiError, error_body
from .openapi import OPENAPI_JSON
from .users import Users

bp = Blueprint("api", __name__)

JSON = "application/json"


@dataclass(frozen=True, slots=True)
class Reply:
    """A JSON answer, built the same way whichever door the request came in by: Flask's
    routes below, or the hot path in front of Flask (hotpath.py)."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()

    def response(self) -> Response:
        return Response(self.body, self.status, list(self.headers), mimetype=JSON)


def users() -> Users:
    return current_app.extensions["cachestack.users"]


def _json(body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(body, status, headers, mimetype=JSON)


def _written(message: bytes, row: UserRow) -> bytes:
    return b'{"message":"' + message + b'","source":"db","data":' + row.public_json + b"}"


def _read_body(status: str, data: bytes) -> bytes:
    """A read's response body around `data`, the stored JSON (never decoded and re-encoded)."""
    return b'{"source":"' + (b"cache" if status == HIT else b"db") + b'","data":' + data + b"}"


def _read(answer: Answer, data: bytes) -> Response:
    return _json(_read_body(answer.status, data), headers={"X-Cache": answer.status})


def _not_found(user_id: int | str, headers: tuple[tuple[str, str], ...] = ()) -> Reply:
    return Reply(404, error_body("not_found", f"no user with id {user_id}"), headers)


def parse_json(raw: bytes) -> object:
    """A request body's JSON document; 400 if it does not parse."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise ApiError(400, "invalid_json", "the body is not valid JSON") from None


def _body() -> object:
    """The request's JSON document: 415 if it is not declared JSON, 400 if it does not parse."""
    if not request.is_json:
        raise ApiError(415, "unsupported_media_type", "send the body as application/json")
    return parse_json(request.get_data(cache=False))


def user_by_id(service: Users, user_id: int) -> Reply:
    answer = service.find(Lookup.of("id", user_id))
    cache_status = (("X-Cache", answer.status),)
    if answer.user is None:
        return _not_found(user_id, cache_status)
    return Reply(200, _read_body(answer.status, answer.user), cache_status)


def create(service: Users, document: object) -> Reply:
    row = service.create(validation.user_fields(document, partial=False))
    return Reply(201, _written(b"created", row), (("Location", f"/users/{row.id}"),))


@bp.post("/users")
def create_user() -> Response:
    return create(users(), _body()).response()


@bp.get("/users/<raw_id>")
def get_user(raw_id: str) -> Response:
    return user_by_id(users(), validation.user_id(raw_id)).response()


@bp.get("/users")
def find_users() -> Response:
    field, value = validation.lookup(request.args.to_dict(flat=False))
    answer = users().find(Lookup.of(field, value))
    return _read(answer, b"[" + answer.user + b"]" if answer.user else b"[]")


@bp.patch("/users/<raw_id>")
def update_user(raw_id: str) -> Response:
    user_id = validation.user_id(raw_id)
    row = users().update(user_id, validation.user_fields(_body(), partial=True))
    if row is None:
        return _not_found(user_id).response()
    return _json(_written(b"updated", row))


@bp.delete("/users/<raw_id>")
def delete_user(raw_id: str) -> Response:
    user_id = validation.user_id(raw_id)
    if not users().delete(user_id):
        return _not_found(user_id).response()
    return Response(status=204)


@bp.get("/healthz")
def healthz() -> Response:
    return _json(b'{"status":"ok"}')


@bp.get("/readyz")
def readyz() -> Response:
    service = users()
    cache = "ok" if service.cache.available() else "degraded"
    try:
        service.database.ping()
    except DatabaseUnavailable:
        return _json(json.dumps({"database": "unavailable", "cache": cache}).encode(), 503,
                     {"Retry-After": "1"})
    return _json(json.dumps({"database": "ok", "cache": cache}).encode())


@bp.get("/metrics")
def metrics_endpoint() -> Response:
    body, content_type = metrics.render()
    return Response(body, 200, content_type=content_type)


@bp.get("/openapi.json")
def openapi() -> Response:
    return _json(OPENAPI_JSON)
