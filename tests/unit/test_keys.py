"""The cache's key layout (service/cache/keys.py), and the stack's Redis user rules
(docker/redis/users.acl) that must cover every key and channel the service uses."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import pytest

from service.cache.keys import FORMAT, Keys, Lookup
from service.wire.listener import CHANNEL

ACL = Path(__file__).resolve().parents[2] / "docker" / "redis" / "users.acl"
NAMES = Keys.for_namespace("0123456789ab")
EPOCH = NAMES.in_epoch("5f3a9c1e:e7")


def test_a_namespace_holds_the_epoch_and_the_change_channel_key_outside_any_epoch() -> None:
    assert NAMES.namespace == f"{FORMAT}0123456789ab:" == "cs:1:0123456789ab:"
    assert NAMES.prefix == ""  # no entry is named until an epoch is known
    assert NAMES.epoch == "cs:1:0123456789ab:epoch"
    assert NAMES.changes == "cs:1:0123456789ab:changed:"
    assert (EPOCH.epoch, EPOCH.changes) == (NAMES.epoch, NAMES.changes)


def test_an_epochs_entries_live_under_its_name_not_its_run_id() -> None:
    assert EPOCH.namespace == NAMES.namespace
    assert EPOCH.prefix == "cs:1:0123456789ab:e7:"
    assert NAMES.in_epoch("e8").prefix == "cs:1:0123456789ab:e8:"
    assert EPOCH.in_epoch("other:e9").prefix == "cs:1:0123456789ab:e9:"  # from any epoch


def test_a_users_entry_and_its_pointers() -> None:
    assert EPOCH.ids == "cs:1:0123456789ab:e7:id:"
    assert EPOCH.user(42) == EPOCH.user("42") == "cs:1:0123456789ab:e7:id:42"
    assert EPOCH.of(Lookup.of("id", 42)) == EPOCH.user(42)
    assert EPOCH.of(Lookup.of("username", "Alice")) == "cs:1:0123456789ab:e7:username:alice"
    assert EPOCH.of(Lookup.of("email", "A@Example.ORG")) == \
        "cs:1:0123456789ab:e7:email:a@example.org"


def test_a_lookup_is_normalised_once() -> None:
    assert Lookup.of("id", 7) == Lookup("id", "7")
    assert Lookup.of("username", "ALICE") == Lookup.of("username", "alice")


@pytest.mark.parametrize("key", [EPOCH.user(1), EPOCH.of(Lookup.of("username", "alice"))])
def test_a_lease_is_named_after_its_key_within_the_epoch(key: str) -> None:
    lease = EPOCH.lease(key)
    assert lease == EPOCH.prefix + "lease:" + key.removeprefix(EPOCH.prefix)
    assert lease.startswith(EPOCH.prefix) and lease.count(EPOCH.prefix) == 1


def test_no_two_kinds_of_key_can_be_the_same_name() -> None:
    names = [EPOCH.epoch, EPOCH.changes, EPOCH.user(1), EPOCH.of(Lookup.of("username", "1")),
             EPOCH.of(Lookup.of("email", "1")), EPOCH.lease(EPOCH.user(1)),
             NAMES.in_epoch("e8").user(1), Keys.for_namespace("other").in_epoch("e7").user(1)]
    assert len(set(names)) == len(names)


def service_user_rules() -> list[str]:
    (line,) = [line for line in ACL.read_text().splitlines() if line.startswith("user service ")]
    return line.split()


def test_the_services_keys_and_channel_fall_under_its_user_rules() -> None:
    rules = service_user_rules()
    key_patterns = [rule[1:] for rule in rules if rule.startswith("~")]
    channels = [rule[1:] for rule in rules if rule.startswith("&")]
    for key in (EPOCH.epoch, EPOCH.changes + "1", EPOCH.user(1), EPOCH.lease(EPOCH.user(1)),
                EPOCH.lease(EPOCH.of(Lookup.of("username", "alice"))),
                EPOCH.of(Lookup.of("email", "a@example.org"))):
        assert any(fnmatch.fnmatchcase(key, pattern) for pattern in key_patterns), (key, rules)
    assert channels == [CHANNEL.decode()]
