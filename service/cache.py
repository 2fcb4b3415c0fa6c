"""The cache policy, all of it: keys, TTLs, fills, write-through and invalidation.

Keys (prefix `cs:1:<namespace>:`; 1 is bumped when the value format changes, and the
namespace is a name the database got when its schema was created, see migration 002):
- `id:<id>` holds `<version> <json>` for a user, `<version> ` for a deleted one
  (a tombstone) and `0 ` for an id nobody has. The JSON is the exact response body.
- `username:<lower>` and `email:<lower>` hold the user's id, or an empty string when
  nobody has it. They are pointers: a read follows one to `id:<id>` inside a Lua
  script and counts it a hit only if that user still has the username or email.
- `lease:<key>` is the lease on a key (below).
- `changed:<id>` is never stored: a write sets and deletes it to tell every near cache
  that the user changed (see below).

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
Keys a write could not update are logged in Postgres (`cache_repairs`) and deleted from
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
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import redis

from . import db, metrics
from .config import Settings
from .nearcache import NearCache
from .redis_io import InvalidationListener, RedisClient
from .scripts import FILL, FOLLOW, READ, WRITE, Entry, Mode, entry_argv

T = TypeVar("T")

log = logging.getLogger(__name__)

FORMAT = "cs:1:"
LEASE_MS = 3000
# A reader that finds another's lease polls for its fill, backing off from the first to
# the last pause, for at most FILL_WAIT seconds; then it reads Postgres itself.
FILL_POLL_FIRST, FILL_POLL_LAST, FILL_WAIT = 0.002, 0.05, 1.0

HIT, MISS, BYPASS = "HIT", "MISS", "BYPASS"


class CacheUnavailable(Exception):
    """Redis failed, timed out, or the breaker is open."""


@dataclass(frozen=True, slots=True)
class Lookup:
    """One way of finding a user; `value` is already normalised (ids as text, names lowered)."""

    field: str
    value: str

    @classmethod
    def of(cls, field: str, value: str | int) -> Lookup:
        return cls(field, str(value).lower())


@dataclass(frozen=True, slots=True)
class Keys:
    """Key names under one database's prefix."""

    prefix: str

    @classmethod
    def for_namespace(cls, namespace: str) -> Keys:
        return cls(f"{FORMAT}{namespace}:")

    @property
    def ids(self) -> str:
        return self.prefix + "id:"

    def of(self, lookup: Lookup) -> str:
        return f"{self.prefix}{lookup.field}:{lookup.value}"

    def user(self, user_id: int | str) -> str:
        return f"{self.ids}{user_id}"

    @property
    def changes(self) -> str:
        return self.prefix + "changed:"

    def lease(self, key: str) -> str:
        return f"{self.prefix}lease:{key.removeprefix(self.prefix)}"


@dataclass(frozen=True, slots=True)
class Answer:
    """The result of a read: where it came from and the user's JSON (None: nobody matches)."""

    status: str
    user: bytes | None


class Breaker:
    """Skip Redis for `cooldown` seconds after a failure instead of paying its timeout each time.

    It starts tripped, so that each process clears pending cache repairs before its first
    cache read.
    """

    def __init__(self, cooldown: float) -> None:
        self.cooldown = cooldown
        self.tripped = True
        self.failing = False  # since the last failure, Redis has not answered
        self._open_until = 0.0

    def allows(self) -> bool:
        return time.monotonic() >= self._open_until

    def trip(self) -> bool:
        """Open for a cool-down; True when this failure is news (Redis had answered since the
        last one, or never failed before)."""
        news = not self.failing
        self.tripped = self.failing = True
        self._open_until = time.monotonic() + self.cooldown
        return news


def _decode_user(value: bytes) -> bytes | None:
    """`<version> <json>` -> the JSON, or None for a tombstone or a cached not-found."""
    body = value.partition(b" ")[2]
    return body or None


