"""JSON errors for every failure: a code, a message naming the problem, never a traceback."""

from __future__ import annotations

import json
import logging

from flask import Flask, Response
from werkzeug.exceptions import HTTPException

from ..postgres.pool import Conflict, DatabaseUnavailable

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error the client caused; `field` names the offending input when there is one."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field


def error_body(code: str, message: str, field: str | None = None) -> bytes:
    error: dict[str, str] = {"code": code, "message": message}
    if field:
        error["field"] = field
    return json.dumps({"error": error}).encode()


def error_response(status: int, code: str, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None) -> Response:
    return Response(error_body(code, message, field), status, headers, mimetype="application/json")


def _http_code(exc: HTTPException) -> str:
    return (exc.name or "error").lower().replace(" ", "_").replace("'", "")


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def api_error(exc: ApiError) -> Response:
        return error_response(exc.status, exc.code, exc.message, exc.field)

    @app.errorhandler(Conflict)
    def conflict(exc: Conflict) -> Response:
        return error_response(409, "conflict", str(exc), exc.field)

    @app.errorhandler(DatabaseUnavailable)
    def database_unavailable(exc: DatabaseUnavailable) -> Response:
        # Not logged here, once per request: the pool logs when the database goes away.
        return error_response(503, "database_unavailable",
                              "the database is unavailable, try again shortly",
                              headers={"Retry-After": "1"})

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        response = error_response(exc.code or 500, _http_code(exc), exc.description or "")
        if exc.code == 405 and exc.valid_methods:
            response.headers["Allow"] = ", ".join(exc.valid_methods)
        return response

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Response:
        log.exception("unhandled error")
        return error_response(500, "internal_error", "an unexpected error occurred")
