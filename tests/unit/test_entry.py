"""The value the cache keeps for a user id (service/cache/entry.py): `<version> <json>`, a
tombstone `<version> ` one above the deleted row's, `0 ` for nobody; the JSON is the row's
public JSON (service/model.py), the exact bytes the API sends."""

from __future__ import annotations

import json
import re

from service.cache import entry
from service.model import UserRow

# How the functions Redis runs read an entry's version (service/cache/lua/cachestack.lua).
LUA_VERSION = re.compile(rb"(\d+) ")


def row(version: int = 3, display_name: str | None = "Alice L.") -> UserRow:
    return UserRow(7, "Alice", "alice@example.org", display_name, version,
                   "2026-01-02T03:04:05.678901+00:00", "2026-01-03T03:04:05.678901+00:00")


def lua_version(value: bytes) -> int:
    found = LUA_VERSION.match(value)
    return int(found.group(1)) if found else 0


def test_a_users_public_json_is_compact_in_a_fixed_order_and_utf8() -> None:
    user = UserRow(7, "Zoë", "zoe@example.org", None, 1, "t0", "t1")
    assert user.public_json == ('{"id":7,"username":"Zoë","email":"zoe@example.org",'
                                '"display_name":null,"created_at":"t0","updated_at":"t1"}'
                                ).encode()
    assert "version" not in json.loads(user.public_json)


def test_the_public_json_is_not_part_of_a_rows_equality_or_repr() -> None:
    assert row() == row() and "public_json" not in repr(row())


def test_a_users_entry_is_its_version_then_its_public_json() -> None:
    value = entry.of_user(row(version=12))
    assert value == b"12 " + row().public_json
    assert lua_version(value) == 12
    assert entry.user_json(value) == row().public_json


def test_a_tombstone_holds_a_version_above_the_deleted_rows_and_no_json() -> None:
    value = entry.tombstone(row(version=12))
    assert value == b"13 " and lua_version(value) == 13 > lua_version(entry.of_user(row(12)))
    assert entry.user_json(value) is None


def test_nobody_is_version_0_without_json() -> None:
    assert entry.NOBODY == b"0 " and lua_version(entry.NOBODY) == 0
    assert entry.user_json(entry.NOBODY) is None


def test_a_json_with_spaces_comes_back_whole() -> None:
    spaced = row(display_name="a b  c ")
    assert entry.user_json(entry.of_user(spaced)) == spaced.public_json
