"""The consistency auditor: it catches the cache lying, counts it, and deletes the lie.

Postgres is the truth; Redis and the near caches hold copies, and the commonest lie a cache
tells is a row changed in Postgres behind the service's back (plain SQL that leaves the
version alone). So each process samples what it serves: every read leaves its lookup in one
attribute (UserCache.last_read, one store is all a request pays: a bounded deque's append
cost measurably more), and a daemon thread wakes CACHE_AUDIT_PER_SECOND times a second, takes
the lookup last read and compares, with connections of its own, off the request path:
- by id: the Redis entry and the near-cache entry with the row as the service would serialise
  it (`<version> <json>`, the same bytes; a tombstone or "nobody" only where no row is), and
  the username and email pointers of both the row and the cached entry (each must point at
  the user who has that value, and "nobody" must not be cached for a value someone has);
- by username or email: the pointer, likewise.

A disagreement is not yet a fault: a write may be between its commit and its write-through.
It is looked at again after GRACE_SECONDS (far longer than a write-through, which gives up
after CACHE_TIMEOUT_MS), and only a finding seen both times, against the same row version,
is counted (cache_inconsistencies_total{layer, kind}), logged by key, never with the user's
data, and repaired: the keys are deleted as a write deletes them (UserCache.forget), which
drops their leases and tells every process's near cache, so the next read fills from Postgres.

When Redis or Postgres is unavailable a sample is skipped without a word; nothing the
auditor does can fail a request or stop a worker. `python -m service audit` runs the same
comparisons once over every key the cache holds (full_pass), in paced batches.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from .. import metrics
from ..model import UserRow
from ..postgres import statements
from ..postgres.pool import Database, DatabaseUnavailable
from ..settings import PostgresSettings
from . import entry
from .keys import Lookup
from .policy import CacheUnavailable, UserCache

log = logging.getLogger(__name__)

GRACE_SECONDS = 2.0  # a write-through takes at most CACHE_TIMEOUT_MS (100 ms by default)
LAYERS = ("redis", "near")
KINDS = ("value", "pointer", "nobody")  # a stale user entry; a stale pointer; a wrong nobody
POINTER_FIELDS = ("username", "email")
# The full pass: keys per batch, the pause after each (bounds its load on the service), and
# how many key names each SCAN asks for.
BATCH, BATCH_PAUSE_SECONDS, SCAN_COUNT = 100, 0.2, 500


@dataclass(frozen=True, slots=True)
class Finding:
    """One cached entry that disagrees with Postgres: where it is, what kind of lie, what it
    held and the row (id, version) it was judged against (None: no row). Two findings are
    the same lie only if all of that is equal."""

    layer: str
    kind: str
    key: str
    held: bytes
    truth: tuple[int, int] | None


def _truth(row: UserRow | None) -> tuple[int, int] | None:
    return (row.id, row.version) if row else None


def _user_finding(layer: str, key: str, held: bytes | None,
                  row: UserRow | None) -> Finding | None:
    """A user's entry (`<version> <json>`, a tombstone `<version> `, nobody `0 `) judged
    against its row: it must be the row's very bytes, or empty where there is no row."""
    if held is None:
        return None
    if row is None:
        return Finding(layer, "value", key, held, None) if entry.user_json(held) else None
    if held == entry.of_user(row):
        return None
    kind = "value" if entry.user_json(held) else "nobody"
    return Finding(layer, kind, key, held, _truth(row))


def _pointer_finding(key: str, held: bytes | None, row: UserRow | None) -> Finding | None:
    """A pointer (`username:`/`email:`, an id or '' for nobody) judged against the row that
    has the value in Postgres (None: nobody has it)."""
    if held is None or (held == b"" and row is None):
        return None
    if held == b"":
        return Finding("redis", "nobody", key, held, _truth(row))
    if row is not None and held == str(row.id).encode():
        return None
    return Finding("redis", "pointer", key, held, _truth(row))


def _pointer_values(*users: Any) -> set[tuple[str, str]]:
    """The (field, lowered value) pairs of the given users (rows or decoded JSON)."""
    values = set()
    for user in users:
        for name in POINTER_FIELDS:
            value = user.get(name) if isinstance(user, dict) else getattr(user, name, None)
            if isinstance(value, str):
                values.add((name, value.lower()))
    return values


def _decoded(held: bytes | None) -> dict | None:
    """A cached entry's JSON, or None (absent, empty, or not JSON: planted junk)."""
    body = entry.user_json(held) if held else None
    if body is None:
        return None
    try:
        user = json.loads(body)
    except ValueError:
        return None
    return user if isinstance(user, dict) else None


