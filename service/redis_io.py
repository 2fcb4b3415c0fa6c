"""Every byte the service exchanges with Redis: a pool of connections that sends commands
and scripts (RedisClient), and the near cache's invalidation listener (InvalidationListener).

Both use redis-py's connections and nothing above them. redis-py's client layer (command
dispatch, pool checkout, retry wrapper, script objects) costs about as much CPU as a round
trip itself, and the cache needs none of it: it sends a handful of commands and scripts and
handles every failure itself (cache.py, breaker.py). A redis-py connection still does the
connecting (address, TLS with its certificate and host name checks, credentials); the pool's
connections and the listener's are all made by one redis-py ConnectionPool, so they cannot
connect differently, and a `rediss://` URL never leads to a plaintext byte. Given a password
source, every new connection asks it for the password as it is now, so the Redis user's
password can rotate under a running service. Every failure raises redis.RedisError or OSError.
"""

from __future__ import annotations

import hashlib
import logging
import select
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import hiredis
import redis
from redis.connection import parse_url
from redis.credentials import CredentialProvider
from redis.exceptions import NoScriptError

log = logging.getLogger(__name__)

# How long a command sent without waiting may wait for another to go out with; the flusher
# wakes at most this often. Long enough that its wake-ups cost less than the coalescing
# saves (much shorter waits ate the gain), short enough that a quiet worker holds a fill,
# and with it its lease, only briefly (bench/README.md, "Measurements behind the code").
FLUSH_AFTER = 0.005
CHANNEL = b"__redis__:invalidate"  # where Redis publishes what CLIENT TRACKING saw change
# A listener that keeps up finds far less than this waiting, and full socket buffers hold
# many times more (measured: bench/README.md). A drain that finds this much may be reading
# buffers that were full, while Redis keeps newer messages in its own memory.
BEHIND_BYTES = 4096


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

    def __init__(self, url: str, timeout: float, password: Callable[[], str] | None = None) -> None:
        self.pool = _connection_pool(url, timeout, password)
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


def _nothing_decrypted() -> int:
    return 0


class InvalidationListener:
    """A socket subscribed to Redis's client-side-caching broadcasts for the keys under
    `prefix` (CLIENT TRACKING on REDIRECT <itself> BCAST PREFIX <prefix>, Redis 6+): each
    drain reports what changed since the last one, as the rest of each key's name.

    redis-py connects it and logs it in; from then on the listener reads the socket itself,
    without redis-py's parser, so that a drain with nothing waiting costs one poll. Redis
    also publishes a FLUSHALL here (as "everything").
    """

    def __init__(self, connection: redis.connection.AbstractConnection, prefix: str) -> None:
        self._prefix_length = len(prefix.encode())
        self._reader = hiredis.Reader()
        connection.connect()  # and logs in; nothing is left unread after that
        self._connection = connection
        self._sock: socket.socket = connection._sock  # redis-py has no public accessor
        try:
            client_id = self._ask("CLIENT", "ID")
            self._ask("CLIENT", "TRACKING", "on", "REDIRECT", client_id, "BCAST", "PREFIX", prefix)
            self._ask("SUBSCRIBE", CHANNEL)
        except BaseException:
            connection.disconnect()
            raise
        self._sock.setblocking(False)
        # Asking whether anything waits costs far less than a recv that finds nothing (which
        # raises), and a drain usually finds nothing. With TLS, bytes already decrypted
        # wait inside the SSL object, where poll cannot see them.
        self._poll = select.poll()
        self._poll.register(self._sock, select.POLLIN)
        self._decrypted = (self._sock.pending if isinstance(self._sock, ssl.SSLSocket)
                           else _nothing_decrypted)

    def _ask(self, *parts: str | bytes | int) -> object:
        """One command and its reply, while the socket still blocks (before the first drain)."""
        self._sock.sendall(hiredis.pack_command(parts))
        while (reply := self._reader.gets()) is False:
            data = self._sock.recv(4096)
            if not data:
                raise ConnectionError("redis closed the connection")
            self._reader.feed(data)
        if isinstance(reply, hiredis.ReplyError):
            raise ConnectionError(str(reply))
        return reply

    def drain(self) -> list[str] | None:
        """What changed since the last call; None means "everything" (a flush, or this
        listener fell behind and Redis may hold messages it could not send yet)."""
        waiting = 0
        while self._readable():
            try:
                data = self._sock.recv(65536)
            except (BlockingIOError, ssl.SSLWantReadError):  # a TLS record not yet whole
                break
            if not data:
                raise ConnectionError("redis closed the invalidation connection")
            waiting += len(data)
            self._reader.feed(data)
        changed: list[str] | None = []
        while (message := self._reader.gets()) is not False:
            if isinstance(message, list) and len(message) == 3 and message[1] == CHANNEL:
                if message[2] is None:
                    changed = None
                elif changed is not None:
                    changed += (key[self._prefix_length:].decode() for key in message[2])
        return None if waiting >= BEHIND_BYTES else changed

    def _readable(self) -> bool:
        """Whether a recv would find something now, or the connection broke. (The poll object
        is the drains', which run one at a time: a poll object takes one caller at once.)"""
        return bool(self._decrypted() or self._poll.poll(0))

    def wait(self, timeout: float) -> bool:
        """Whether anything arrives within `timeout` seconds (False at once when closed)."""
        if self._decrypted():
            return True
        try:
            return bool(select.select([self._sock], [], [], timeout)[0])
        except (OSError, ValueError):
            return False

    def close(self) -> None:
        self._connection.disconnect()
