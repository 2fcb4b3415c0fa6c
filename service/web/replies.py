"""The answers to /users, whichever door a request came in by: Flask's routes (routes.py) or
the hot path in front of Flask (hotpath.py).

Each function takes a use case's input, runs it and returns the Reply to send; a door only
parses its request and writes the Reply out, so the two doors cannot answer differently.
Nothing here knows either door (no Flask request, no WSGI environ). Bodies are built around
the user's stored JSON (db.UserRow.public_json, or what the cache holds), which is never
decoded and encoded again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..cache.keys import Lookup
from ..cache.policy import HIT, Answer
from ..usecases.users import Users
from . import validation
from .errors import ApiError, error_body

JSON = "application/json"


@dataclass(frozen=True, slots=True)
class Reply:
    """A JSON answer: its status, its headers but Content-Type and Content-Length, its body."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


def parse_json(raw: bytes) -> object:
    """A request body's JSON document; 400 if it does not parse."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise ApiError(400, "invalid_json", "the body is not valid JSON") from None


def not_found(user_id: int | str, headers: tuple[tuple[str, str], ...] = ()) -> Reply:
    return Reply(404, error_body("not_found", f"no user with id {user_id}"), headers)


def _written(message: bytes, user: bytes) -> bytes:
    return b'{"message":"' + message + b'","source":"db","data":' + user + b"}"


def _read(answer: Answer, data: bytes) -> Reply:
    """A read's 200 around `data`, saying where the answer came from."""
    source = b"cache" if answer.status == HIT else b"db"
    return Reply(200, b'{"source":"' + source + b'","data":' + data + b"}",
                 (("X-Cache", answer.status),))


def user_by_id(users: Users, user_id: int) -> Reply:
    answer = users.find(Lookup.of("id", user_id))
    if answer.user is None:
        return not_found(user_id, (("X-Cache", answer.status),))
    return _read(answer, answer.user)


def find(users: Users, lookup: Lookup) -> Reply:
    """The users `lookup` matches, as a list (of one or none)."""
    answer = users.find(lookup)
    return _read(answer, b"[" + answer.user + b"]" if answer.user else b"[]")


def create(users: Users, document: object) -> Reply:
    row = users.create(validation.user_fields(document, partial=False))
    return Reply(201, _written(b"created", row.public_json), (("Location", f"/users/{row.id}"),))


def update(users: Users, user_id: int, document: object) -> Reply:
    row = users.update(user_id, validation.user_fields(document, partial=True))
    if row is None:
        return not_found(user_id)
    return Reply(200, _written(b"updated", row.public_json))