def loggable(key: str) -> str:
    """A key as the log shows it: pointers carry a username or an email, which is the user's
    data, so their value is replaced by a short digest (enough to match two log lines)."""
    parts = key.split(":", 5)  # cs, 1, the namespace, the epoch, the kind, the rest
    if len(parts) == 6 and parts[4] in POINTER_FIELDS:
        digest = hashlib.sha256(parts[5].encode()).hexdigest()[:12]
        return ":".join([*parts[:5], f"#{digest}"])
    return key


def own_database(settings: PostgresSettings) -> Database:
    """The auditor's own Postgres session (one, used by its one thread): it never takes a
    connection a request is waiting for, and its statements are not in db_queries (which
    counts what requests cost). It says nothing when Postgres is away: the service's pool
    already said so."""
    return Database(settings, statements.PREPARED, name="cachestack-audit", size=1,
                    counted=False, reports=False)


class Auditor:
    """Compares what `cache` holds for a lookup with what `database` says (see the module
    docstring); `check` finds, `confirm` re-checks after the grace, `repair` counts,
    logs and deletes."""

    def __init__(self, cache: UserCache, database: Database) -> None:
        self.cache = cache
        self.database = database

    def _get(self, key: str) -> bytes | None:
        value = self.cache.ask("GET", key)
        return value if isinstance(value, bytes) else None

    def _row(self, field: str, value: str | int) -> UserRow | None:
        rows = statements.find_users(self.database, field, value)
        return rows[0] if rows else None

    def check(self, lookup: Lookup) -> frozenset[Finding]:
        """What disagrees with Postgres now among the entries of `lookup` (one audit). Raises
        CacheUnavailable or DatabaseUnavailable when either cannot be asked."""
        metrics.CACHE_AUDITS.inc()
        return self._compare(lookup)

    def _compare(self, lookup: Lookup) -> frozenset[Finding]:
        if lookup.field == "id":
            return self._check_user(lookup.value)
        return self._check_pointer(lookup.field, lookup.value)

    def _check_user(self, user_id: str) -> frozenset[Finding]:
        if not user_id.isdigit():
            return frozenset()
        key = self.cache.keys.user(user_id)
        near = self.cache.near if not self.cache.trust.breaker.tripped else None
        # The copies first, then the truth: a write in between shows up as a copy older than
        # the row, which the grace re-check then sees healed.
        in_near = near.get(user_id) if near is not None else None
        in_redis = self._get(key)
        row = self._row("id", int(user_id))
        found = {_user_finding("redis", key, in_redis, row),
                 _user_finding("near", key, in_near, row)}
        cached = [user for user in map(_decoded, (in_redis, in_near)) if user]
        for field, value in _pointer_values(*([row] if row else []), *cached):
            owner = row if row and getattr(row, field).lower() == value else self._row(field, value)
            pointer = self.cache.keys.of(Lookup(field, value))
            found.add(_pointer_finding(pointer, self._get(pointer), owner))
        return frozenset(finding for finding in found if finding)

    def _check_pointer(self, field: str, value: str) -> frozenset[Finding]:
        if field not in POINTER_FIELDS:
            return frozenset()
        key = self.cache.keys.of(Lookup(field, value))
        held = self._get(key)
        if held is None:
            return frozenset()
        finding = _pointer_finding(key, held, self._row(field, value))
        return frozenset([finding] if finding else [])

    def confirm(self, lookup: Lookup, first: frozenset[Finding]) -> frozenset[Finding]:
        """The findings of `first` that a new check of `lookup` finds again, unchanged."""
        return first & self._compare(lookup)

    def repair(self, findings: Iterable[Finding]) -> None:
        """Count and log each confirmed finding, then delete its keys from Redis as a write
        would (which also tells every near cache)."""
        findings = sorted(findings, key=lambda f: (f.key, f.layer))
        for finding in findings:
            metrics.CACHE_INCONSISTENCIES.labels(finding.layer, finding.kind).inc()
            log.warning("cache inconsistency: %s %s at %s (deleted; the next read fills it)",
                        finding.layer, finding.kind, loggable(finding.key))
        keys = sorted({finding.key for finding in findings})
        if keys:
            self.cache.forget(keys)


@dataclass
class _Suspect:
    lookup: Lookup
    findings: frozenset[Finding]
    due: float


