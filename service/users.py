"""Use cases: each read or write, with its Postgres and Redis steps in the right order."""

from __future__ import annotations

from typing import Any

from . import db
from .cache import Answer, Lookup, UserCache


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
        token = self.cache.lease_for_write(user_id)
        try:
            change = db.update_user(self.database, user_id, fields)
        except Exception:
            self.cache.release(user_id, token)
            raise
        if change is None:
            self.cache.release(user_id, token)
            return None
        self.cache.updated(change, token)
        return change.row

    def delete(self, user_id: int) -> bool:
        token = self.cache.lease_for_write(user_id)
        try:
            row = db.delete_user(self.database, user_id)
        except Exception:
            self.cache.release(user_id, token)
            raise
        if row is None:
            self.cache.release(user_id, token)
            return False
        self.cache.deleted(row, token)
        return True
