"""The service's commands and scripts to Redis: a small pool of connections (RedisClient).

It uses redis-py's connections (which connect, verify TLS and log in) and nothing above them:
the cache sends a handful of commands and handles every failure itself (cache/policy.py), so
redis-py's client layer would only add CPU to every call. Every connection, the near cache's
listener's too (listener.py), is made by one redis-py ConnectionPool, so none can connect
differently, and each new one asks the password source for the password as it is now (it can
rotate). Every failure raises redis.RedisError or OSError. docs/design.md says why it queues
unawaited fills.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import redis
from redis.connection import parse_url
from redis.credentials import CredentialProvider
from redis.exceptions import NoScriptError

from ..settings import RedisSettings
from .listener import InvalidationListener

log = logging.getLogger(__name__)

# How long a command sent without waiting may wait for another to go out with; the flusher
# wakes at most this often. Long enough that its wake-ups cost less than the coalescing
# saves (much shorter waits ate the gain), short enough that a quiet worker holds a fill,
# and with it its lease, only briefly (bench/README.md, "Measurements behind the code").
FLUSH_AFTER = 0.005


@dataclass(frozen=True)
class Script:
    """A Lua script, sent by its SHA1 once Redis knows it."""

    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())


class _LoginNow(CredentialProvider):
    """The URL's user, with the password its source holds when a connection logs in."""

    def __init__(self, username: str | None, password: Callable[[], str]) -> None:
        self._username = username
        self._password = password

    def get_credentials(self) -> tuple[str] | tuple[str, str]:
        if self._username:
            return self._username, self._password()
        return (self._password(),)


def _connection_pool(url: str, timeout: float,
                     password: Callable[[], str] | None) -> redis.ConnectionPool:
    """The pool that makes every connection: `url`'s address, TLS and user, and `password`'s
    password at each login when given (instead of the URL's)."""
    options = parse_url(url)
    if password is not None:
        options.pop("password", None)
        options["credential_provider"] = _LoginNow(options.pop("username", None), password)
    # Without a library name and version redis-py sends no CLIENT SETINFO on connecting:
    # a round trip per connection, and a command the service's Redis user may not run.
    return redis.ConnectionPool(**{
        "socket_timeout": timeout, "socket_connect_timeout": timeout,
        "health_check_interval": 0, "lib_name": None, "lib_version": None, **options})


class _QueuingConnection:
    """A redis-py connection, the commands it has yet to send (packed), and the replies it
    still owes, oldest first, each with the command (an EVAL) to send instead should the
    reply be NOSCRIPT, and its script's SHA1."""

    __slots__ = ("conn", "unsent", "owed")

    def __init__(self, conn: redis.Connection) -> None:
        self.conn = conn
        self.unsent: list[bytes] = []
        self.owed: deque[tuple[tuple, str]] = deque()

    def send_unsent(self) -> None:
        """Write every unsent command, in one write."""
        if self.unsent:
            packed, self.unsent = b"".join(self.unsent), []
            self.conn.send_packed_command([packed], check_health=False)

    def queue(self, command: tuple, fallback: tuple, sha: str) -> None:
        """Hold `command` until this connection's next write; its reply is owed until then."""
        self.unsent += self.conn.pack_command(*command)
        self.owed.append((fallback, sha))


class RedisClient:
    """Commands and scripts over a small LIFO pool of connections.

    A command whose reply does not matter to the caller (a fill: the reader already has its
    answer) is not sent at once: it waits on its connection for the next command, and both
    go out in one write, their replies come back in one read, and Redis handles both in one
    pass of its event loop. That is Nagle's algorithm applied to commands, or what Node's
    Redis client does for every command (auto-pipelining): one system call and one wake-up
    instead of two, on both sides. A flusher thread sends whatever still waits after
    FLUSH_AFTER, so a quiet worker delays a fill by a few milliseconds, never indefinitely;
    and a fill is conditional on its lease, so a late one is never a stale one.

    Replies owed for such commands are read before the next command's own. A script queued
    this way goes by its SHA1 only once a reply showed that Redis has it (whole before that),
    and one that still meets NOSCRIPT (after a SCRIPT FLUSH) is queued again whole.
    """

    def __init__(self, settings: RedisSettings) -> None:
        password = settings.password.read if settings.password else None
        self.pool = _connection_pool(settings.url, settings.timeout, password)
        self._idle: list[_QueuingConnection] = []
        self._lock = threading.Lock()
        # SHA1s of the scripts Redis has; forgotten with every new connection, which may be
        # to a Redis that restarted.
        self._loaded: set[str] = set()
        self._unsent_waiting = threading.Event()
        self._flusher: threading.Thread | None = None

    def invalidation_listener(self, prefix: str) -> InvalidationListener:
        """A new listener for changes of keys under `prefix`, on a connection of its own that
        connects as the pool's do."""
        return InvalidationListener(self.pool.make_connection(), prefix)

    def command(self, *args: Any) -> Any:
        """Send one command and return its reply."""
        return self._execute(args, wait=True)

    def run_script(self, script: Script, keys: list[str], argv: list[Any],
                   wait: bool = True) -> Any:
        """Run a script by its SHA1, or whole (which also loads it) when Redis lacks it.

        With `wait=False` the script is sent with the connection's next command (or by the
        flusher) and None is returned.
        """
        whole = ("EVAL", script.source, len(keys), *keys, *argv)
        if wait or script.sha in self._loaded:
            try:
                return self._execute(("EVALSHA", script.sha, len(keys), *keys, *argv), wait,
                                     whole, script.sha)
            except NoScriptError:
                self._loaded.discard(script.sha)
        return self._execute(whole, wait, whole, script.sha)

    def _execute(self, command: tuple, wait: bool, fallback: tuple = (), sha: str = "") -> Any:
        with self._lock:
            pooled = self._idle.pop() if self._idle else None
        if pooled is None:
            self._loaded.clear()
            pooled = _QueuingConnection(self.pool.make_connection())
        if not wait:
            try:
                pooled.queue(command, fallback, sha)
            finally:
                self._release(pooled)  # which wakes the flusher
            return None
        again: list[tuple[tuple, str]] = []
        try:
            pooled.unsent += pooled.conn.pack_command(*command)
            pooled.send_unsent()
            again = self._read_owed_replies(pooled)
            reply = pooled.conn.read_response()
            if sha:
                self._loaded.add(sha)
        except redis.ResponseError:
            self._release(pooled, again)  # an error reply leaves the connection usable
            raise
        except BaseException:
            pooled.conn.disconnect()
            raise
        self._release(pooled, again)
        return reply

    def _read_owed_replies(self, pooled: _QueuingConnection) -> list[tuple[tuple, str]]:
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

    def _release(self, pooled: _QueuingConnection,
                 again: Iterable[tuple[tuple, str]] = ()) -> None:
        """Back into the pool, with `again` queued on it; wake the flusher if it holds any."""
        for fallback, sha in again:
            pooled.queue(fallback, fallback, sha)
        with self._lock:
            self._idle.append(pooled)
        if pooled.unsent:
            self._wake_flusher()

    def _wake_flusher(self) -> None:
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
                pooled.send_unsent()
            except (redis.RedisError, OSError) as exc:
                log.warning("unawaited redis commands not sent: %s", type(exc).__name__)
                pooled.conn.disconnect()
                continue
            self._release(pooled)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for pooled in idle:
            pooled.conn.disconnect()
