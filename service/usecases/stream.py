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
from collections.abc import Sequence

from .. import metrics
from ..cache.keys import Lookup
from ..cache.policy import CacheUnavailable, UserCache
from ..postgres.changes import ChangeStream, SlotBusy
from ..postgres.pgoutput import UNCHANGED, Commit, Decoder, RowChange, Truncate
from ..postgres.pool import DatabaseUnavailable

log = logging.getLogger(__name__)

TABLE = "users"
POINTER_FIELDS = ("username", "email")
BATCH = 256  # rows whose invalidations go to Redis in one call (a bound on memory too)
RETRY_SECONDS = 1.0
WAIT_SECONDS = 1.0  # how long a read waits for a message


class Unmappable(Exception):
    """A change the stream cannot turn into keys: only a new epoch covers it."""


def keys_of(change: RowChange) -> tuple[str, int, Sequence[Lookup]]:
    """The user a change touched, the version it left (a delete: one above the row's last, as
    a tombstone), and the lookups it made invalid: its username and email before and after."""
    rows = [row for row in (change.old, change.new) if row is not None]
    if change.kind == "update" and (change.old is None or UNCHANGED in change.old.values()):
        raise Unmappable("an update without the row it replaced (REPLICA IDENTITY FULL?)")
    try:
        version = int(str(rows[-1]["version"])) + (change.kind == "delete")
    except (KeyError, ValueError):
        raise Unmappable("a change without the row's version") from None
    lookups = {Lookup.of(field, row[field]) for row in rows for field in POINTER_FIELDS
               if isinstance(row.get(field), str)}
    return (str(rows[0]["id"]), version,
            sorted(lookups, key=lambda lookup: (lookup.field, lookup.value)))


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
                if self.stream.start():
                    self._begin_anew("the replication slot was made anew")
                if self.cache.source(self.stream.source) != self.stream.source:
                    # Another server or timeline than the cache was filled from (a failover):
                    # commits the cache saw may be lost to this one.
                    self._begin_anew(f"postgres is now {self.stream.source}")
                    self.cache.source(self.stream.source, replace=True)
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

    def _read(self, stop: threading.Event) -> None:
        decoder = Decoder()
        pending: list[tuple[str, int, Sequence[Lookup]]] = []
        while not stop.is_set():
            idle = True
            for payload in self.stream.messages(WAIT_SECONDS):
                idle = False
                message = decoder.decode(payload)
                if isinstance(message, RowChange) and message.relation.name == TABLE:
                    try:
                        pending.append(keys_of(message))
                    except Unmappable as exc:
                        pending.clear()
                        self._begin_anew(str(exc))
                    if len(pending) >= BATCH:
                        self._apply(pending)
                elif isinstance(message, Truncate) and any(
                        relation.name == TABLE for relation in message.relations):
                    pending.clear()
                    self._begin_anew(f"{TABLE} was truncated")
                elif isinstance(message, Commit):
                    self._apply(pending)
                    self.stream.confirm(message.end_lsn)
                    metrics.STREAM_LAG.observe(max(0.0, (
                        datetime.datetime.now(datetime.UTC) - message.committed_at)
                        .total_seconds()))
            if idle:
                self.stream.confirm()  # everything sent so far is applied

    def _apply(self, pending: list[tuple[str, int, Sequence[Lookup]]]) -> None:
        if pending:
            self.cache.invalidate(pending)
            metrics.STREAM_CHANGES.inc(len(pending))
            pending.clear()

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
