"""Redis connections for the cache's hot path: redis-py connections used directly.

redis-py's client layer (command dispatch, pool checkout, retry wrapper, script objects)
costs about as much CPU as the round trip itself (measured here: 64 µs per EVALSHA through
the client, 36 µs on a connection). The cache sends a handful of commands and scripts and
handles every failure itself (see Breaker in cache.py), so it talks to connections from a
small LIFO pool of its own.

A command whose reply does not matter to the caller (a fill: the reader already has its
answer) can be sent without waiting: its reply is read just before the connection's next
command, by which time it has normally arrived. That saves the caller one wait per miss.
Such a script goes by its SHA1 only once a reply showed that Redis has it (and whole
before that), since a NOSCRIPT reply that nobody waits for is only seen, and the script
sent again, when its connection is next used.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import redis
from redis.exceptions import NoScriptError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Script:
    """A Lua script, sent by its SHA1 once Redis knows it."""

    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())


class _Connection:
    """A redis-py connection and the replies it still owes, oldest first, each with the
    command (an EVAL) to send instead should the reply be NOSCRIPT, and its script's SHA1."""

    __slots__ = ("conn", "owed")

    def __init__(self, conn: redis.Connection) -> None:
        self.conn = conn
        self.owed: deque[tuple[tuple, str]] = deque()


class Wire:
    """Commands and scripts over pooled connections; every failure raises redis.RedisError."""

    def __init__(self, url: str, timeout: float) -> None:
        self.pool = redis.ConnectionPool.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout,
            health_check_interval=0)
        self._idle: list[_Connection] = []
        self._lock = threading.Lock()
        # SHA1s of the scripts Redis has; forgotten with every new connection, which may be
        # to a Redis that restarted.
        self._loaded: set[str] = set()

    @property
    def options(self) -> dict[str, Any]:
        """Where and as whom to connect (host, port, username, password, ...)."""
        return self.pool.connection_kwargs

    def call(self, *args: Any) -> Any:
        return self._run(args, wait=True)

    def run(self, script: Script, keys: list[str], args: list[Any], wait: bool = True) -> Any:
        """Run a script by its SHA1, or whole (which also loads it) when Redis lacks it.

        With `wait=False` the reply is not read now and None is returned.
        """
        whole = ("EVAL", script.source, len(keys), *keys, *args)
        if wait or script.sha in self._loaded:
            try:
                return self._run(("EVALSHA", script.sha, len(keys), *keys, *args), wait, whole,
                                 script.sha)
            except NoScriptError:
                self._loaded.discard(script.sha)
        return self._run(whole, wait, whole, script.sha)

    def _run(self, command: tuple, wait: bool, fallback: tuple = (), sha: str = "") -> Any:
        with self._lock:
            pooled = self._idle.pop() if self._idle else None
        if pooled is None:
            self._loaded.clear()
            pooled = _Connection(self.pool.make_connection())
        try:
            self._settle(pooled)
            pooled.conn.send_command(*command)
            if wait:
                reply = pooled.conn.read_response()
                if sha:
                    self._loaded.add(sha)
            else:
                pooled.owed.append((fallback, sha))
                reply = None
        except redis.ResponseError:
            self._give_back(pooled)  # an error reply leaves the connection usable
            raise
        except BaseException:
            pooled.conn.disconnect()
            raise
        self._give_back(pooled)
        return reply

    def _settle(self, pooled: _Connection) -> None:
        """Read the replies of commands sent without waiting; their errors only get logged."""
        while pooled.owed:
            fallback, sha = pooled.owed.popleft()
            try:
                pooled.conn.read_response()
                self._loaded.add(sha)
            except NoScriptError:
                self._loaded.discard(sha)
                pooled.conn.send_command(*fallback)
                pooled.owed.append((fallback, sha))
            except redis.ResponseError as exc:
                log.warning("unawaited redis command failed: %s", exc)

    def _give_back(self, pooled: _Connection) -> None:
        with self._lock:
            self._idle.append(pooled)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for pooled in idle:
            pooled.conn.disconnect()
