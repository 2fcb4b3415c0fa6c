"""The cache is right whoever writes: every committed change to users, made by the service
or by anyone else (an operator's psql, a batch job, a migration), invalidates what it made
invalid in the cache, from Postgres's own change stream (postgres/changes.py).

Delivery is at least once, in commit order: a position is confirmed to Postgres only once
Redis acknowledged the invalidations up to it, so a reader that dies is followed by one that
starts again from there; invalidations are deletions, which may come twice. What the stream
cannot tell (a TRUNCATE, a slot made anew, so changes before it are lost to it, an update
without the row it replaced, a Postgres of another timeline than the cache was filled from, as
after a failover, which may have lost commits) begins a new cache epoch instead, before
anything else is read.
Readers take turns: Postgres lets one at a time read the slot, the others try again every
RETRY_SECONDS (docs/design.md, "The change stream").
"""

from __future__ import annotations

import datetime
import logging
import threading
import time

from .. import metrics
from ..cache.keys import Lookup
from ..cache.policy import CacheUnavailable, Changed, UserCache
from ..postgres.changes import ChangeStream, SlotBusy
from ..postgres.pgoutput import UNCHANGED, Commit, Decoder, RowChange, Truncate
from ..postgres.pool import DatabaseUnavailable

log = logging.getLogger(__name__)

TABLE = "users"
POINTER_FIELDS = ("username", "email")
BATCH = 256  # rows whose invalidations go to Redis in one call (a bound on memory too)
RETRY_SECONDS = 1.0
WAIT_SECONDS = 1.0  # how long a read waits for a message
# How long a read gathers what follows its first message before applying it: many small
# transactions (the service's own creates, one after another) then cost one call to Redis
# and one confirmation, not one each, for a few milliseconds of lag.
LINGER_SECONDS = 0.005


class Unmappable(Exception):
    """A change the stream cannot turn into keys: only a new epoch covers it."""


def changed(change: RowChange) -> Changed:
    """The user a change touched, as it left it: its version (a deleted user's tombstone's,
    one above its last, as the write path's), the lookups of the values it has and those of
    the values it had."""
    if change.kind != "insert" and (change.old is None or UNCHANGED in change.old.values()
                                    or not isinstance(change.old.get("version"), str)):
        raise Unmappable(f"a change ({change.kind}) without the row it replaced "
                         "(REPLICA IDENTITY FULL?)")
    row = change.new if change.new is not None else change.old
    lookups = _lookups(change.new)
    version = int(row["version"]) + (change.new is None)
    return Changed(str(row["id"]), version, tuple(lookups), tuple(_lookups(change.old) - lookups))


def _lookups(row: dict[str, object] | None) -> set[Lookup]:
    return {Lookup.of(field, row[field]) for field in POINTER_FIELDS
            if row is not None and isinstance(row.get(field), str)}


class Batch:
    """What was read but not yet applied: the changes' keys, and the commits they complete
    (the first one's time: the longest any of them waited)."""

    def __init__(self) -> None:
        self.pending: list[Changed] = []
        self.last_commit: Commit | None = None
        self.first_commit_at: datetime.datetime | None = None

    def committed(self, commit: Commit) -> None:
        self.last_commit = commit
        self.first_commit_at = self.first_commit_at or commit.committed_at


class StreamReader:
    """One reader of the change stream; `run` until `stop` is set."""

    def __init__(self, stream: ChangeStream, cache: UserCache) -> None:
        self.stream = stream
        self.cache = cache
        self.reading = False  # it has the slot and is up to date with what it read
        # It has taken its turn: it reads (its start checks done, a new epoch begun if one was
        # due), or found that another reader has the slot. What its readiness says.
        self.settled = False
        self._problem = ""

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.stream.start(self._before_reading)
                self._say("")
                self.reading = self.settled = True
                self._read(stop)
            except SlotBusy:
                self.settled = True
                self._say("another reader has the slot; waiting to take over")
            except (DatabaseUnavailable, CacheUnavailable) as exc:
                self.settled = False
                self._say(f"change stream stopped: {exc}")
            finally:
                self.reading = False
                self.stream.close()
            stop.wait(RETRY_SECONDS)

    def _before_reading(self, made_anew: bool) -> None:
        """What the stream cannot have given: the changes before a slot made anew, or those a
        server other than the one the cache was filled from may lack (a failover's new
        timeline). Done before the slot is read, so that a reader seen reading has done it."""
        if made_anew:
            self._begin_anew("the replication slot was made anew")
        source = self.stream.source
        if self.cache.source(source) != source:
            self._begin_anew(f"postgres is now {source}")
            self.cache.source(source, replace=True)

    def _read(self, stop: threading.Event) -> None:
        decoder = Decoder()
        batch = Batch()
        idle_at = 0.0  # when the last read that found no message ended
        while not stop.is_set():
            idle = True
            for payload in self.stream.messages(WAIT_SECONDS, LINGER_SECONDS):
                idle = False
                message = decoder.decode(payload)
                if isinstance(message, RowChange) and message.relation.name == TABLE:
                    try:
                        batch.pending.append(changed(message))
                    except Unmappable as exc:
                        batch.pending.clear()
                        self._begin_anew(str(exc))
                elif isinstance(message, Truncate) and any(
                        relation.name == TABLE for relation in message.relations):
                    batch.pending.clear()
                    self._begin_anew(f"{TABLE} was truncated")
                elif isinstance(message, Commit):
                    batch.committed(message)
                if len(batch.pending) >= BATCH:
                    self._apply(batch)
            # What was waiting is read: apply it, then confirm the commits it completed (one
            # call to Redis and one confirmation for many small transactions under load).
            self._apply(batch)
            if idle:
                self.stream.confirm()  # everything sent so far is applied
                # Woken by keepalives alone, one on the heels of another (every commit the
                # stream is not sent brings one: the service's own creates, in a flood): let
                # the next ones gather instead of waking for each.
                if time.monotonic() - idle_at < LINGER_SECONDS:
                    stop.wait(LINGER_SECONDS)
                idle_at = time.monotonic()

    def _apply(self, batch: Batch) -> None:
        """Invalidate what is pending, then confirm the last commit seen: changes reach the
        slot's reader only once their transaction committed, so every change up to it is
        applied."""
        if batch.pending:
            self.cache.invalidate(batch.pending)
            metrics.STREAM_CHANGES.inc(len(batch.pending))
            batch.pending.clear()
        if batch.last_commit is not None:
            self.stream.confirm(batch.last_commit.end_lsn)
            metrics.STREAM_LAG.observe(max(0.0, (datetime.datetime.now(datetime.UTC)
                                                 - batch.first_commit_at).total_seconds()))
            batch.last_commit = batch.first_commit_at = None

    def _begin_anew(self, why: str) -> None:
        log.warning("change stream: %s; the cache begins a new epoch", why)
        metrics.STREAM_NEW_EPOCHS.inc()
        self.cache.trust.begin_new_epoch(why)

    def _say(self, problem: str) -> None:
        """Log a change of state (a problem, or its end), not every retry."""
        if problem != self._problem:
            if problem:
                log.warning("%s", problem)
            else:
                log.info("change stream: reading")
        self._problem = problem
