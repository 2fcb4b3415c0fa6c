"""End-to-end smoke checks of a running stack, through its published URL.

`run_smoke(base_url, token)` is used by `orchestrate up`/`smoke` and by the compose/swarm tests.
It prints one line per check and returns True only when every check passed. With a token
(the stack's API token) every request sends it, and one check makes sure a request without
it is refused. Stdlib only (urllib), so it needs no test dependencies.
"""

from __future__ import annotations

import json
import secrets
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .output import say

TIMEOUT_S = 10
# A check that met X-Cache BYPASS (Redis out of use for the breaker's cooldown, 1 s by default:
# a command slower than its timeout on a busy host) is run again after this, at most twice; a
# cache that stays out of use still fails it.
BYPASS_WAIT_S, BYPASS_RETRIES = 1.5, 2


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: Any

    @property
    def cache(self) -> str:
        return self.headers.get("x-cache", "")


class CheckFailed(Exception):
    def __init__(self, message: str, bypassed: bool = False) -> None:
        super().__init__(message)
        self.bypassed = bypassed


def call(
    base_url: str, method: str, path: str, payload: Any = None, token: str | None = None,
    context: ssl.SSLContext | None = None,
) -> Reply:
    """One HTTP request (an https one trusted with `context`); any status is a Reply, only
    transport errors raise."""
    data = None if payload is None else json.dumps(payload).encode()
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(
        base_url.rstrip("/") + path, data=data, method=method, headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S, context=context) as response:
            status, headers, raw = response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        status, headers, raw = exc.code, exc.headers, exc.read()
    try:
        body = json.loads(raw) if raw else None
    except ValueError:
        body = raw.decode(errors="replace")[:200]
    return Reply(status, {k.lower(): v for k, v in headers.items()}, body)


def expect(condition: bool, what: str, reply: Reply) -> None:
    if not condition:
        raise CheckFailed(
            f"{what} (HTTP {reply.status}, X-Cache {reply.cache or '-'}, "
            f"body {json.dumps(reply.body)[:200]})", bypassed=reply.cache == "BYPASS"
        )