class Sampler:
    """The auditor's thread in a serving process: `rate` samples a second of what its reads
    looked up, each disagreement re-checked after `grace`."""

    def __init__(self, auditor: Auditor, rate: float, grace: float = GRACE_SECONDS) -> None:
        self.auditor = auditor
        self.interval = 1 / rate
        self.grace = grace
        self._suspects: list[_Suspect] = []
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cache-auditor", daemon=True)
        self._failing = ""  # the last unexpected error's type, logged once

    def start(self) -> Sampler:
        for layer in LAYERS:  # every series shows from the start, at 0
            for kind in KINDS:
                metrics.CACHE_INCONSISTENCIES.labels(layer, kind)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sampling (tests; a worker simply exits) and close its Postgres session."""
        self._stopping.set()
        self._thread.join(5)
        self.auditor.database.close()

    def _run(self) -> None:
        while not self._stopping.wait(self.interval):
            try:
                self.tick()
            except (CacheUnavailable, DatabaseUnavailable):
                pass  # skipped quietly: the service already logs outages
            except Exception as exc:  # never let the auditor stop, nor say the same twice
                if type(exc).__name__ != self._failing:
                    self._failing = type(exc).__name__
                    log.warning("cache auditor: sample skipped: %s", self._failing)

    def tick(self) -> None:
        """Re-check the suspects that are due, then take one new sample."""
        now = time.monotonic()
        due = [s for s in self._suspects if s.due <= now]
        self._suspects = [s for s in self._suspects if s.due > now]
        for suspect in due:
            self.auditor.repair(self.auditor.confirm(suspect.lookup, suspect.findings))
        lookup = self._sample()
        if lookup is not None:
            findings = self.auditor.check(lookup)
            if findings:
                self._suspects.append(_Suspect(lookup, findings, now + self.grace))

    def _sample(self) -> Lookup | None:
        """The lookup read last, taken (None: nothing was served since the last sample), unless
        it already waits for its re-check."""
        cache = self.auditor.cache
        lookup, cache.last_read = cache.last_read, None
        if lookup is None or any(s.lookup == lookup for s in self._suspects):
            return None
        return lookup


def start_sampler(cache: UserCache, database: Database, rate: float) -> Sampler | None:
    """The process's auditor thread, comparing `rate` samples a second with `database` (its
    own: own_database); None when `rate` is 0."""
    if rate <= 0:
        return None
    return Sampler(Auditor(cache, database), rate).start()


# -- the full pass: python -m service audit --------------------------------------------


def cached_lookups(auditor: Auditor, pause: Callable[[], None]) -> list[Lookup]:
    """Every user entry and pointer Redis holds under the database's prefix, as lookups
    (SCAN, paced by `pause` between calls), of the epoch in use once Redis answered."""
    auditor.cache.ask("PING")
    prefix = auditor.cache.keys.prefix
    found: list[Lookup] = []
    cursor: bytes | str = "0"
    while True:
        reply = auditor.cache.ask("SCAN", cursor, "MATCH", f"{prefix}*", "COUNT", SCAN_COUNT)
        cursor, names = reply if isinstance(reply, list) else (b"0", [])
        for name in names:
            field, _, value = name.decode()[len(prefix):].partition(":")
            if field == "id" or field in POINTER_FIELDS:
                found.append(Lookup(field, value))
        if cursor in (b"0", "0"):
            return sorted(set(found), key=lambda lookup: (lookup.field, lookup.value))
        pause()


def _batches(items: list[Lookup], size: int) -> Iterator[list[Lookup]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def full_pass(auditor: Auditor, progress: Callable[[int, int], None],
              batch: int = BATCH, pause_seconds: float = BATCH_PAUSE_SECONDS,
              grace: float = GRACE_SECONDS) -> Counter[str]:
    """Check every cached user and pointer once, `batch` at a time with a pause after each;
    re-check each disagreement after `grace`, repair what persisted; its count by kind.
    `progress(done, total)` is told after each batch."""
    lookups = cached_lookups(auditor, lambda: time.sleep(pause_seconds / 10))
    suspects: list[_Suspect] = []
    found: Counter[str] = Counter(dict.fromkeys(KINDS, 0))

    def settle(until: float) -> None:
        while suspects and suspects[0].due <= until:
            suspect = suspects.pop(0)
            time.sleep(max(0.0, suspect.due - time.monotonic()))
            confirmed = auditor.confirm(suspect.lookup, suspect.findings)
            auditor.repair(confirmed)
            found.update(finding.kind for finding in confirmed)

    done = 0
    progress(done, len(lookups))
    for chunk in _batches(lookups, batch):
        for lookup in chunk:
            findings = auditor.check(lookup)
            if findings:
                suspects.append(_Suspect(lookup, findings, time.monotonic() + grace))
        done += len(chunk)
        progress(done, len(lookups))
        settle(time.monotonic())
        time.sleep(pause_seconds)
    settle(float("inf"))
    return found
