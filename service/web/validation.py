"""Checks on what clients send: each failure names the field and says what is wrong."""

from __future__ import annotations

import re
from typing import Any

from .errors import ApiError

USERNAME_PATTERN = r"^[A-Za-z0-9_.\-]{3,32}$"
# One @, no spaces or control characters, a domain of dot-separated non-empty labels.
EMAIL_PATTERN = r"^[^@\x00-\x20\x7f]+@[^@.\x00-\x20\x7f]+(\.[^@.\x00-\x20\x7f]+)+$"
NO_NUL_PATTERN = r"^[^\x00]*$"
USERNAME = re.compile(USERNAME_PATTERN)
EMAIL = re.compile(EMAIL_PATTERN)
# What Postgres's UTF-8 text cannot store: NUL, and the UTF-16 surrogates, which a JSON
# "\ud800" escape gives alone but UTF-8 cannot encode; every other code point it stores,
# unassigned ones and noncharacters too. The published patterns above leave surrogates out:
# JSON Schema applies them to Unicode text, which a lone surrogate is not.
UNSTORABLE = re.compile(r"[\x00\ud800-\udfff]")
EMAIL_MAX = 254
DISPLAY_NAME_MAX = 100
BIGINT_MAX = 2**63 - 1
FIELDS = ("username", "email", "display_name")
LOOKUP_FIELDS = ("id", "username", "email")


def invalid(field: str, message: str) -> ApiError:
    return ApiError(400, "invalid_field", f"{field}: {message}", field)


def username(value: Any) -> str:
    if not isinstance(value, str):
        raise invalid("username", "must be a string")
    if not USERNAME.fullmatch(value):
        raise invalid("username", "must be 3-32 characters of A-Z a-z 0-9 _ . -")
    return value


def storable(field: str, value: str) -> str:
    """`value`, if Postgres can store it."""
    if UNSTORABLE.search(value):
        raise invalid(field, "must not contain NUL (U+0000) or a lone surrogate "
                      "(U+D800-U+DFFF), which cannot be stored")
    return value


def email(value: Any) -> str:
    """One @, a non-empty local part, a dot inside the domain; stored lower-cased."""
    if not isinstance(value, str):
        raise invalid("email", "must be a string")
    if len(value) > EMAIL_MAX:
        raise invalid("email", f"must be at most {EMAIL_MAX} characters")
    if not EMAIL.fullmatch(storable("email", value)):
        raise invalid("email", "must look like name@example.org")
    return value.lower()


def display_name(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise invalid("display_name", "must be a string or null")
    if len(value) > DISPLAY_NAME_MAX:
        raise invalid("display_name", f"must be at most {DISPLAY_NAME_MAX} characters")
    return storable("display_name", value)


CHECKS = {"username": username, "email": email, "display_name": display_name}


def user_fields(body: Any, *, partial: bool) -> dict[str, Any]:
    """Validate a create (all required but display_name) or update (any, at least one) body."""
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_body", "the body must be a JSON object")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise ApiError(400, "unknown_field", f"unknown field: {', '.join(unknown)}", unknown[0])
    if partial and not body:
        raise ApiError(400, "invalid_body", f"give at least one of: {', '.join(FIELDS)}")
    if not partial:
        for required in ("username", "email"):
            if required not in body:
                raise ApiError(400, "missing_field", f"{required}: is required", required)
    return {name: CHECKS[name](value) for name, value in body.items()}


def user_id(raw: str | int) -> int:
    """A positive 64-bit id; anything else cannot name a user."""
    text = str(raw)
    if not text.isascii() or not text.isdigit() or not 0 < int(text) <= BIGINT_MAX:
        raise ApiError(400, "invalid_field", "id: must be a positive integer", "id")
    return int(text)


def lookup(args: dict[str, list[str]]) -> tuple[str, str | int]:
    """Exactly one of id, username, email, given once; returns (field, validated value)."""
    unknown = sorted(set(args) - set(LOOKUP_FIELDS))
    if unknown:
        raise ApiError(400, "unknown_parameter", f"unknown query parameter: {unknown[0]}",
                       unknown[0])
    given = [(name, values) for name, values in args.items()]
    if len(given) != 1 or len(given[0][1]) != 1:
        raise ApiError(400, "invalid_query",
                       "give exactly one query parameter: id, username or email")
    field, (value,) = given[0]
    if field == "id":
        return field, user_id(value)
    return field, CHECKS[field](value)
