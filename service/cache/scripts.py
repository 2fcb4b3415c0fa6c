"""The Lua scripts the cache runs in Redis, and the entries the writing ones write.

Each script is a file in lua/ that opens with its KEYS, ARGV and reply. They are package
data, read with importlib.resources as schema.py reads the migrations. entry.lua is not a
script by itself: it defines put(), which fill.lua and write.lua use for every entry, so
it is put in front of both.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from importlib import resources

from ..wire.client import Script


def _lua(name: str) -> str:
    return resources.files(__package__).joinpath("lua", name).read_text(encoding="utf-8")


_PUT = _lua("entry.lua")
READ = Script(_lua("read.lua"))
FOLLOW = Script(_lua("follow.lua"))
FILL = Script(_PUT + _lua("fill.lua"))
WRITE = Script(_PUT + _lua("write.lua"))

# What READ and FOLLOW answer first: the entry was there; this reader took the lease; another
# reader holds the lease.
FOUND, LEASED, BUSY = b"hit", b"lease", b"busy"


class Mode(StrEnum):
    """How put() writes an entry; each value is the word entry.lua compares with."""

    STORE_UNLESS_OLDER = "store-unless-older"  # users' entries: a version never goes back
    STORE = "store"  # pointers, username:<lower> and email:<lower>
    DELETE = "delete"


@dataclass(frozen=True, slots=True)
class Put:
    """One key a FILL or a WRITE writes: how, for how long, and its value."""

    key: str
    mode: Mode
    ttl_ms: int
    value: bytes | str


def put_argv(entries: Iterable[Put]) -> list[bytes | str | int]:
    """The ARGV that FILL and WRITE take after their token: each entry's mode, TTL and value."""
    return [part for entry in entries for part in (entry.mode, entry.ttl_ms, entry.value)]
