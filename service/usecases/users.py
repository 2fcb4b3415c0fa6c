"""Use cases: each read or write, with its Postgres and Redis steps in the right order.

Creates and reads by id that a process has in flight at once share their statements and
write-throughs (batching.py): a batch of creates is one INSERT and one write-through, a
batch of reads one SELECT.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from ..cache.keys import Lookup
from ..cache.policy import Answer, UserCache
from ..model import NewUser, UserRow
from ..postgres import statements
from ..postgres.pool import Database, DatabaseUnavailable
from .batching import Combiner

R = TypeVar("R")


class Users:
    """Postgres is the source of truth; the cache is told about every committed change."""

    def __init__(self, database: Database, cache: UserCache, batching: bool = True,
                 stream_slot: str = "") -> None:
        """`batching`: whether concurrent work shares its statements (Settings.batching);
        `stream_slot`: the change stream's slot, whose state `state()` tells."""
        self.database = database
        self.cache = cache
        self._stream_slot = stream_slot
        # A Postgres that fails fails every item of a batch alike. Any other error runs each
        # alone (batching.py), which is safe: the creates' INSERT leaves nothing done when it
        # fails, and their write-through raises nothing but DatabaseUnavailable.
        shared = (DatabaseUnavailable,)
        self._creates = Combiner("create", self._create_many, batching, shared)
        self._loads = Combiner("load_by_id", self._load_by_ids, batching, shared)

    def _create_many(self, users: Sequence[NewUser]) -> list[UserRow | None]:
        """One INSERT, then one write-through of every row it inserted: each user's row,
        None where it conflicted."""
        rows = statements.insert_users(self.database, users)
        inserted = [row for row in rows if row is not None]
        if inserted:
            self.cache.created(inserted)
        return rows

    def _load_by_ids(self, ids: Sequence[int]) -> list[UserRow | None]:
        return statements.find_users_by_ids(self.database, ids)

    def state(self) -> dict[str, object]:
        """What /readyz says: whether Postgres answers (DatabaseUnavailable when not), whether
        Redis does, and whether the change stream is read and how far behind it is."""
        stream = statements.stream_state(self.database, self._stream_slot)
        return {
            "database": "ok",
            "cache": "ok" if self.cache.available() else "degraded",
            "stream": ({"reading": stream[0], "behind_bytes": stream[1]} if stream
                       else "absent"),
        }

    def close(self) -> None:
        """Close the cache's and the pool's connections (tests; a worker just exits)."""
        self.cache.close()
        self.database.close()

    def find(self, lookup: Lookup) -> Answer:
        def load() -> UserRow | None:
            if lookup.field == "id":
                return self._loads(int(lookup.value))
            rows = statements.find_users(self.database, lookup.field, lookup.value)
            return rows[0] if rows else None

        return self.cache.read(lookup, load)

    def create(self, fields: dict[str, Any]) -> UserRow:
        """The new row, once Postgres committed it and Redis acknowledged its write-through."""
        user = NewUser(fields["username"], fields["email"], fields.get("display_name"))
        row = self._creates(user)
        if row is None:  # it conflicted in its batch: its own insert says with which field
            row = statements.insert_user(self.database, *user)
            self.cache.created([row])
        return row

    def update(self, user_id: int, fields: dict[str, Any]) -> UserRow | None:
        change, token = self._leased(user_id, lambda: statements.update_user(self.database, user_id,
                                                                     fields))
        if change is None:
            return None
        self.cache.updated(change, token)
        return change.row

    def delete(self, user_id: int) -> bool:
        row, token = self._leased(user_id, lambda: statements.delete_user(self.database, user_id))
        if row is None:
            return False
        self.cache.deleted(row, token)
        return True

    def _leased(self, user_id: int, write: Callable[[], R | None]) -> tuple[R | None, str]:
        """Change a row while holding its cache lease (see cache/policy.py); the lease is given back
        when the write fails or finds no row, and otherwise handed on to the write-through."""
        token = self.cache.lease_for_write(user_id)
        try:
            result = write()
        except Exception:
            self.cache.release_write_lease(user_id, token)
            raise
        if result is None:
            self.cache.release_write_lease(user_id, token)
        return result, token
