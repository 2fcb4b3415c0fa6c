"""What a worker hears from Redis: every write's `changed:<id>`, every new epoch and every
flush, on one connection subscribed to Redis's broadcasts (wire/listener.py), and a
heartbeat on it that says Redis is serving (docs/design.md, "Epochs").

The near cache drains it before each answer, so that no read that starts after an
acknowledged write sees the old value; a thread of its own drains it when no request does
(an idle worker, one that only writes or looks users up by name), or Redis would keep what it
could not send until it dropped the subscriber at its limit. Every PING_EVERY it PINGs Redis
on that connection (requests do, when they drain it). Redis is `heard` while no PING went
unanswered, or unsent, for HEARTBEAT since the subscription: a Redis that hangs, or this worker
cut off from it, or not running, is not heard within HEARTBEAT, whatever the worker does.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable

import redis

from ..wire.listener import InvalidationListener
from .keys import Keys

HEARTBEAT = 2.0
PING_EVERY = HEARTBEAT / 5
RETRY_SECONDS = 1.0  # between attempts to subscribe again
# A listener that no request drained for this long is drained by the watch's thread.
IDLE_DRAIN_SECONDS = 0.02

# What a drain hands on: the ids of users that changed, or None for "everything" (a flush, a
# new epoch, a listener that fell behind or broke).
Changes = list[str] | None


class Watch:
    """This worker's subscription to what changes in Redis, and its heartbeat."""

    def __init__(self, connect: Callable[[], InvalidationListener],
                 keys: Callable[[], Keys]) -> None:
        """`connect` makes a listener for `keys()`'s broadcasts."""
        self._connect = connect
        self._keys = keys
        # Told of each change, under `lock` (the near cache, when there is one).
        self.on_change: Callable[[Changes], None] = lambda changed: None
        self.lock = threading.Lock()
        # Bumped whenever changes are applied or the subscription changes. A value read from
        # Redis is kept only if the generation has not moved since the read began: otherwise
        # another thread may already have drained the change that makes it old.
        self.generation = 0
        self._listener: InvalidationListener | None = None
        self._retry_at = 0.0
        self._drained_at = 0.0
        self._pinged_at = 0.0
        self._thread: threading.Thread | None = None
        self._closed = False

    def heard(self) -> bool:
        """Whether Redis has been heard all along since the subscription: no PING went
        unanswered, or unsent, for HEARTBEAT."""
        listener = self._listener
        return listener is not None and listener.silence() < HEARTBEAT

    def lapsed(self) -> bool:
        """Whether a subscribed listener shows that Redis went unheard for HEARTBEAT, now or at
        any time since the subscription: a hang that is over by now still lost or delayed what
        was sent during it, and a worker that was not running for that long cannot tell."""
        listener = self._listener
        return listener is not None and listener.silence() >= HEARTBEAT

    def forget_all(self) -> None:
        """Every change Redis might have told of is assumed (a new epoch is in use)."""
        with self.lock:
            self.on_change(None)
            self.generation += 1

    def current(self) -> bool:
        """Drain what is waiting (call it holding `lock`): True when every change Redis sent
        has been applied and Redis is heard; False (and everything forgotten) otherwise."""
        if self._listener is None:
            if time.monotonic() >= self._retry_at:
                self._subscribe()  # the listener broke while Redis itself kept answering
            return False
        try:
            changed = self._listener.drain()
        except OSError:
            self._drop()
            return False
        self._drained_at = time.monotonic()
        if changed is None or changed:
            self._apply(changed)
        if time.monotonic() >= self._pinged_at + PING_EVERY:  # requests keep it alive too
            self._ping(self._listener)
        return self.heard()

    def _apply(self, changed: list[str] | None) -> None:
        keys = self._keys()
        if changed is not None:
            if keys.epoch in changed:
                changed = None
            else:
                start = len(keys.changes)
                changed = [key[start:] for key in changed if key.startswith(keys.changes)]
        self.on_change(changed)
        self.generation += 1

    def start(self) -> None:
        """Subscribe (again) after a (re)connection to Redis; errors leave it off."""
        with self.lock:
            if self._listener is None:
                self._subscribe()

    def stop(self) -> None:
        """Redis may have changed without telling us: drop the listener, forget everything."""
        with self.lock:
            self._drop()

    def close(self) -> None:
        """Stop listening for good (its thread ends within RETRY_SECONDS)."""
        with self.lock:
            self._closed = True
            self._drop()

    def _subscribe(self) -> None:
        if self._closed:
            return
        self._retry_at = time.monotonic() + RETRY_SECONDS
        with contextlib.suppress(OSError, redis.RedisError):
            self._listener = self._connect()
            self.generation += 1
        if self._listener and (self._thread is None or not self._thread.is_alive()):
            self._thread = threading.Thread(target=self._keep_listening, name="redis-watch",
                                            daemon=True)
            self._thread.start()

    def _drop(self) -> None:
        self.on_change(None)
        self.generation += 1
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def _keep_listening(self) -> None:
        """Drain a listener that has something waiting and no request drained lately, and
        PING every PING_EVERY."""
        while not self._closed:
            listener = self._listener
            if listener is None:
                time.sleep(RETRY_SECONDS)
                continue
            arrived = listener.wait(max(0.0, self._pinged_at + PING_EVERY - time.monotonic()))
            if arrived:
                time.sleep(IDLE_DRAIN_SECONDS)  # time for a request to drain it first
            with self.lock:
                if self._listener is not listener:
                    continue
                if arrived and time.monotonic() - self._drained_at >= IDLE_DRAIN_SECONDS:
                    self.current()
                if self._listener is listener and time.monotonic() >= (self._pinged_at
                                                                        + PING_EVERY):
                    self._ping(listener)

    def _ping(self, listener: InvalidationListener) -> None:
        self._pinged_at = time.monotonic()
        try:
            listener.ping()
        except OSError:
            self._drop()
