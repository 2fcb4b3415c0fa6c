"""The repair log: keys a write-through could not update, kept in Postgres (the
cache_repairs table) until they are deleted from Redis.

A write is acknowledged once Postgres committed it, whether or not Redis took its
write-through. When Redis did not, the keys it would have changed may hold old data: Redis
may have been merely slow, or come back with its append-only file. So every process deletes
the logged keys before it trusts Redis again (UserCache, whenever its breaker tripped), and
only then forgets them; a repair cut short is simply done again.
"""

from __future__ import annotations

from collections.abc import Callable

from ..postgres import statements
from ..postgres.pool import Database


class RepairLog:
    """The keys one database's writes could not update in Redis."""

    def __init__(self, database: Database) -> None:
        self.database = database

    def record(self, keys: list[str]) -> None:
        """Log keys a write-through could not update (a key logged twice is kept once)."""
        statements.record_cache_repairs(self.database, keys)

    def replay(self, delete: Callable[[list[str]], None]) -> int:
        """Delete every logged key from Redis with `delete`, then forget them; how many."""
        keys = statements.pending_cache_repairs(self.database)
        if keys:
            delete(keys)
            statements.clear_cache_repairs(self.database, keys)
        return len(keys)
