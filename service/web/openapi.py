"""The OpenAPI 3.1 description of every route, served at /openapi.json and fuzzed in the tests."""

from __future__ import annotations

import json

from .validation import (
    DISPLAY_NAME_MAX,
    EMAIL_MAX,
    EMAIL_PATTERN,
    NO_NUL_PATTERN,
    USERNAME_PATTERN,
)

USERNAME = {"type": "string", "pattern": USERNAME_PATTERN}
EMAIL = {"type": "string", "maxLength": EMAIL_MAX, "pattern": EMAIL_PATTERN}
DISPLAY_NAME = {"type": ["string", "null"], "maxLength": DISPLAY_NAME_MAX,
                "pattern": NO_NUL_PATTERN}
CACHE_HEADER = {
    "X-Cache": {
        "description": "HIT: from Redis; MISS: from Postgres, then cached; "
        "BYPASS: Redis unavailable",
        "schema": {"type": "string", "enum": ["HIT", "MISS", "BYPASS"]},
    }
}
RETRY_AFTER = {"Retry-After": {"schema": {"type": "string"}}}
CHALLENGE = {"WWW-Authenticate": {"description": 'Bearer realm="cachestack", with '
                                  'error="invalid_token" when a token was sent',
                                  "schema": {"type": "string"}}}


def ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def json_body(schema: dict) -> dict:
    return {"application/json": {"schema": schema}}


def response(description: str, schema: dict, headers: dict | None = None) -> dict:
    answer: dict = {"description": description, "content": json_body(schema)}
    if headers:
        answer["headers"] = headers
    return answer


ERROR = response("A JSON error naming the problem", ref("Error"))
UNAVAILABLE = response("Postgres is unavailable; retry after the given seconds", ref("Error"),
                       RETRY_AFTER)
ERRORS = {"400": ERROR, "503": UNAVAILABLE}
BODY_ERRORS = {**ERRORS, "409": ERROR, "413": ERROR, "415": ERROR}
UNAUTHORIZED = response("No bearer token, or not one the service accepts", ref("Error"),
                        CHALLENGE)


def guarded(operation: dict) -> dict:
    """An operation under /users: it needs a bearer token when the service has tokens."""
    return {**operation, "security": [{"bearer": []}],
            "responses": {**operation["responses"], "401": UNAUTHORIZED}}


ID_PARAMETER = {"name": "id", "in": "path", "required": True,
                "schema": {"type": "integer", "minimum": 1, "maximum": 2**63 - 1}}


def read_response(data: dict) -> dict:
    schema = {"type": "object", "required": ["source", "data"], "additionalProperties": False,
              "properties": {"source": {"type": "string", "enum": ["cache", "db"]},
                             "data": data}}
    return response("The user, and whether Redis or Postgres answered", schema, CACHE_HEADER)


def write_response(message: str, description: str, headers: dict | None = None) -> dict:
    schema = {"type": "object", "required": ["message", "source", "data"],
              "additionalProperties": False,
              "properties": {"message": {"const": message}, "source": {"const": "db"},
                             "data": ref("User")}}
    return response(description, schema, headers)


def one_key(name: str, schema: dict) -> dict:
    return {"type": "object", "required": [name], "properties": {name: schema},
            "additionalProperties": False}


# Exactly one of ?id=, ?username=, ?email=: an exploded object parameter with oneOf.
LOOKUP_PARAMETER = {
    "name": "lookup", "in": "query", "required": True, "style": "form", "explode": True,
    "description": "Exactly one of id, username (any case) or email (any case)",
    "schema": {"oneOf": [one_key("id", {"type": "integer", "minimum": 1, "maximum": 2**63 - 1}),
                         one_key("username", USERNAME), one_key("email", EMAIL)]},
}