class UserCache:
    """Reads through and writes through Redis for one process; see the module docstring."""

    def __init__(self, settings: Settings, database: db.Database) -> None:
        self.settings = settings
        self.database = database
        self.breaker = Breaker(settings.cache_cooldown)
        self.redis = RedisClient(settings.redis_url, settings.cache_timeout)
        # Lease tokens only need to be unique, not secret: a random prefix and a counter
        # (itertools.count is safe to share between threads).
        self._token_prefix = secrets.token_hex(4)
        self._token_counter = itertools.count()
        self._keys: Keys | None = None
        self.near = self._near_cache()
        # Called between the database read and the fill; tests use it to force races.
        self.before_fill: Callable[[Lookup], None] | None = None

    def _near_cache(self) -> NearCache | None:
        if not self.settings.near_cache_size:
            return None

        def subscribe() -> InvalidationListener:
            return self.redis.invalidation_listener(self.keys.changes)

        max_age = self.settings.cache_ttl * (1 - self.settings.cache_ttl_jitter)
        return NearCache(subscribe, self.settings.near_cache_size, max_age)

    @property
    def keys(self) -> Keys:
        """The database's key names, learnt from Postgres once per process."""
        if self._keys is None:
            self._keys = Keys.for_namespace(db.cache_namespace(self.database))
        return self._keys

    # -- plumbing -----------------------------------------------------------------

    def _call(self, command: Callable[[], T]) -> T:
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
                            type(exc).__name__, db.first_line(exc))
            self.redis.close()  # the other idle connections are likely dead too
            if self.near:
                self.near.stop()
            raise CacheUnavailable(str(exc)) from None

    def _token(self) -> str:
        return f"{self._token_prefix}:{next(self._token_counter)}"

    def _repair(self) -> None:
        """Delete every key a write could not update, then trust Redis again."""
        self.redis.command("PING")  # not worth asking Postgres for repairs while Redis is away
        if self.near:
            self.near.start()
        keys = db.pending_cache_repairs(self.database)
        if keys:
            self._write([Entry(key, Mode.DELETE, 0, "") for key in keys], "")
            db.clear_cache_repairs(self.database, keys)
            log.info("cache repaired: %d stale keys deleted", len(keys))
        if self.breaker.failing:
            log.info("redis available again")
        self.breaker.tripped = self.breaker.failing = False

    def available(self) -> bool:
        """Whether Redis answers a PING now (for /readyz)."""
        try:
            self._call(lambda: self.redis.command("PING"))
            return True
        except (CacheUnavailable, db.DatabaseUnavailable):
            return False

    def _ttl_ms(self, found: bool) -> int:
        """TTL with jitter so keys filled together do not expire together."""
        jitter = self.settings.cache_ttl_jitter
        if found:
            return int(self.settings.cache_ttl * 1000 * random.uniform(1 - jitter, 1 + jitter))
        return int(self.settings.cache_negative_ttl * 1000 * random.uniform(1 - jitter, 1))

    def _user_entry(self, row: db.UserRow) -> Entry:
        return Entry(self.keys.user(row.id), Mode.STORE_UNLESS_OLDER, self._ttl_ms(True),
                     b"%d " % row.version + row.public_json)

    def _entries_for(self, lookup: Lookup, row: db.UserRow | None) -> list[Entry]:
        """What a fill of `lookup` stores, given what Postgres answered."""
        if row is None:
            if lookup.field == "id":
                return [Entry(self.keys.of(lookup), Mode.STORE_UNLESS_OLDER,
                              self._ttl_ms(False), "0 ")]
            return [Entry(self.keys.of(lookup), Mode.STORE, self._ttl_ms(False), "")]
        entries = [self._user_entry(row)]
        if lookup.field != "id":
            entries.append(Entry(self.keys.of(lookup), Mode.STORE, self._ttl_ms(True),
                                 str(row.id)))
        return entries

    # -- reads --------------------------------------------------------------------

    def _try(self, key: str, lookup: Lookup, token: str) -> list:
        keys = [key, self.keys.lease(key)]
        if lookup.field == "id":
            return self.redis.run_script(READ, keys, [token, LEASE_MS])
        return self.redis.run_script(FOLLOW, keys,
                                     [token, LEASE_MS, self.keys.ids, lookup.field, lookup.value])

    def read(self, lookup: Lookup, load: Callable[[], db.UserRow | None]) -> Answer:
        """Cache-aside read: a hit (from process memory if it holds the key), or load from
        Postgres and fill under a lease."""
        key = self.keys.of(lookup)
        near = self.near if lookup.field == "id" and not self.breaker.tripped else None
        if near:
            value = near.get(lookup.value)
            if value is not None:
                metrics.CACHE_HITS.inc()
                return Answer(HIT, _decode_user(value))
            epoch = near.epoch
        token = self._token()
        try:
            reply = self._call(lambda: self._try(key, lookup, token))
            pause, give_up = FILL_POLL_FIRST, time.monotonic() + FILL_WAIT
            while reply[0] == b"busy" and time.monotonic() < give_up:
                time.sleep(pause)
                pause = min(pause * 2, FILL_POLL_LAST)
                reply = self._call(lambda: self._try(key, lookup, token))
        except CacheUnavailable:
            metrics.CACHE_BYPASSES.inc()
            row = load()
            return Answer(BYPASS, row.public_json if row else None)
        if reply[0] == b"hit":
            metrics.CACHE_HITS.inc()
            if near:
                near.put(lookup.value, reply[1], epoch)
            return Answer(HIT, _decode_user(reply[1]) if reply[1] else None)
        metrics.CACHE_MISSES.inc()
        row = load()
        if reply[0] == b"lease":
            if self.before_fill:
                self.before_fill(lookup)
            entries = self._entries_for(lookup, row)
            keys = [self.keys.lease(key), *(entry.key for entry in entries)]
            # Not waited for: the answer is right whether or not it gets cached.
            with contextlib.suppress(CacheUnavailable):
                self._call(lambda: self.redis.run_script(FILL, keys,
                                                         [token, *entry_argv(entries)], wait=False))
        return Answer(MISS, row.public_json if row else None)

    # -- writes -------------------------------------------------------------------

    def lease_for_write(self, user_id: int) -> str:
        """Take `id:<id>`'s lease before changing the row; '' when Redis is unavailable."""
        token = self._token()
        try:
            lease = self.keys.lease(self.keys.user(user_id))
            self._call(lambda: self.redis.command("SET", lease, token, "PX", LEASE_MS))
        except CacheUnavailable:
            return ""
        return token

    def release(self, user_id: int, token: str) -> None:
        """Give a write lease back after a write that changed nothing."""
        if token:
            with contextlib.suppress(CacheUnavailable):
                lease = self.keys.lease(self.keys.user(user_id))
                self._call(lambda: self.redis.command("DEL", lease))

    def created(self, row: db.UserRow) -> None:
        self._write_through(self._row_entries(row), "")

    def updated(self, change: db.Update, token: str) -> None:
        entries = self._row_entries(change.row)
        fresh = {entry.key for entry in entries}
        for field, old in (("username", change.old_username), ("email", change.old_email)):
            key = self.keys.of(Lookup.of(field, old))
            if key not in fresh:
                entries.append(Entry(key, Mode.DELETE, 0, ""))
        self._write_through(entries, token)

    def deleted(self, row: db.UserRow, token: str) -> None:
        tombstone = Entry(self.keys.user(row.id), Mode.STORE_UNLESS_OLDER, self._ttl_ms(False),
                          b"%d " % (row.version + 1))
        indexes = [Entry(self.keys.of(Lookup.of(field, getattr(row, field))), Mode.DELETE, 0, "")
                   for field in ("username", "email")]
        self._write_through([tombstone, *indexes], token)

    def _row_entries(self, row: db.UserRow) -> list[Entry]:
        ttl = self._ttl_ms(True)
        return [self._user_entry(row),
                *(Entry(self.keys.of(Lookup.of(field, getattr(row, field))), Mode.STORE, ttl,
                        str(row.id))
                  for field in ("username", "email"))]

    def _write_through(self, entries: list[Entry], token: str) -> None:
        try:
            self._call(lambda: self._write(entries, token))
        except CacheUnavailable:
            db.record_cache_repairs(self.database, [entry.key for entry in entries])

    def _write(self, entries: list[Entry], token: str) -> None:
        """One WRITE script call: store or delete `entries`, dropping their leases, and
        announce every user among them to the near caches."""
        keys = [entry.key for entry in entries]
        ids = self.keys.ids
        changed = [self.keys.changes + key[len(ids):] for key in keys if key.startswith(ids)]
        self.redis.run_script(WRITE, [*keys, *map(self.keys.lease, keys), *changed],
                              [token, *entry_argv(entries)])
