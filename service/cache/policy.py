"""The cache policy: what each read and write does in Redis, and in what order (the key
names are in keys.py, the scripts in lua/, the bytes on the wire in wire/).

Races are closed with leases (as in "Scaling Memcache at Facebook") plus versions:
- A reader that misses takes the key's lease (SET NX PX) and fills only if its lease is
  still there. Every write deletes the leases of all the keys it touches, and so does
  FLUSHALL, so a row read before a write committed never reaches Redis after it.
- An update or delete first takes the lease of `id:<id>` itself; its write-through
  stores the row only while that lease is still its own and otherwise deletes the key.
  Versions are compared too: a write never replaces a newer row with an older one.
- Readers that find a lease held by someone else wait for the fill briefly instead of
  all querying Postgres (no stampede).

Redis is never the source of truth: every call has a short timeout, and after a failure
a breaker skips Redis for a cool-down (answers come from Postgres, `X-Cache: BYPASS`).
Keys a write could not update go into the repair log (repairs.py) and are deleted from
Redis before it is used again, so a Redis that comes back with old data never serves it.

Hot `id:<id>` values are also kept in process memory (see nearcache.py), invalidated by
Redis's client-side-caching broadcasts; so a hit usually costs no network round trip.
The broadcasts watch `changed:<id>`, which only writes touch, and not `id:<id>` itself:
a fill stores what Postgres had when its lease was granted, which no process can hold an
older copy of without a write having announced it since, so fills need tell nobody. (When
they did, every fill sent a message to every worker of every service instance.)
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import random
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import redis

from .. import metrics
from ..model import Update, UserRow
from ..postgres import statements
from ..postgres.pool import Database, DatabaseUnavailable, first_line
from ..settings import CacheSettings
from ..wire.client import InvalidationListener, RedisClient
from . import entry
from .breaker import Breaker
from .keys import Keys, Lookup
from .nearcache import NearCache
from .repairs import RepairLog
from .scripts import BUSY, FILL, FOLLOW, FOUND, LEASED, READ, WRITE, Mode, Put, put_argv

T = TypeVar("T")
Load = Callable[[], UserRow | None]  # what a read asks Postgres

log = logging.getLogger(__name__)

LEASE_MS = 3000
# A reader that finds another's lease polls for its fill, backing off from the first to
# the last pause, for at most FILL_WAIT seconds; then it reads Postgres itself.
FILL_POLL_FIRST, FILL_POLL_LAST, FILL_WAIT = 0.002, 0.05, 1.0

HIT, MISS, BYPASS = "HIT", "MISS", "BYPASS"


class CacheUnavailable(Exception):
    """Redis failed, timed out, or the breaker is open."""


@dataclass(frozen=True, slots=True)
class Answer:
    """The result of a read: where it came from and the user's JSON (None: nobody matches)."""

    status: str
    user: bytes | None


