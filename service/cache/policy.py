"""The cache policy: what each read and write does in Redis, and in what order. The key
names are in keys.py, the functions Redis runs in lua/cachestack.lua, when Redis may be
trusted at all in trust.py; docs/design.md is the map.

Races are closed with leases (as in "Scaling Memcache at Facebook") plus versions: a reader
that misses takes the key's lease and fills only while its lease is still there; every write
deletes the leases of the keys it touches; an update or delete takes its user's lease before
it commits and stores its row only while that lease is still its own; a version never goes
back. Readers that find another's lease wait for its fill briefly instead of all querying
Postgres. Hot users are also kept in each worker's memory (nearcache.py).
"""

from __future__ import annotations

import contextlib
import itertools
import random
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .. import metrics
from ..model import Update, UserRow
from ..postgres import statements
from ..postgres.pool import Database, DatabaseUnavailable
from ..settings import CacheSettings
from ..wire.client import RedisClient
from ..wire.listener import InvalidationListener
from . import entry
from .keys import Keys, Lookup
from .nearcache import NearCache
from .scripts import BUSY, FILL, FOLLOW, FOUND, LEASE, LEASED, READ, WRITE, Mode, Put, put_argv
from .trust import CacheUnavailable, Epoch, Trust
from .watch import Watch

Load = Callable[[], UserRow | None]  # what a read asks Postgres

LEASE_MS = 3000
# A reader that finds another's lease polls for its fill, backing off from the first to the
# last pause, for as long as a lease lasts: by then the fill came, or the lease went and this
# reader took it, so a key costs Postgres at most one query per lease, however slow Postgres
# is. Only then does it read Postgres itself, without the lease (Redis keeps failing it).
FILL_POLL_FIRST, FILL_POLL_LAST = 0.002, 0.05
FILL_WAIT = LEASE_MS / 1000 + FILL_POLL_LAST

HIT, MISS, BYPASS = "HIT", "MISS", "BYPASS"

__all__ = ["BYPASS", "HIT", "MISS", "Answer", "CacheUnavailable", "Changed", "UserCache"]


@dataclass(frozen=True, slots=True)
class Answer:
    """The result of a read: where it came from and the user's JSON (None: nobody matches)."""

    status: str
    user: bytes | None


@dataclass(frozen=True, slots=True)
class Changed:
    """A user as a change made it, told by the change stream: its id, its entry's version now
    (a deleted user's is its tombstone's), the lookups that find it now and those that no
    longer do."""

    user_id: str
    version: int
    lookups: tuple[Lookup, ...]
    former: tuple[Lookup, ...]


def _user_key(user_id: int | str) -> str:
    """A user's entry, as Put names keys: relative to its epoch's prefix."""
    return f"id:{user_id}"


def _lookup_key(lookup: Lookup) -> str:
    return f"{lookup.field}:{lookup.value}"


