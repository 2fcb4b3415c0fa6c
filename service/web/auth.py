"""Bearer tokens in front of every path but the probes', for both doors (hotpath.py and Flask).

With API_TOKENS_FILE set, a request must carry `Authorization: Bearer <token>` with one of
the file's tokens, unless its path is exactly /healthz, /readyz, /metrics or /openapi.json
(probes and scrapers). What is open is listed, not what is guarded: any other spelling of a
path needs a token too, so a spelling the router would read as a guarded route (`//users`,
or `/%2Fusers`, which the server decodes into PATH_INFO as `//users`) cannot pass unjudged,
and a route added later is guarded from the start. The router, for its part, routes a path
only as it is written (routes.CanonicalFlask). The check is one WSGI layer outside both doors,
so they cannot disagree, and it is a set lookup, a hash and a comparison per token, not a
Flask request hook. The presented token's SHA-256 is compared with every accepted token's
in constant time, without stopping at a match: how long it takes says neither how much of
a guess was right nor which token matched. A token is never logged or echoed.

The file is read again when it changes (TokenFile), so tokens rotate without a restart.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from ..files import ConfigError, FileVersion, TokenLines, file_version, parse_tokens, read_file
from .errors import error_body

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

# The paths open without a token, as PATH_INFO must spell them.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/openapi.json"})
REALM = 'Bearer realm="cachestack"'
STATUS = "401 UNAUTHORIZED"
SETTING = "API_TOKENS_FILE"
# How often each worker asks whether the token file changed: a token added or removed takes
# effect within this, and a request pays only a clock read for it.
CHECK_EVERY_SECONDS = 1.0
# A file modified this recently may be rewritten within its timestamp's resolution (a few ms
# on Linux's file systems, 2 s on FAT), keeping the same version (config.file_version): such a
# file is read again at the next check, until it is older.
SETTLED_NS = 2_000_000_000

log = logging.getLogger(__name__)


Refusal = tuple[list[tuple[str, str]], bytes]  # the headers and the body of a 401


def _refusal(challenge: str, code: str, message: str) -> Refusal:
    body = error_body(code, message)
    return [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
            ("WWW-Authenticate", challenge)], body


# RFC 6750: a request without credentials gets the bare challenge, one with bad ones is told so.
MISSING = _refusal(REALM, "missing_token", "send Authorization: Bearer <token>")
INVALID = _refusal(f'{REALM}, error="invalid_token"', "invalid_token",
                   "the Authorization header does not hold a valid bearer token")


def _digests(tokens: Iterable[str]) -> tuple[bytes, ...]:
    return tuple(hashlib.sha256(token.encode()).digest() for token in tokens)


def _problems(path: str, lines: TokenLines) -> tuple[str, ...]:
    """What to warn about a token file that was read: its lines that are not tokens (by
    number, never their text), and a file that accepts nobody."""
    problems = [f"{SETTING}: line {number} of {path} is not a bearer token (A-Z a-z 0-9 - . _ ~ "
                "+ / and a trailing =); it is left out" for number in lines.not_tokens]
    if not lines.tokens:
        problems.append(f"{SETTING}: {path} holds no token: every request is refused but "
                        f"those for {', '.join(sorted(OPEN_PATHS))}")
    return tuple(problems)


class TokenFile:
    """The digests of the tokens API_TOKENS_FILE holds now, give or take a second.

    At most every CHECK_EVERY_SECONDS one request's thread stats the file, and reads it only
    when its version changed, so a token added to it is accepted, and one removed refused,
    within about a second, in every worker, without a restart. It fails closed: what the file
    says is all that is accepted. An empty file, or one of comments only, accepts no token; a
    line that is not a token is left out and the file's other tokens accepted (a typo on one
    line locks out nobody else, and cannot become a token); a file that cannot be read (gone,
    not readable, not UTF-8) accepts no token until it can be read again, for it no longer
    says that any token is still good. Each problem is logged once while it lasts (naming
    the file or the line, never a token)."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._version: FileVersion | None = None  # of the file `digests` were read from
        self._said: tuple[str, ...] = ()  # the problems last logged
        self._checking = threading.Lock()
        self.digests: tuple[bytes, ...] = self._read()
        self._check_at = time.monotonic() + CHECK_EVERY_SECONDS

    def current(self) -> tuple[bytes, ...]:
        """The digests to compare with; on the hot path, so a clock read and nothing more
        until a check is due, which one thread does while the others go on."""
        if time.monotonic() >= self._check_at and self._checking.acquire(blocking=False):
            try:
                self._check_at = time.monotonic() + CHECK_EVERY_SECONDS
                self._reread()
            finally:
                self._checking.release()
        return self.digests

    def _reread(self) -> None:
        digests = self._read()
        if digests != self.digests:
            log.info("%s read again: %d tokens accepted", SETTING, len(digests))
        self.digests = digests

    def _read(self) -> tuple[bytes, ...]:
        """The digests of the tokens the file holds now: one stat, and a read when the file
        changed since it was last read."""
        try:
            version = file_version(SETTING, self._path)
            if version == self._version:
                return self.digests
            lines = parse_tokens(read_file(SETTING, self._path))
        except ConfigError as exc:
            self._version = None  # read it anew once it can be, even if unchanged (chmod)
            self._say((f"{exc}; no token is accepted until it can be read",))
            return ()
        settled = time.time_ns() - version.modified_ns >= SETTLED_NS
        self._version = version if settled else None
        self._say(_problems(self._path, lines))
        return _digests(lines.tokens)

    def _say(self, problems: tuple[str, ...]) -> None:
        if problems != self._said:
            for problem in problems:
                log.warning("%s", problem)
        self._said = problems


def require_token(wsgi_app: WSGIApplication, tokens: Iterable[str] | None,
                  tokens_file: str | None = None) -> WSGIApplication:
    """Wrap `wsgi_app` so that every path but OPEN_PATHS needs one of the tokens
    `tokens_file` holds (read again when it changes) or, without a file, one of `tokens`.
    Neither (None): no check, the API is open. No token at all: every guarded request is
    refused."""
    if tokens_file:
        current = TokenFile(tokens_file).current
    elif tokens is not None:
        current = _fixed(_digests(tokens))
    else:
        return wsgi_app

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "") not in OPEN_PATHS:
            refusal = _check(environ.get("HTTP_AUTHORIZATION"), current())
            if refusal is not None:
                headers, body = refusal
                start_response(STATUS, headers)
                return [body]
        return wsgi_app(environ, start_response)

    return app


def _fixed(digests: tuple[bytes, ...]) -> Callable[[], tuple[bytes, ...]]:
    return lambda: digests


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