@dataclass
class Smoke:
    """The checks, in order; later checks use the user the first one created."""

    base_url: str
    token: str | None = None
    context: ssl.SSLContext | None = None
    tag: str = field(default_factory=lambda: secrets.token_hex(4))
    user: dict[str, Any] = field(default_factory=dict)

    def call(self, method: str, path: str, payload: Any = None) -> Reply:
        return call(self.base_url, method, path, payload, self.token, self.context)

    def get(self, path: str) -> Reply:
        return self.call("GET", path)

    def create(self) -> None:
        payload = {
            "username": f"smoke_{self.tag}",
            "email": f"smoke-{self.tag}@example.com",
            "display_name": "Smoke Test",
        }
        reply = self.call("POST", "/users", payload)
        expect(reply.status == 201, "want 201", reply)
        self.user = reply.body["data"]
        expect(self.user.get("username") == payload["username"], "username echoed", reply)
        location = reply.headers.get("location", "")
        expect(location.endswith(f"/users/{self.user['id']}"), "Location header", reply)

    def read_by_id(self) -> None:
        reply = self.get(f"/users/{self.user['id']}")
        expect(
            reply.status == 200 and reply.body["data"]["id"] == self.user["id"],
            "want 200 with the user",
            reply,
        )
        expect(reply.cache == "HIT", "want X-Cache HIT after write-through", reply)

    def _read_by(self, key: str) -> None:
        reply = self.get(f"/users?{key}={urllib.parse.quote(self.user[key])}")
        found = reply.body.get("data") if isinstance(reply.body, dict) else None
        expect(
            reply.status == 200 and [u["id"] for u in found or []] == [self.user["id"]],
            "want 200 with exactly the user",
            reply,
        )
        expect(reply.cache == "HIT", "want X-Cache HIT after write-through", reply)

    def read_by_username(self) -> None:
        self._read_by("username")

    def read_by_email(self) -> None:
        self._read_by("email")

    def miss_then_hit(self) -> None:
        path = f"/users?username=absent_{secrets.token_hex(6)}"
        first, second = self.get(path), self.get(path)
        for reply, want in ((first, "MISS"), (second, "HIT")):
            expect(
                reply.status == 200 and reply.body.get("data") == [],
                "want 200 with an empty list",
                reply,
            )
            expect(reply.cache == want, f"want X-Cache {want}", reply)

    def not_found(self) -> None:
        reply = self.get(f"/users/{2**31 - 1 - secrets.randbelow(1000)}")
        expect(
            reply.status == 404 and "error" in (reply.body or {}),
            "want 404 with an error object",
            reply,
        )

    def update(self) -> None:
        path = f"/users/{self.user['id']}"
        reply = self.call("PATCH", path, {"display_name": "Smoke Updated"})
        expect(reply.status == 200, "want 200", reply)
        reply = self.get(path)
        expect(
            reply.status == 200 and reply.body["data"]["display_name"] == "Smoke Updated",
            "want the new display_name on read-back",
            reply,
        )

    def delete(self) -> None:
        path = f"/users/{self.user['id']}"
        reply = self.call("DELETE", path)
        expect(reply.status == 204, "want 204", reply)
        reply = self.get(path)
        expect(reply.status == 404, "want 404 after delete", reply)

    def bad_payload(self) -> None:
        reply = self.call("POST", "/users", {"username": "x", "email": "nope"})
        expect(
            reply.status == 400 and "error" in (reply.body or {}),
            "want 400 with an error object",
            reply,
        )

    def no_token(self) -> None:
        reply = call(self.base_url, "GET", f"/users/{self.user['id']}", context=self.context)
        expect(
            reply.status == 401 and "error" in (reply.body or {})
            and reply.headers.get("www-authenticate", "").startswith("Bearer"),
            "want 401 with WWW-Authenticate: Bearer",
            reply,
        )

    def checks(self) -> list[tuple[str, Callable[[], None]]]:
        refusal = [("no token: 401", self.no_token)] if self.token else []
        return [
            ("create user", self.create),
            *refusal,
            ("read by id (write-through HIT)", self.read_by_id),
            ("read by username (HIT)", self.read_by_username),
            ("read by email (HIT)", self.read_by_email),
            ("unknown username: MISS then cached not-found HIT", self.miss_then_hit),
            ("unknown id: 404", self.not_found),
            ("update and read back", self.update),
            ("delete, then 404", self.delete),
            ("wrong payload: 400", self.bad_payload),
        ]


def run_smoke(
    base_url: str, token: str | None = None, out: Callable[[str], None] = say,
    context: ssl.SSLContext | None = None,
) -> bool:
    """Run every check against `base_url` (an https one trusted with `context`); print one
    line each; True when all pass."""
    passed = True
    for name, check in Smoke(base_url, token, context).checks():
        if not passed:
            out(f"smoke skip {name}")
            continue
        started = time.monotonic()
        try:
            bypasses = run_check(check)
        except (CheckFailed, OSError, KeyError, TypeError, AttributeError) as exc:
            out(f"smoke FAIL {name}: {exc}")
            passed = False
            continue
        again = f", again after {bypasses} BYPASS" if bypasses else ""
        out(f"smoke ok   {name} ({(time.monotonic() - started) * 1000:.0f} ms{again})")
    return passed


def run_check(check: Callable[[], None]) -> int:
    """Run `check`, again after a BYPASS (BYPASS_RETRIES); how many BYPASSes it met."""
    bypasses = 0
    while True:
        try:
            check()
            return bypasses
        except CheckFailed as exc:
            if not exc.bypassed or bypasses == BYPASS_RETRIES:
                raise
        bypasses += 1
        time.sleep(BYPASS_WAIT_S)
