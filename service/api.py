"""HTTP routes: parse and validate, call the use case, shape the JSON answer."""

from __future__ import annotations

import json

from flask import Blueprint, Response, current_app, request

from . import metrics, validation
from .cache import HIT, Answer, Lookup
from .db import DatabaseUnavailable, UserRow
from .errors import ApiError, error_response
from .openapi import OPENAPI_JSON
from .users import Users

bp = Blueprint("api", __name__)

JSON = "application/json"


def users() -> Users:
    return current_app.extensions["cachestack.users"]


def _json(body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(body, status, headers, mimetype=JSON)


def _written(message: bytes, row: UserRow, status: int, headers: dict | None = None) -> Response:
    return _json(b'{"message":"' + message + b'","source":"db","data":' + row.public_json + b"}",
                 status, headers)


def read_body(status: str, data: bytes) -> bytes:
    """A read's response body around `data`, the stored JSON (never decoded and re-encoded)."""
    return b'{"source":"' + (b"cache" if status == HIT else b"db") + b'","data":' + data + b"}"


def _read(answer: Answer, data: bytes) -> Response:
    return _json(read_body(answer.status, data), headers={"X-Cache": answer.status})


def _not_found(user_id: int | str, answer: Answer | None = None) -> Response:
    response = error_response(404, "not_found", f"no user with id {user_id}")
    if answer:
        response.headers["X-Cache"] = answer.status
    return response


def _body() -> object:
    """The request's JSON document: 415 if it is not declared JSON, 400 if it does not parse."""
    if not request.is_json:
        raise ApiError(415, "unsupported_media_type", "send the body as application/json")
    raw = request.get_data(cache=False)
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise ApiError(400, "invalid_json", "the body is not valid JSON") from None


@bp.post("/users")
def create_user() -> Response:
    row = users().create(validation.user_fields(_body(), partial=False))
    return _written(b"created", row, 201, {"Location": f"/users/{row.id}"})


@bp.get("/users/<raw_id>")
def get_user(raw_id: str) -> Response:
    user_id = validation.user_id(raw_id)
    answer = users().find(Lookup.of("id", user_id))
    if answer.user is None:
        return _not_found(user_id, answer)
    return _read(answer, answer.user)


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
        return _not_found(user_id)
    return _written(b"updated", row, 200)


@bp.delete("/users/<raw_id>")
def delete_user(raw_id: str) -> Response:
    user_id = validation.user_id(raw_id)
    if not users().delete(user_id):
        return _not_found(user_id)
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
