"""An in-process copy of hot users' cached values, kept correct by Redis itself.

A listener of its own (wire/listener.py) hears from Redis of every change of a
key under `changed:`, including FLUSHALL; every write touches `changed:<id>` for each user
it changes (policy.py), so the message names the user.

Why a read after an acknowledged write does not see old data: Redis writes the
invalidation out in the same event-loop pass as the writer's own reply (before it, in
Redis 7's pending-write order), so by the time the writer has its reply, and long
before its HTTP response reaches a client that then asks again, the message is in this
process's socket buffer; every `get` drains that socket before it answers. When the
connection breaks, everything is dropped and the near cache stays off until a new
connection is subscribed.

Requests drain the socket as they come. When they do not come (an idle worker, or one
that only writes or looks users up by name), a thread of its own drains it, so Redis
never keeps what it could not send: without it, the messages piled up in Redis as long as
others wrote, until Redis dropped the subscriber at its limit for them (bench/README.md,
"Measurements behind the code").

That holds while Redis can write to the socket. A worker that falls behind (drains slower
than others write) lets the socket buffers fill, and then Redis keeps the newest messages in
its own memory, where no drain can see them, and still answers writers. A drain that finds
more waiting than a listener that keeps up ever has (wire/listener.py, BEHIND_BYTES) says
"everything", and the near cache drops everything instead of trusting what it read.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable

import redis

from ..wire.client import InvalidationListener

RETRY_SECONDS = 1.0  # between attempts to subscribe again
# A listener that no request drained for this long is drained by the near cache's thread.
IDLE_DRAIN_SECONDS = 0.02


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