class UserCache:
    """Reads through and writes through Redis for one process; see the module docstring."""

    def __init__(self, settings: CacheSettings, redis_client: RedisClient,
                 database: Database) -> None:
        self.settings = settings
        self.database = database
        self.breaker = Breaker(settings.cooldown)
        self.repairs = RepairLog(database)
        self.redis = redis_client
        # Lease tokens only need to be unique, not secret: a random prefix and a counter
        # (itertools.count is safe to share between threads).
        self._token_prefix = secrets.token_hex(4)
        self._token_counter = itertools.count()
        self._keys: Keys | None = None
        self.near = self._near_cache()
        # What the last read looked up, for the consistency auditor to sample (audit.py),
        # which takes it (None: nothing was read since). One store is all a read pays.
        self.last_read: Lookup | None = None

    def _near_cache(self) -> NearCache | None:
        if not self.settings.near_size:
            return None

        def subscribe() -> InvalidationListener:
            return self.redis.invalidation_listener(self.keys.changes)

        max_age = self.settings.ttl * (1 - self.settings.ttl_jitter)
        return NearCache(subscribe, self.settings.near_size, max_age)

    @property
    def keys(self) -> Keys:
        """The database's key names, learnt from Postgres once per process."""
        if self._keys is None:
            self._keys = Keys.for_namespace(statements.cache_namespace(self.database))
        return self._keys

    # -- Redis, behind the breaker -------------------------------------------------

    def _through_breaker(self, command: Callable[[], T]) -> T:
        """`command()`, unless the breaker is open, after a repair when it had tripped. A
        failure trips it, closes every connection and stops the near cache."""
        if not self.breaker.allows():
            raise CacheUnavailable("breaker open")
        try:
            if self.breaker.tripped:
                self._repair()
            return command()
        except (redis.RedisError, OSError) as exc:
            metrics.CACHE_ERRORS.inc()
            if self.breaker.trip():  # one line per outage, not one per request
                log.warning("redis unavailable, serving from postgres: %s: %s",
                            type(exc).__name__, first_line(exc))
            self.redis.close()  # the other idle connections are likely dead too
            if self.near:
                self.near.stop()
            raise CacheUnavailable(str(exc)) from None

    def _repair(self) -> None:
        """Delete every key a write could not update, then trust Redis again."""
        self.redis.command("PING")  # not worth asking Postgres for repairs while Redis is away
        if self.near:
            self.near.start()
        deleted = self.repairs.replay(
            lambda keys: self._write_entries([Put(key, Mode.DELETE, 0, "") for key in keys],
                                             ""))
        if deleted:
            log.info("cache repaired: %d stale keys deleted", deleted)
        if self.breaker.reset():
            log.info("redis available again")

    def available(self) -> bool:
        """Whether Redis answers a PING now (for /readyz)."""
        try:
            self._through_breaker(lambda: self.redis.command("PING"))
            return True
        except (CacheUnavailable, DatabaseUnavailable):
            return False

    def ask(self, *command: str | int) -> object:
        """One Redis command behind the breaker (the auditor's GET and SCAN): raises
        CacheUnavailable when Redis is not to be asked."""
        return self._through_breaker(lambda: self.redis.command(*command))

    def forget(self, keys: list[str]) -> None:
        """Delete `keys` as a write would (leases dropped, near caches told), so the next
        read fills them from Postgres: the auditor's repair."""
        self._through_breaker(lambda: self._write_entries(
            [Put(key, Mode.DELETE, 0, "") for key in keys], ""))

    def _new_lease_token(self) -> str:
        return f"{self._token_prefix}:{next(self._token_counter)}"

    # -- what reads and writes put --------------------------------------------------

    def _ttl_ms(self, found: bool) -> int:
        """TTL with jitter so keys filled together do not expire together."""
        jitter = self.settings.ttl_jitter
        if found:
            return int(self.settings.ttl * 1000 * random.uniform(1 - jitter, 1 + jitter))
        return int(self.settings.negative_ttl * 1000 * random.uniform(1 - jitter, 1))

    def _user_put(self, row: UserRow) -> Put:
        return Put(self.keys.user(row.id), Mode.STORE_UNLESS_OLDER, self._ttl_ms(True),
                     entry.of_user(row))

    def _fill_entries(self, lookup: Lookup, row: UserRow | None) -> list[Put]:
        """What a fill of `lookup` stores, given what Postgres answered."""
        if row is None:
            if lookup.field == "id":
                return [Put(self.keys.of(lookup), Mode.STORE_UNLESS_OLDER,
                              self._ttl_ms(False), entry.NOBODY)]
            return [Put(self.keys.of(lookup), Mode.STORE, self._ttl_ms(False), "")]
        puts = [self._user_put(row)]
        if lookup.field != "id":
            puts.append(Put(self.keys.of(lookup), Mode.STORE, self._ttl_ms(True),
                                 str(row.id)))
        return puts

    def _row_entries(self, row: UserRow) -> list[Put]:
        """A row's entry and its two pointers, as a create or an update stores them."""
        ttl = self._ttl_ms(True)
        return [self._user_put(row),
                *(Put(self.keys.of(Lookup.of(field, getattr(row, field))), Mode.STORE, ttl,
                        str(row.id))
                  for field in ("username", "email"))]

    # -- reads --------------------------------------------------------------------

    def read(self, lookup: Lookup, load: Load) -> Answer:
        """Cache-aside read, in steps, each answering if it can: process memory (by id, while
        Redis is trusted; the busiest case, so written out here), Redis (waiting out another
        reader's fill), Postgres alone while Redis is unavailable, and otherwise Postgres,
        filled into Redis under this reader's lease."""
        self.last_read = lookup
        near = self.near if lookup.field == "id" and not self.breaker.tripped else None
        if near is not None:
            value = near.get(lookup.value)
            if value is not None:
                metrics.CACHE_HITS.inc()
                return Answer(HIT, entry.user_json(value))
            epoch = near.epoch  # before Redis is asked: see NearCache.put
        key, token = self.keys.of(lookup), self._new_lease_token()
        try:
            reply = self._get_or_lease(lookup, key, token)
        except CacheUnavailable:
            return self._bypass(load)
        if reply[0] == FOUND:
            metrics.CACHE_HITS.inc()
            if near is not None:
                near.put(lookup.value, reply[1], epoch)
            return Answer(HIT, entry.user_json(reply[1]))
        return self._load_and_fill(lookup, key, load, token if reply[0] == LEASED else "")

    def _get_or_lease(self, lookup: Lookup, key: str, token: str) -> list:
        """READ `key` (by id) or FOLLOW it (by username or email): [FOUND, value], [LEASED]
        when this reader took its lease, [BUSY] when another reader held it all along."""
        if lookup.field == "id":
            script, argv = READ, [token, LEASE_MS]
        else:
            script, argv = FOLLOW, [token, LEASE_MS, self.keys.ids, lookup.field, lookup.value]
        keys = [key, self.keys.lease(key)]

        def ask() -> list:
            return self.redis.run_script(script, keys, argv)

        reply = self._through_breaker(ask)
        return self._wait_for_fill(ask) if reply[0] == BUSY else reply

    def _wait_for_fill(self, ask: Callable[[], list]) -> list:
        """Another reader holds the lease: ask again, backing off, until its fill came (or
        its lease went, so this reader takes it), for at most FILL_WAIT."""
        pause, give_up = FILL_POLL_FIRST, time.monotonic() + FILL_WAIT
        reply = [BUSY]
        while reply[0] == BUSY and time.monotonic() < give_up:
            time.sleep(pause)
            pause = min(pause * 2, FILL_POLL_LAST)
            reply = self._through_breaker(ask)
        return reply

    @staticmethod
    def _bypass(load: Load) -> Answer:
        """Redis is unavailable: Postgres's answer, cached nowhere."""
        metrics.CACHE_BYPASSES.inc()
        row = load()
        return Answer(BYPASS, row.public_json if row else None)

    def _load_and_fill(self, lookup: Lookup, key: str, load: Load, lease: str) -> Answer:
        """A miss: Postgres's answer, filled into Redis when this reader holds the lease on
        `key` (`lease` is its token; '' when another reader's fill never came)."""
        metrics.CACHE_MISSES.inc()
        row = load()
        if lease:
            puts = self._fill_entries(lookup, row)
            keys = [self.keys.lease(key), *(put.key for put in puts)]
            # Not waited for: the answer is right whether or not it gets cached.
            with contextlib.suppress(CacheUnavailable):
                self._through_breaker(lambda: self.redis.run_script(
                    FILL, keys, [lease, *put_argv(puts)], wait=False))
        return Answer(MISS, row.public_json if row else None)

    # -- writes -------------------------------------------------------------------

    def lease_for_write(self, user_id: int) -> str:
        """Take `id:<id>`'s lease before changing the row; '' when Redis is unavailable."""
        token = self._new_lease_token()
        try:
            lease = self.keys.lease(self.keys.user(user_id))
            self._through_breaker(lambda: self.redis.command("SET", lease, token, "PX", LEASE_MS))
        except CacheUnavailable:
            return ""
        return token

    def release_write_lease(self, user_id: int, token: str) -> None:
        """Give a write lease back after a write that changed nothing."""
        if token:
            with contextlib.suppress(CacheUnavailable):
                lease = self.keys.lease(self.keys.user(user_id))
                self._through_breaker(lambda: self.redis.command("DEL", lease))

    def created(self, rows: Sequence[UserRow]) -> None:
        """One write-through for the rows of one or more creates (batching.py)."""
        self._write_through([put for row in rows for put in self._row_entries(row)], "")

    def updated(self, change: Update, token: str) -> None:
        puts = self._row_entries(change.row)
        fresh = {put.key for put in puts}
        for field, old in (("username", change.old_username), ("email", change.old_email)):
            key = self.keys.of(Lookup.of(field, old))
            if key not in fresh:
                puts.append(Put(key, Mode.DELETE, 0, ""))
        self._write_through(puts, token)

    def deleted(self, row: UserRow, token: str) -> None:
        tombstone = Put(self.keys.user(row.id), Mode.STORE_UNLESS_OLDER, self._ttl_ms(False),
                          entry.tombstone(row))
        indexes = [Put(self.keys.of(Lookup.of(field, getattr(row, field))), Mode.DELETE, 0, "")
                   for field in ("username", "email")]
        self._write_through([tombstone, *indexes], token)

    def _write_through(self, puts: list[Put], token: str) -> None:
        try:
            self._through_breaker(lambda: self._write_entries(puts, token))
        except CacheUnavailable:
            self.repairs.record([put.key for put in puts])

    def _write_entries(self, puts: list[Put], token: str) -> None:
        """One WRITE: store or delete `puts`, dropping their leases, and announce every
        user among them to the near caches."""
        keys = [put.key for put in puts]
        ids = self.keys.ids
        changed = [self.keys.changes + key[len(ids):] for key in keys if key.startswith(ids)]
        self.redis.run_script(WRITE, [*keys, *map(self.keys.lease, keys), *changed],
                              [token, *put_argv(puts)])
