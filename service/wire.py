"""Redis connections for the cache's hot path: redis-py connections used directly.

redis-py's client layer (command dispatch, pool checkout, retry wrapper, script objects)
costs about as much CPU as the round trip itself (measured here: 64 µs per EVALSHA through
the client, 36 µs on a connection). The cache sends a handful of commands and scripts and
handles every failure itself (see Breaker in cache.py), so it talks to connections from a
small LIFO pool of its own.

A command whose reply does not matter to the caller (a fill: the reader already has its
answer) is not sent at once: it waits on its connection for the next command, and both
go out in one write, their replies come back in one read, and Redis handles both in one
pass of its event loop. That is Nagle's algorithm applied to commands, or what Node's
Redis client does for every command (auto-pipelining); here it made misses about 10%
faster. A flusher thread sends whatever still waits after FLUSH_AFTER, so a quiet worker
delays a fill by a few milliseconds, never indefinitely; and a fill is conditional on its
lease, so a late one is never a stale one.

Replies owed for such commands are read before the next command's own. A script queued
this way goes by its SHA1 only once a reply showed that Redis has it (whole before that),
and one that still meets NOSCRIPT (after a SCRIPT FLUSH) is queued again whole.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import redis
from redis.exceptions import NoScriptError

log = logging.getLogger(__name__)

# How long a command sent without waiting may wait for another to go out with. The
# flusher wakes at most this often; at 1 ms its wake-ups cost about what the coalescing
# saved, at 5 ms misses were 7-18% faster than without coalescing (4 A/B rounds).
FLUSH_AFTER = 0.005


@dataclass(frozen=True)
class Script:
    """A Lua script, sent by its SHA1 once Redis knows it."""

    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())


class _Connection:
    """A redis-py connection, the commands it has yet to send (packed), and the replies it
    still owes, oldest first, each with the command (an EVAL) to send instead should the
    reply be NOSCRIPT, and its script's SHA1."""

    __slots__ = ("conn", "unsent", "owed")

    def __init__(self, conn: redis.Connection) -> None:
        self.conn = conn
        self.unsent: list[bytes] = []
        self.owed: deque[tuple[tuple, str]] = deque()

    def send(self) -> None:
        """Write every unsent command, in one write."""
        if self.unsent:
            packed, self.unsent = b"".join(self.unsent), []
            self.conn.send_packed_command([packed], check_health=False)

    def later(self, command: tuple, fallback: tuple, sha: str) -> None:
        self.unsent += self.conn.pack_command(*command)
        self.owed.append((fallback, sha))


class Wire:
    """Commands and scripts over pooled connections; every failure raises redis.RedisError."""

    def __init__(self, url: str, timeout: float) -> None:
        # Without a library name and version redis-py sends no CLIENT SETINFO on connecting:
        # a round trip per connection, and a command the service's Redis user may not run.
        self.pool = redis.ConnectionPool.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout,
            health_check_interval=0, lib_name=None, lib_version=None)
        self._idle: list[_Connection] = []
        self._lock = threading.Lock()
        # SHA1s of the scripts Redis has; forgotten with every new connection, which may be
        # to a Redis that restarted.
        self._loaded: set[str] = set()
        self._unsent_waiting = threading.Event()
        self._flusher: threading.Thread | None = None

    def connection(self) -> redis.connection.AbstractConnection:
        """A new connection, not yet connected, that will connect as the pool's do (address,
        TLS and its checks, credentials): for a caller that keeps it to itself."""
        return self.pool.make_connection()

    def call(self, *args: Any) -> Any:
        return self._run(args, wait=True)

    def run(self, script: Script, keys: list[str], args: list[Any], wait: bool = True) -> Any:
        """Run a script by its SHA1, or whole (which also loads it) when Redis lacks it.

        With `wait=False` the script is sent with the connection's next command (or by the
        flusher) and None is returned.
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
        if not wait:
            try:
                pooled.later(command, fallback, sha)
            finally:
                self._give_back(pooled)  # which calls the flusher
            return None
        again: list[tuple[tuple, str]] = []
        try:
            pooled.unsent += pooled.conn.pack_command(*command)
            pooled.send()
            again = self._settle(pooled)
            reply = pooled.conn.read_response()
            if sha:
                self._loaded.add(sha)
        except redis.ResponseError:
            self._give_back(pooled, again)  # an error reply leaves the connection usable
            raise
        except BaseException:
            pooled.conn.disconnect()
            raise
        self._give_back(pooled, again)
        return reply

    def _settle(self, pooled: _Connection) -> list[tuple[tuple, str]]:
        """Read the replies owed for commands sent earlier; their errors only get logged.
        Returns the scripts that met NOSCRIPT, to be sent again whole."""
        again = []
        while pooled.owed:
            fallback, sha = pooled.owed.popleft()
            try:
                pooled.conn.read_response()
                self._loaded.add(sha)
            except NoScriptError:
                self._loaded.discard(sha)
                again.append((fallback, sha))
            except redis.ResponseError as exc:
                log.warning("unawaited redis command failed: %s", exc)
        return again

    def _give_back(self, pooled: _Connection, again: Iterable[tuple[tuple, str]] = ()) -> None:
        for fallback, sha in again:
            pooled.later(fallback, fallback, sha)
        with self._lock:
            self._idle.append(pooled)
        if pooled.unsent:
            self._flush_soon()

    def _flush_soon(self) -> None:
        self._unsent_waiting.set()
        if self._flusher is None or not self._flusher.is_alive():  # none yet, or forked
            with self._lock:
                if self._flusher is None or not self._flusher.is_alive():
                    self._flusher = threading.Thread(target=self._flush_forever,
                                                     name="redis-flusher", daemon=True)
                    self._flusher.start()

    def _flush_forever(self) -> None:
        """Flush FLUSH_AFTER after a command was queued, for as long as commands are."""
        while True:
            self._unsent_waiting.wait()
            time.sleep(FLUSH_AFTER)
            self._unsent_waiting.clear()
            self.flush()

    def flush(self) -> None:
        """Send now what idle connections hold; their replies are read on their next use."""
        with self._lock:
            holding = [pooled for pooled in self._idle if pooled.unsent]
            self._idle = [pooled for pooled in self._idle if not pooled.unsent]
        for pooled in holding:
            try:
                pooled.send()
            except (redis.RedisError, OSError) as exc:
                log.warning("unawaited redis commands not sent: %s", type(exc).__name__)
                pooled.conn.disconnect()
                continue
            self._give_back(pooled)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for pooled in idle:
            pooled.conn.disconnect()
