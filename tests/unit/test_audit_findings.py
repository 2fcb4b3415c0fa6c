"""The consistency auditor's rules (service/cache/audit.py), without Redis or Postgres: what a
cached entry or pointer must hold given the row Postgres has, which kind of lie it is when it
holds anything else, and how a key is logged without the user's data."""

from __future__ import annotations

import pytest

from service.cache import audit, entry
from service.cache.audit import Finding
from service.cache.keys import Keys, Lookup
from service.model import UserRow

KEYS = Keys.for_namespace("0123456789ab").in_epoch("5f3a9c1e:e7")
KEY = KEYS.user(7)
POINTER = KEYS.of(Lookup.of("email", "alice@example.org"))


def row(version: int = 3, user_id: int = 7, display_name: str | None = None) -> UserRow:
    return UserRow(user_id, "alice", "alice@example.org", display_name, version, "t0", "t1")


@pytest.mark.parametrize("layer", audit.LAYERS)
@pytest.mark.parametrize("held", [None, entry.of_user(row())])
def test_an_entry_that_is_absent_or_the_rows_very_bytes_is_no_finding(
        layer: str, held: bytes | None) -> None:
    assert audit._user_finding(layer, KEY, held, row()) is None


@pytest.mark.parametrize("held", [None, entry.NOBODY, entry.tombstone(row())])
def test_nothing_or_an_empty_entry_where_no_row_is_no_finding(held: bytes | None) -> None:
    assert audit._user_finding("redis", KEY, held, None) is None


@pytest.mark.parametrize("layer", audit.LAYERS)
def test_a_user_where_no_row_is_a_value_lie(layer: str) -> None:
    held = entry.of_user(row())
    assert audit._user_finding(layer, KEY, held, None) == Finding(layer, "value", KEY, held, None)


@pytest.mark.parametrize("held", [
    entry.of_user(row(version=2)),  # an older version
    entry.of_user(row(version=3, display_name="changed behind")),  # the same version, other data
    b"3 not json",  # planted junk
])
def test_a_user_other_than_the_row_is_a_value_lie(held: bytes) -> None:
    assert audit._user_finding("near", KEY, held, row()) == Finding(
        "near", "value", KEY, held, (7, 3))


@pytest.mark.parametrize("held", [entry.NOBODY, entry.tombstone(row(version=1))])
def test_nobody_or_a_tombstone_where_a_row_is_a_nobody_lie(held: bytes) -> None:
    assert audit._user_finding("redis", KEY, held, row()) == Finding(
        "redis", "nobody", KEY, held, (7, 3))


def test_findings_against_another_row_version_are_not_the_same_lie() -> None:
    """So a re-check after the grace confirms only what is still wrong against the same row."""
    held = entry.of_user(row(version=1))
    first = audit._user_finding("redis", KEY, held, row(version=2))
    assert first == audit._user_finding("redis", KEY, held, row(version=2))
    assert first != audit._user_finding("redis", KEY, held, row(version=3))
    assert first != audit._user_finding("near", KEY, held, row(version=2))


@pytest.mark.parametrize(("held", "owner"), [(None, None), (None, row()), (b"", None),
                                             (b"7", row())])
def test_a_pointer_absent_at_the_right_user_or_nobody_where_nobody_is_no_finding(
        held: bytes | None, owner: UserRow | None) -> None:
    assert audit._pointer_finding(POINTER, held, owner) is None


def test_nobody_cached_for_a_value_someone_has_is_a_nobody_lie() -> None:
    assert audit._pointer_finding(POINTER, b"", row()) == Finding(
        "redis", "nobody", POINTER, b"", (7, 3))


@pytest.mark.parametrize(("held", "owner", "truth"), [
    (b"8", row(), (7, 3)),  # another user's id
    (b"7", None, None),  # a user for a value nobody has
    (b"70", row(), (7, 3)), (b"junk", row(), (7, 3)),
])
def test_a_pointer_at_anyone_but_the_owner_is_a_pointer_lie(
        held: bytes, owner: UserRow | None, truth: tuple[int, int] | None) -> None:
    assert audit._pointer_finding(POINTER, held, owner) == Finding(
        "redis", "pointer", POINTER, held, truth)


def test_the_pointers_to_check_are_those_of_the_row_and_of_what_was_cached() -> None:
    cached = {"username": "Alicia", "email": "OLD@example.org", "display_name": "x", "id": 7}
    assert audit._pointer_values(row(), cached, {"username": None}) == {
        ("username", "alice"), ("email", "alice@example.org"),
        ("username", "alicia"), ("email", "old@example.org")}


@pytest.mark.parametrize("held", [None, b"", entry.NOBODY, entry.tombstone(row()), b"3 not json",
                                  b'3 ["a list"]', b"3 7"])
def test_only_a_cached_json_object_is_read_as_a_user(held: bytes | None) -> None:
    assert audit._decoded(held) is None


def test_a_cached_user_is_decoded() -> None:
    assert audit._decoded(entry.of_user(row()))["email"] == "alice@example.org"


def test_a_user_key_is_logged_as_it_is() -> None:
    """An id is not the user's data; it lets the log be matched with the database."""
    assert audit.loggable(KEYS.user(7)) == KEYS.user(7)
    assert audit.loggable(KEYS.lease(KEYS.user(7))) == KEYS.lease(KEYS.user(7))


@pytest.mark.parametrize("field", ["username", "email"])
def test_a_pointer_key_is_logged_without_its_value(field: str) -> None:
    key = KEYS.of(Lookup.of(field, "alice@example.org"))
    line = audit.loggable(key)
    assert "alice" not in line and line.startswith(f"{KEYS.prefix}{field}:#"), line
    assert line == audit.loggable(key)  # the same digest each time: log lines can be matched
    assert line != audit.loggable(KEYS.of(Lookup.of(field, "bob@example.org")))
