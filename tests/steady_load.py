"""A steady mix of reads and writes through a stack's published port, counting every request
that fails, for the tests of what must not fail a request (rotation, updates, a killed replica).

Each request is timed and its outcome kept: a failure is a transport error, a 5xx, a 401 (the
token was refused) or any answer the request could not have had (a 404 for a user this client
created and never deleted). The token is read again before every request from a callable, so
a test can rotate it underneath.
"""

from __future__ import annotations

import collections
import itertools
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import requests


@dataclass(frozen=True)
class Failure:
    at: float  # time.monotonic()
    what: str  # e.g. "GET /users/7 -> 503"


@dataclass
class SteadyLoad:
    """`rate` requests a second from `workers` threads until stopped: 20% creates, 20%
    updates, 45% reads by id, 15% reads by username, all of this client's own users."""

    url: str
    token: Callable[[], str]
    rate: float = 200.0
    workers: int = 4
    failures: list[Failure] = field(default_factory=list)
    requests_sent: int = 0
    # The X-Cache header of the reads answered: HIT, MISS, BYPASS (Redis not in use).
    cache_answers: collections.Counter = field(default_factory=collections.Counter)
    _users: list[dict] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)
    _names: itertools.count = field(default_factory=itertools.count)
    _tag: str = field(default_factory=lambda: f"{random.getrandbits(32):08x}")

    def __enter__(self) -> SteadyLoad:
        for _ in range(self.workers):
            thread = threading.Thread(target=self._run, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=15)

    def _run(self) -> None:
        session = requests.Session()
        pause = self.workers / self.rate
        while not self._stop.is_set():
            started = time.monotonic()
            self._one(session)
            time.sleep(max(0.0, pause - (time.monotonic() - started)))

    def _one(self, session: requests.Session) -> None:
        headers = {"Authorization": f"Bearer {self.token()}"}
        with self._lock:
            self.requests_sent += 1
            user = random.choice(self._users) if self._users else None
        roll = random.random()
        if user is None or roll < 0.2:
            name = f"load_{self._tag}_{next(self._names)}"
            method, path = "POST", "/users"
            body: dict | None = {"username": name, "email": f"{name}@example.org"}
            want = 201
        elif roll < 0.4:
            method, path, want = "PATCH", f"/users/{user['id']}", 200
            body = {"display_name": f"v{random.getrandbits(20)}"}
        elif roll < 0.85:
            method, path, body, want = "GET", f"/users/{user['id']}", None, 200
        else:
            method, path, body, want = "GET", f"/users?username={user['username']}", None, 200
        try:
            reply = session.request(method, self.url + path, json=body, headers=headers,
                                    timeout=10)
        except requests.RequestException as exc:
            self._failed(f"{method} {path} -> {type(exc).__name__}")
            return
        if reply.status_code != want:
            self._failed(f"{method} {path} -> {reply.status_code} {reply.text[:120]}")
        elif method == "GET":
            with self._lock:
                self.cache_answers[reply.headers.get("X-Cache", "")] += 1
        elif method == "POST":
            with self._lock:
                self._users.append(reply.json()["data"])

    def _failed(self, what: str) -> None:
        with self._lock:
            self.failures.append(Failure(time.monotonic(), what))

    @property
    def users(self) -> list[dict]:
        """The users this client created (each acknowledged with a 201)."""
        with self._lock:
            return list(self._users)
