"""An in-process copy of hot users' cached values, kept correct by Redis itself.

A dedicated connection turns on server-assisted client-side caching in broadcast mode
(`CLIENT TRACKING on REDIRECT <self> BCAST PREFIX <...>changed:`, Redis 6+) and
subscribes to `__redis__:invalidate`: Redis then publishes every change of a key under
that prefix to it, including FLUSHALL (as "everything"). Every write touches
`changed:<id>` for each user it changes (cache.py), so the message names the user.

Why a read after an acknowledged write does not see old data: Redis writes the
invalidation out in the same event-loop pass as the writer's own reply (before it, in
Redis 7's pending-write order), so by the time the writer has its reply, and long
before its HTTP response reaches a client that then asks again, the message is in this
process's socket buffer; every `get` drains that socket before it answers. When the
connection breaks, everything is dropped and the near cache stays off until a new
connection is subscribed.

Requests drain the socket as they come. When they do not come (an idle worker, or one
that only writes or looks users up by name), a thread of its own drains it, so Redis
never keeps what it could not send: without it, each listener had 3 MB waiting in Redis
after 20 s of creates, and Redis drops a subscriber at 32 MB.

That holds while Redis can write to the socket. A worker that falls behind (drains slower
than others write) lets the socket buffers fill, and then Redis keeps the newest messages in
its own memory, where no drain can see them, and still answers writers. Buffers can only
be full with more than BEHIND_BYTES waiting, so a drain that finds that much drops
everything instead of trusting what it read.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable

import hiredis
import redis

CHANNEL = b"__redis__:invalidate"
RETRY_SECONDS = 1.0  # between attempts to subscribe again
# Full socket buffers hold far more than this. Measured on Linux 6.18 with default buffer
# sizes: Redis first kept messages of its own after 23,000-35,000 unread ones, with
# 76-93 KB of them waiting in this socket and the rest in Redis's send buffer.
BEHIND_BYTES = 4096
# A listener that no request drained for this long is drained by the near cache's thread.
IDLE_DRAIN_SECONDS = 0.02


def _none() -> int:
    return 0


class InvalidationListener:
    """A subscribed socket that reports what changed under `prefix` since the last drain
    (as the rest of each key's name: the user's id).

    redis-py connects it, exactly as it connects the cache's pool (address, TLS with its
    certificate and host name checks, credentials), so that a `rediss://` URL never leads
    to a plaintext byte here either. From then on the listener reads the socket itself,
    without redis-py's parser, so that a drain with nothing waiting costs one recv.
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
        # Asking whether anything waits costs a third of a recv that finds nothing (which
        # raises), and a drain usually finds nothing. With TLS, bytes already decrypted
        # wait inside the SSL object, where poll cannot see them.
        self._poll = select.poll()
        self._poll.register(self._sock, select.POLLIN)
        self._decrypted = self._sock.pending if isinstance(self._sock, ssl.SSLSocket) else _none

    def _ask(self, *parts: str | bytes | int) -> object:
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


class NearCache:
    """Users' cached values by id: at most `size`, each for at most `max_age` seconds, never
    past an invalidation."""

    def __init__(self, connect: Callable[[], InvalidationListener], size: int,
                 max_age: float) -> None:
        self._connect = connect
        self._size = size
        self._max_age = max_age
        self._values: dict[str, tuple[bytes, float]] = {}
        self._listener: InvalidationListener | None = None
        # Bumped whenever invalidations are applied or the subscription changes. A value read
        # from Redis is kept only if the epoch has not moved since the read began: otherwise
        # another thread may already have drained the invalidation that makes it old.
        self.epoch = 0
        self._retry_at = 0.0
        self._drained_at = 0.0
        self._drainer: threading.Thread | None = None
        self._lock = threading.Lock()

    def _drain(self) -> bool:
        """Apply pending invalidations; False (and nothing cached) without a healthy listener."""
        if self._listener is None:
            if time.monotonic() < self._retry_at:
                return False
            self._subscribe()  # the listener broke while Redis itself kept answering
            return False
        try:
            changed = self._listener.drain()
        except OSError:
            self._drop_listener()
            return False
        self._drained_at = time.monotonic()
        if changed is None:
            self._values.clear()
            self.epoch += 1
        elif changed:
            for key in changed:
                self._values.pop(key, None)
            self.epoch += 1
        return True

    def _drain_when_idle(self) -> None:
        """Drain a listener that has something waiting and no request drained lately."""
        while True:
            listener = self._listener
            if listener is None:
                time.sleep(RETRY_SECONDS)
            elif listener.wait(RETRY_SECONDS):
                time.sleep(IDLE_DRAIN_SECONDS)  # time for a request to drain it first
                with self._lock:
                    if (self._listener is listener
                            and time.monotonic() - self._drained_at >= IDLE_DRAIN_SECONDS):
                        self._drain()

    def get(self, key: str) -> bytes | None:
        with self._lock:
            if not self._drain():
                return None
            found = self._values.get(key)
            if found is None:
                return None
            if found[1] < time.monotonic():
                del self._values[key]
                return None
            return found[0]

    def put(self, key: str, value: bytes, epoch: int) -> None:
        """Keep a value that was read from Redis after `epoch` was current."""
        with self._lock:
            if self._listener is None or epoch != self.epoch:
                return
            if len(self._values) >= self._size:
                del self._values[next(iter(self._values))]
            self._values[key] = (value, time.monotonic() + self._max_age)

    def start(self) -> None:
        """Subscribe (again) after a (re)connection to Redis; errors leave it off."""
        with self._lock:
            if self._listener is None:
                self._subscribe()

    def _subscribe(self) -> None:
        self._retry_at = time.monotonic() + RETRY_SECONDS
        with contextlib.suppress(OSError, redis.RedisError):
            self._listener = self._connect()
            self.epoch += 1
        if self._listener and (self._drainer is None or not self._drainer.is_alive()):
            self._drainer = threading.Thread(target=self._drain_when_idle,
                                             name="near-cache-drainer", daemon=True)
            self._drainer.start()

    def stop(self) -> None:
        """Redis may have changed without telling us: forget everything."""
        with self._lock:
            self._drop_listener()

    def _drop_listener(self) -> None:
        self._values.clear()
        self.epoch += 1
        if self._listener is not None:
            self._listener.close()
            self._listener = None
