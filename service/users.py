"""Use cases: each read or write, with its Postgres and Redis steps in the right order."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from . import db
from .cache import Answer, UserCache
from .keys import Lookup

R = TypeVar("R")


class Users:
    """Postgres is the source of truth; the cache is told about every committed change."""

    def __init__(self, database: db.Database, cache: UserCache) -> None:
        self.database = database
        self.cache = cache

    def find(self, lookup: Lookup) -> Answer:
        def load() -> db.UserRow | None:
            rows = db.find_users(self.database, lookup.field, lookup.value)
            return rows[0] if rows else None

        return self.cache.read(lookup, load)

    def create(self, fields: dict[str, Any]) -> db.UserRow:
        row = db.insert_user(self.database, fields["username"], fields["email"],
                             fields.get("display_name"))
        self.cache.created(row)
        return row

    def update(self, user_id: int, fields: dict[str, Any]) -> db.UserRow | None:
        change, token = self._leased(user_id, lambda: db.update_user(self.database, user_id,
                                                                     fields))
        if change is None:
            return None
        self.cache.updated(change, token)
        return change.row

    def delete(self, user_id: int) -> bool:
        row, token = self._leased(user_id, lambda: db.delete_user(self.database, user_id))
        if row is None:
            return False
        self.cache.deleted(row, token)
        return True

    def _leased(self, user_id: int, write: Callable[[], R | None]) -> tuple[R | None, str]:
        """Change a row while holding its cache lease (see cache.py); the lease is given back
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
