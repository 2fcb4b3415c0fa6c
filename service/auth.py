"""Bearer tokens in front of every /users route, for both doors (hotpath.py and Flask).

With API_TOKENS_FILE set, a request for `/users` or anything under `/users/` must carry
`Authorization: Bearer <token>` with one of the file's tokens; /healthz, /readyz, /metrics
and /openapi.json stay open to probes and scrapers. The check is one WSGI layer outside
both doors, so they cannot disagree, and it is a hash and a comparison per token, not a
Flask request hook. The presented token's SHA-256 is compared with every accepted token's
in constant time, without stopping at a match: how long it takes says neither how much of
a guess was right nor which token matched. A token is never logged or echoed.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from typing import TYPE_CHECKING

from .errors import error_body

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

REALM = 'Bearer realm="cachestack"'
STATUS = "401 UNAUTHORIZED"


Refusal = tuple[list[tuple[str, str]], bytes]  # the headers and the body of a 401


def _refusal(challenge: str, code: str, message: str) -> Refusal:
    body = error_body(code, message)
    return [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
            ("WWW-Authenticate", challenge)], body


# RFC 6750: a request without credentials gets the bare challenge, one with bad ones is told so.
MISSING = _refusal(REALM, "missing_token", "send Authorization: Bearer <token>")
INVALID = _refusal(f'{REALM}, error="invalid_token"', "invalid_token",
                   "the Authorization header does not hold a valid bearer token")


def require_token(wsgi_app: WSGIApplication, tokens: Iterable[str]) -> WSGIApplication:
    """Wrap `wsgi_app` so that /users routes need one of `tokens`; no tokens, no check."""
    digests = tuple(hashlib.sha256(token.encode()).digest() for token in tokens)
    if not digests:
        return wsgi_app

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/users" or path.startswith("/users/"):
            refusal = _check(environ.get("HTTP_AUTHORIZATION"), digests)
            if refusal is not None:
                headers, body = refusal
                start_response(STATUS, headers)
                return [body]
        return wsgi_app(environ, start_response)

    return app


def _check(header: str | None, digests: tuple[bytes, ...]) -> Refusal | None:
    """None if the header holds an accepted token, else the refusal to send."""
    if header is None:
        return MISSING
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return INVALID
    presented = hashlib.sha256(token.encode()).digest()
    matched = False
    for digest in digests:
        matched |= hmac.compare_digest(digest, presented)
    return None if matched else INVALID
