"""Each worker's own copy of users' cached values by id (least recently used go first),
kept correct by Redis itself: a listener (wire/listener.py) hears of every write's
`changed:<id>` and of every flush, and every `get` drains it before it answers, so no read
that starts after an acknowledged write sees the old value (docs/design.md, "The near cache").

Requests drain the socket as they come; a thread of its own drains it when they do not (an
idle worker, one that only writes or looks users up by name), or Redis would keep what it
could not send until it dropped the subscriber at its limit. A drain that finds more waiting
than a listener that keeps up ever has (listener.BEHIND_BYTES) may be reading full socket
buffers while Redis holds newer messages: the near cache then drops everything.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import OrderedDict
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
        # Least recently used first: a hit moves its user to the end, a put evicts the first.
        self._values: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
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
            self._values.move_to_end(key)
            return found[0]

    def put(self, key: str, value: bytes, epoch: int) -> None:
        """Keep a value that was read from Redis after `epoch` was current."""
        with self._lock:
            if self._listener is None or epoch != self.epoch:
                return
            if key not in self._values and len(self._values) >= self._size:
                self._values.popitem(last=False)
            self._values[key] = (value, time.monotonic() + self._max_age)
            self._values.move_to_end(key)

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