class UserCache:
    """Reads through and writes through Redis for one process; see the module docstring."""

    def __init__(self, settings: CacheSettings, redis_client: RedisClient,
                 database: Database) -> None:
        self.settings = settings
        self.database = database
        self.redis = redis_client

        def listen() -> InvalidationListener:
            # Without a near cache (the change stream's process) there is nothing for users'
            # changes to make old: only new epochs (and flushes) are heard.
            names = self.trust.names
            prefixes = [names.changes, names.epoch] if settings.near_size else [names.epoch]
            return redis_client.invalidation_listener(prefixes)

        self.watch = Watch(listen, lambda: self.trust.names)
        self.trust = Trust(redis_client, self.watch, settings.cooldown, self._namespace)
        max_age = settings.ttl * (1 - settings.ttl_jitter)
        self.near = NearCache(self.watch, settings.near_size, max_age) if settings.near_size \
            else None
        # Lease tokens only need to be unique, not secret: a random prefix and a counter
        # (itertools.count is safe to share between threads).
        self._token_prefix = secrets.token_hex(4)
        self._token_counter = itertools.count()
        # What the last read looked up, for the consistency auditor to sample (audit.py),
        # which takes it (None: nothing was read since). One store is all a read pays.
        self.last_read: Lookup | None = None

    def close(self) -> None:
        """Stop listening to Redis and close every connection (tests; a worker just exits)."""
        self.watch.close()
        self.redis.close()

    def _namespace(self) -> Keys:
        """The database's key names, learnt from Postgres once per process."""
        return Keys.for_namespace(statements.cache_namespace(self.database))

    @property
    def keys(self) -> Keys:
        """The key names of the epoch in use."""
        return self.trust.keys

    def available(self) -> bool:
        """Whether Redis answers a PING now (for /readyz)."""
        try:
            self.trust.command("PING")
            return True
        except (CacheUnavailable, DatabaseUnavailable):
            return False

    def ask(self, *command: str | int) -> object:
        """One Redis command behind the breaker (the auditor's GET and SCAN): raises
        CacheUnavailable when Redis is not to be asked."""
        return self.trust.command(*command)

    def forget(self, keys: list[str]) -> None:
        """Delete the entries `keys` (full names, of the epoch in use) as a write would
        (leases dropped, near caches told), so the next read fills them from Postgres: the
        auditor's repair."""
        prefix = self.keys.prefix
        self._write([Put(key.removeprefix(prefix), Mode.DELETE, 0, "") for key in keys], "")

    def _new_lease_token(self) -> str:
        return f"{self._token_prefix}:{next(self._token_counter)}"

    # -- what reads and writes put ------------------------------------------------

    def _ttl_ms(self, found: bool) -> int:
        """TTL with jitter so keys filled together do not expire together."""
        jitter = self.settings.ttl_jitter
        if found:
            return int(self.settings.ttl * 1000 * random.uniform(1 - jitter, 1 + jitter))
        return int(self.settings.negative_ttl * 1000 * random.uniform(1 - jitter, 1))

    def _user_put(self, row: UserRow) -> Put:
        return Put(_user_key(row.id), Mode.STORE_UNLESS_OLDER, self._ttl_ms(True),
                   entry.of_user(row))

    def _fill_puts(self, lookup: Lookup, row: UserRow | None) -> list[Put]:
        """What a fill of `lookup` stores, given what Postgres answered."""
        if row is None:
            if lookup.field == "id":
                return [Put(_lookup_key(lookup), Mode.STORE_UNLESS_OLDER, self._ttl_ms(False),
                            entry.NOBODY)]
            return [Put(_lookup_key(lookup), Mode.STORE, self._ttl_ms(False), "")]
        puts = [self._user_put(row)]
        if lookup.field != "id":
            puts.append(Put(_lookup_key(lookup), Mode.STORE, self._ttl_ms(True), str(row.id)))
        return puts

    def _row_puts(self, row: UserRow) -> list[Put]:
        """A row's entry and its two pointers, as a create or an update stores them."""
        ttl = self._ttl_ms(True)
        return [self._user_put(row),
                *(Put(_lookup_key(Lookup.of(field, getattr(row, field))), Mode.STORE, ttl,
                      str(row.id))
                  for field in ("username", "email"))]

    # -- reads --------------------------------------------------------------------

    def read(self, lookup: Lookup, load: Load) -> Answer:
        """Cache-aside read, in steps, each answering if it can: process memory (by id, while
        Redis is trusted; the busiest case, so written out here), Redis (waiting out another
        reader's fill), Postgres alone while Redis is not to be used, and otherwise Postgres,
        filled into Redis under this reader's lease."""
        self.last_read = lookup
        near = self.near if lookup.field == "id" and self.trust.trusted() else None
        if near is not None:
            value = near.get(lookup.value)
            if value is not None:
                metrics.CACHE_HITS.inc()
                return Answer(HIT, entry.user_json(value))
            generation = near.generation  # before Redis is asked: see NearCache.put
        token = self._new_lease_token()
        try:
            reply, epoch = self._get_or_lease(lookup, token)
        except CacheUnavailable:
            return self._bypass(load)
        if reply[0] == FOUND:
            metrics.CACHE_HITS.inc()
            if near is not None:
                near.put(lookup.value, reply[1], generation)
            return Answer(HIT, entry.user_json(reply[1]))
        # Postgres is read on the timeline of the newest write acknowledged, or a later one:
        # never on a leader deposed since (a failover), whatever its sessions still answer.
        self.database.follow_timeline(int(reply[1]))
        return self._load_and_fill(lookup, load, token if reply[0] == LEASED else "", epoch)

    def _get_or_lease(self, lookup: Lookup, token: str) -> tuple[list, Epoch]:
        """READ (by id) or FOLLOW (by username or email) the lookup's key: [FOUND, value],
        [LEASED, timeline] when this reader took its lease, [BUSY, timeline] when another
        reader held it all along; and the epoch that answered."""
        key = _lookup_key(lookup)

        def keys(names: Keys) -> list[str]:
            return [names.prefix + key, names.lease(names.prefix + key), names.timeline]

        def ask() -> tuple[list, Epoch]:
            if lookup.field == "id":
                return self.trust.call(READ, keys, [token, LEASE_MS])
            return self.trust.call(FOLLOW, keys, lambda names: [
                token, LEASE_MS, names.ids, lookup.field, lookup.value])

        answer = ask()
        pause, give_up = FILL_POLL_FIRST, time.monotonic() + FILL_WAIT
        # Another reader holds the lease: ask again, backing off, until its fill came (or its
        # lease went, so this reader takes it), for at most FILL_WAIT.
        while answer[0][0] == BUSY and time.monotonic() < give_up:
            time.sleep(pause)
            pause = min(pause * 2, FILL_POLL_LAST)
            answer = ask()
        return answer

    @staticmethod
    def _bypass(load: Load) -> Answer:
        """Redis is not to be used: Postgres's answer, cached nowhere."""
        metrics.CACHE_BYPASSES.inc()
        row = load()
        return Answer(BYPASS, row.public_json if row else None)

    def _load_and_fill(self, lookup: Lookup, load: Load, lease: str, epoch: Epoch) -> Answer:
        """A miss: Postgres's answer, filled into Redis when this reader holds the lease on
        the lookup's key in `epoch` (`lease` is its token; '' when another reader's fill
        never came)."""
        metrics.CACHE_MISSES.inc()
        try:
            row = load()
        except BaseException:
            if lease:  # give the lease back: the next reader need not wait it out
                self._fill(lookup, [], lease, epoch)
            raise
        if lease:
            self._fill(lookup, self._fill_puts(lookup, row), lease, epoch)
        return Answer(MISS, row.public_json if row else None)

    def _fill(self, lookup: Lookup, puts: list[Put], lease: str, epoch: Epoch) -> None:
        """Store `puts` (and give the lease back) while this reader's lease on the lookup's key
        is still there. Not waited for: the answer is right whether or not it gets cached.
        Only in the epoch of its lease: in any other, the lease is not there."""

        def keys(names: Keys) -> list[str]:
            return [names.lease(names.prefix + _lookup_key(lookup)),
                    *(names.prefix + put.key for put in puts)]

        with contextlib.suppress(CacheUnavailable):
            self.trust.call(FILL, keys, [lease, *put_argv(puts)], wait=False, epoch=epoch)

    # -- writes -------------------------------------------------------------------

    def lease_for_write(self, user_id: int) -> str:
        """Take the lease of the user's entry before changing the row; '' when Redis is not
        to be used."""
        token = self._new_lease_token()
        try:
            self._lease(user_id, token)
        except CacheUnavailable:
            return ""
        return token

    def release_write_lease(self, user_id: int, token: str) -> None:
        """Give a write lease back after a write that changed nothing."""
        if token:
            with contextlib.suppress(CacheUnavailable):
                self._lease(user_id, "")

    def _lease(self, user_id: int, token: str) -> None:
        def keys(names: Keys) -> list[str]:
            return [names.lease(names.user(user_id))]

        self.trust.call(LEASE, keys, [token, LEASE_MS])

    def created(self, rows: Sequence[UserRow]) -> None:
        """One write-through for the rows of one or more creates (batching.py)."""
        self._write_through([put for row in rows for put in self._row_puts(row)], "")

    def updated(self, change: Update, token: str) -> None:
        puts = self._row_puts(change.row)
        fresh = {put.key for put in puts}
        for field, old in (("username", change.old_username), ("email", change.old_email)):
            key = _lookup_key(Lookup.of(field, old))
            if key not in fresh:
                puts.append(Put(key, Mode.DELETE, 0, ""))
        self._write_through(puts, token)

    def deleted(self, row: UserRow, token: str) -> None:
        tombstone = Put(_user_key(row.id), Mode.STORE_UNLESS_OLDER, self._ttl_ms(False),
                        entry.tombstone(row))
        pointers = [Put(_lookup_key(Lookup.of(field, getattr(row, field))), Mode.DELETE, 0, "")
                    for field in ("username", "email")]
        self._write_through([tombstone, *pointers], token)

    def invalidate(self, changes: Sequence[Changed]) -> None:
        """Forget what changes made by anyone (the change stream) made invalid, as the write
        path forgets it, but for what the write-through of the same change stores: each
        user's entry unless it holds the change's version or a later one, the pointers under
        the values the user has now unless they lead to it, those under the values it had
        before; every lease on them, but that a user's lease is left marked with the version,
        so that the write-through of this change (or a later one) still stores; and every
        near cache is told. When Redis fails, it is trusted again only in a new epoch;
        CacheUnavailable is raised."""
        puts = []
        for change in changes:
            # Its TTL is its mark's on the entry's lease (the Lua library's `write`).
            puts.append(Put(_user_key(change.user_id), Mode.DELETE_OLDER, LEASE_MS,
                            b"%d " % change.version))
            puts += [Put(_lookup_key(lookup), Mode.DELETE_OTHER, 0, change.user_id)
                     for lookup in change.lookups]
            puts += [Put(_lookup_key(lookup), Mode.DELETE, 0, "") for lookup in change.former]
        epoch = self.trust.epoch
        try:
            self._write(puts, "")
        except CacheUnavailable:
            self.trust.lost(epoch, "an invalidation of the change stream failed")
            raise

    def source(self, source: str, replace: bool = False) -> str:
        """The Postgres ('<system>:<timeline>') the cache's entries were read from, as the
        change stream recorded it (replacing it with `source` when `replace`); '' when none is
        recorded. Raises CacheUnavailable."""
        key = self.trust.names.namespace + "source"
        if replace:
            self.trust.command("SET", key, source)
            return source
        recorded = self.trust.command("GET", key)
        return recorded.decode() if recorded else ""

    def _write_through(self, puts: list[Put], token: str) -> None:
        """Write `puts`; when that fails, the write is acknowledged only once no read can
        find what it should have changed (Trust.write_lost)."""
        epoch = self.trust.epoch
        try:
            self._write(puts, token)
        except CacheUnavailable:
            self.trust.write_lost(epoch, lambda: self._write(puts, token))

    def _write(self, puts: list[Put], token: str) -> None:
        """One WRITE: store or delete `puts`, dropping their leases, announce every user
        among them to the near caches, and record the Postgres timeline the write committed
        on (the newest the pool knows), which every later miss reads on or after (read)."""
        ids = [put.key.removeprefix("id:") for put in puts if put.key.startswith("id:")]

        def keys(names: Keys) -> list[str]:
            entries = [names.prefix + put.key for put in puts]
            return [names.timeline, *entries, *map(names.lease, entries),
                    *(names.changes + i for i in ids)]

        self.trust.call(WRITE, keys, [token, self.database.timeline, *put_argv(puts)])