DOCUMENT = {
    "openapi": "3.1.0",
    "info": {"title": "cachestack user service", "version": "0.1.0",
             "description": "Users in PostgreSQL, cached in Redis (write-through, cache-aside). "
             "Text is stored as Unicode: NUL and lone surrogates (a \\ud800 escape outside a "
             "pair) are refused with 400."},
    "paths": {
        "/users": {
            "post": guarded({
                "summary": "Create a user",
                "requestBody": {"required": True, "content": json_body(ref("NewUser"))},
                "responses": {
                    "201": write_response("created", "Created; every lookup key is cached",
                                          {"Location": {"schema": {"type": "string"}}}),
                    **BODY_ERRORS,
                },
            }),
            "get": guarded({
                "summary": "Find users by exactly one of id, username or email",
                "parameters": [LOOKUP_PARAMETER],
                "responses": {
                    "200": read_response({"type": "array", "items": ref("User"), "maxItems": 1}),
                    **ERRORS,
                },
            }),
        },
        "/users/{id}": {
            "parameters": [ID_PARAMETER],
            "get": guarded({
                "summary": "Read a user by id",
                "responses": {
                    "200": read_response(ref("User")),
                    "404": response("No such user", ref("Error"), CACHE_HEADER),
                    **ERRORS,
                },
            }),
            "patch": guarded({
                "summary": "Change a user's username, email or display name",
                "requestBody": {"required": True, "content": json_body(ref("UserChanges"))},
                "responses": {
                    "200": write_response("updated", "Updated; the cache holds the new row"),
                    "404": ERROR,
                    **BODY_ERRORS,
                },
            }),
            "delete": guarded({
                "summary": "Delete a user",
                "responses": {"204": {"description": "Deleted"}, "404": ERROR, **ERRORS},
            }),
        },
        "/healthz": {
            "get": {
                "summary": "Liveness: 200 while the process runs",
                "responses": {"200": response("Alive", {"type": "object"})},
            }
        },
        "/readyz": {
            "get": {
                "summary": "Readiness: 200 when Postgres answers; the cache may be degraded",
                "responses": {"200": response("Ready", ref("Readiness")),
                              "503": response("Postgres does not answer", ref("Readiness"),
                                              RETRY_AFTER)},
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics of all worker processes",
                "responses": {"200": {"description": "Prometheus text format",
                                      "content": {"text/plain": {"schema": {"type": "string"}}}}},
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "responses": {"200": response("OpenAPI 3.1 document", {"type": "object"})},
            }
        },
    },
    "components": {
        "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer",
                       "description": "One of the tokens in the service's API_TOKENS_FILE; "
                       "a service started without that setting asks for none"},
        },
        "schemas": {
            "User": {
                "type": "object",
                "additionalProperties": False,
                "required": ["id", "username", "email", "display_name", "created_at",
                             "updated_at"],
                "properties": {
                    "id": {"type": "integer", "minimum": 1},
                    "username": USERNAME,
                    "email": {"type": "string", "maxLength": EMAIL_MAX},
                    "display_name": DISPLAY_NAME,
                    "created_at": {"type": "string", "format": "date-time"},
                    "updated_at": {"type": "string", "format": "date-time"},
                },
            },
            "NewUser": {
                "type": "object",
                "additionalProperties": False,
                "required": ["username", "email"],
                "properties": {"username": USERNAME, "email": EMAIL, "display_name": DISPLAY_NAME},
            },
            "UserChanges": {
                "type": "object",
                "additionalProperties": False,
                "minProperties": 1,
                "properties": {"username": USERNAME, "email": EMAIL, "display_name": DISPLAY_NAME},
            },
            "Error": {
                "type": "object",
                "required": ["error"],
                "properties": {
                    "error": {
                        "type": "object",
                        "required": ["code", "message"],
                        "properties": {"code": {"type": "string"}, "message": {"type": "string"},
                                       "field": {"type": "string"}},
                    }
                },
            },
            "Readiness": {
                "type": "object",
                "required": ["database", "cache"],
                "properties": {
                    "database": {"enum": ["ok", "unavailable"]},
                    "cache": {"enum": ["ok", "degraded"]},
                    "stream": {"description": "the change stream: whether a reader has its slot "
                               "and the WAL it has yet to confirm, or absent (no slot)",
                               "oneOf": [{"const": "absent"}, {
                                   "type": "object", "required": ["reading", "behind_bytes"],
                                   "properties": {"reading": {"type": "boolean"},
                                                  "behind_bytes": {"type": "integer"}}}]},
                },
            },
        }
    },
}

OPENAPI_JSON = json.dumps(DOCUMENT, separators=(",", ":")).encode()
