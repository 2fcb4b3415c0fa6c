"""The value the cache keeps for a user id, one format for Redis, the near caches and the
auditor (the Lua library, lua/cachestack.lua, reads its version): `<version> <json>` for a
user, `<version> ` for a deleted one (a tombstone), `0 ` for an id nobody has. The JSON is
the exact body the API sends (model.UserRow.public_json). Pointers (`username:`, `email:`)
hold an id or '' for nobody instead (keys.py)."""

from __future__ import annotations

from ..model import UserRow

NOBODY = b"0 "


def of_user(row: UserRow) -> bytes:
    return b"%d " % row.version + row.public_json


def tombstone(row: UserRow) -> bytes:
    """What deleting `row` leaves: a version above its last (so no older fill can bring the
    row back), and no JSON."""
    return b"%d " % (row.version + 1)


def user_json(value: bytes) -> bytes | None:
    """The user's JSON in an entry; None for a tombstone or nobody."""
    return value.partition(b" ")[2] or None
