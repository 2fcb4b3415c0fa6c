"""When a worker may trust what Redis holds: every call to Redis goes through here.

Redis is a cache: losing its contents is fine, serving what it should have forgotten is not.
So what it holds belongs to an epoch (docs/design.md, "Epochs"), and a worker uses Redis only
under the epoch it believes current, which every function of the library checks. A new
epoch begins, and every entry of the old one becomes unreachable at once, whenever commands
may have been lost or may still arrive late:
- a Redis that is another run (a restart, a replica promoted by a failover), or that the
  Sentinels name the primary in a newer configuration than the epoch's (a server promoted
  again, which missed what was written on the one promoted in between): the epoch function
  compares the epoch with the server's run_id and the Sentinels' configuration on every new
  connection;
- a write whose write-through failed (its invalidation may be lost, or late): the writer
  waits, before it answers, until the epoch has moved on, or until every worker has stopped
  trusting Redis (HEARTBEAT);
- a worker that did not hear Redis for HEARTBEAT (a hang): it trusts nothing from Redis, and
  moves the epoch on before it uses Redis again.

A failure also opens the breaker for a cool-down (answers come from Postgres meanwhile,
`X-Cache: BYPASS`), closes every connection, so that the next one goes to whichever Redis
is the primary then, and drops the near cache.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import redis

from .. import metrics
from ..postgres.pool import first_line
from ..wire.client import RedisClient, configuration_of
from .breaker import Breaker
from .keys import Keys
from .scripts import EPOCH, OTHER_EPOCH
from .watch import HEARTBEAT, Watch

T = TypeVar("T")

log = logging.getLogger(__name__)

# How long past HEARTBEAT a writer whose write-through failed waits for Redis to come back:
# time for every watch to have noticed the silence.
SETTLE_MARGIN = 0.2
SETTLE_POLL = 0.05


class CacheUnavailable(Exception):
    """Redis failed, timed out, or is not to be trusted now."""


@dataclass(frozen=True, slots=True)
class Epoch:
    """An epoch ('<run_id>:<name>', as Redis keeps it under the epoch key; '' for none yet)
    and the key names of its entries."""

    name: str
    keys: Keys


class Trust:
    """The epoch this worker uses, and whether it may use Redis at all."""

    def __init__(self, redis_client: RedisClient, watch: Watch, cooldown: float,
                 namespace: Callable[[], Keys]) -> None:
        """`namespace()` gives the database's key names (asked once, of Postgres)."""
        self.redis = redis_client
        self.watch = watch
        self.breaker = Breaker(cooldown)
        self._namespace = namespace
        self._names: Keys | None = None
        self._epoch: Epoch | None = None  # None until one is settled
        # The epoch of a gap (lost or late commands): the next one settled must be another.
        self._gap = ""
        # The Sentinels' configuration the primary was last found in (0 without Sentinels).
        self._configuration = 0
        self._recovering = threading.Lock()
        redis_client.on_connect = self._settle_on

    @property
    def epoch(self) -> Epoch:
        """The epoch in use (one of the namespace alone, named '', before there is one)."""
        return self._epoch or Epoch("", self.names)

    @property
    def keys(self) -> Keys:
        return self.epoch.keys

    @property
    def names(self) -> Keys:
        if self._names is None:
            self._names = self._namespace()
        return self._names

    def trusted(self) -> bool:
        """Whether Redis, and the near cache with it, may be used now (cheap: every read asks)."""
        if self.breaker.tripped:
            return False
        if self.watch.lapsed():
            self.lost(self.epoch, "redis was not heard for a heartbeat")
            return False
        return True

    # -- calls ------------------------------------------------------------------------

    def command(self, *args: Any) -> Any:
        """One plain command (PING, the auditor's GET and SCAN), behind the breaker."""
        return self._through_breaker(lambda: self.redis.command(*args))

    def call(self, function: str, keys: Callable[[Keys], list[str]],
             argv: list[Any] | Callable[[Keys], list[Any]], wait: bool = True,
             epoch: Epoch | None = None) -> tuple[Any, Epoch]:
        """Call `function` on the keys `keys` names (and with the arguments `argv` gives, when
        they name keys too) in the epoch in use; its reply and that epoch. When the epoch has
        moved on, the call is made again in the new one. Given an `epoch`, only in that one (a
        fill, in the epoch of its lease)."""

        def send() -> tuple[Any, Epoch]:
            used = epoch or self.epoch  # as it is once any recovery is done
            args = argv(used.keys) if callable(argv) else argv
            return self.redis.call(function, [used.keys.epoch, *keys(used.keys)],
                                   [used.name, *args], wait), used

        for _ in range(3):
            reply, used = self._through_breaker(send)
            if epoch or not (isinstance(reply, list) and reply and reply[0] == OTHER_EPOCH):
                return reply, used
            self._adopt(reply[1].decode())
        raise CacheUnavailable("the epoch keeps moving")

    def _through_breaker(self, command: Callable[[], T]) -> T:
        """`command()`, unless the breaker is open, after a recovery when it had tripped. A
        failure trips it."""
        if not self.breaker.allows():
            raise CacheUnavailable("breaker open")
        try:
            if self.breaker.tripped:
                self._recover()
            return command()
        except (redis.RedisError, OSError) as exc:
            self._trip(exc)
            raise CacheUnavailable(str(exc)) from None

    def _trip(self, exc: BaseException) -> None:
        metrics.CACHE_ERRORS.inc()
        if self.breaker.trip():  # one line per outage, not one per request
            log.warning("redis unavailable, serving from postgres: %s: %s",
                        type(exc).__name__, first_line(exc))
        self.redis.close()
        self.watch.stop()

    # -- epochs -----------------------------------------------------------------------

    def lost(self, epoch: Epoch, why: str) -> None:
        """Commands of `epoch` may have been lost or may still arrive: trust Redis again only
        in another epoch."""
        if epoch.name:
            self._gap = epoch.name
        metrics.CACHE_GAPS.inc()
        if not self.breaker.tripped:
            log.warning("%s: redis is trusted again in a new epoch only", why)
        self.breaker.trip()
        self.redis.close()
        self.watch.stop()

    def begin_new_epoch(self, why: str) -> None:
        """Make every entry Redis holds now unreachable, at once: an epoch past the current one
        is settled before this returns. Raises CacheUnavailable while Redis does not answer."""
        self._through_breaker(lambda: None)  # the current epoch, settled
        self.lost(self.epoch, why)
        try:
            self._recover()
        except (redis.RedisError, OSError) as exc:
            raise CacheUnavailable(str(exc)) from None

    def write_lost(self, epoch: Epoch, write: Callable[[], object]) -> None:
        """A write-through of `epoch` failed: once an epoch past that one is settled, `write()`
        it again there, so that once the write is acknowledged no read anywhere finds what it
        should have changed. Moving past `epoch` alone is not enough: the epoch settled may be
        one another worker began earlier and filled with the old value (on a promoted replica,
        say, while this one still wrote to the old primary). Gives up when Redis cannot be
        written for HEARTBEAT: by then every worker has stopped trusting it (a worker that did
        not hear Redis for HEARTBEAT uses none of it)."""
        deadline = time.monotonic() + HEARTBEAT + SETTLE_MARGIN
        while True:
            self.lost(epoch, "a write-through failed")
            try:
                self._recover()
                epoch = self.epoch
                write()
                return
            except (CacheUnavailable, redis.RedisError, OSError):
                if time.monotonic() >= deadline:
                    return
                time.sleep(SETTLE_POLL)

    def _recover(self) -> None:
        """Settle an epoch past the gap, if any, on a new connection, and trust Redis again."""
        with self._recovering:
            if not self.breaker.tripped:
                return
            self.redis.command("PING")  # a new connection: _settle_on runs first
            self._gap = ""
            self.watch.start()
            if self.breaker.reset():
                log.info("redis available again")

    def _settle_on(self, connection: redis.Connection) -> None:
        """On every new connection, before anything else: settle the epoch (a server of
        another run or of an earlier Sentinel configuration, or one past a gap, gets a new
        one) and use it."""
        names = self.names
        self._configuration = configuration_of(connection)
        connection.send_command("FCALL", EPOCH, 1, names.epoch, self._gap,
                                secrets.token_hex(4), self._configuration)
        self._use(connection.read_response().decode())

    def _adopt(self, epoch: str) -> None:
        """A function said the epoch in use is not current: `epoch` is (or, empty, none is)."""
        if not epoch:  # a Redis that lost everything: settle a new one
            epoch = self._through_breaker(lambda: self.redis.call(
                EPOCH, [self.names.epoch],
                [self._gap, secrets.token_hex(4), self._configuration])).decode()
        self._use(epoch)

    def _use(self, name: str) -> None:
        if self._epoch is None or name != self._epoch.name:
            self._epoch = Epoch(name, self.names.in_epoch(name))
            self.watch.forget_all()
