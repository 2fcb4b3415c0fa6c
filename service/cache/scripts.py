"""The cache's functions in Redis (lua/cachestack.lua, one library), and the entries the
writing ones write.

Redis loads the library as its admin at start; the service only calls the functions by name
(FCALL), so its Redis user needs no right to run Lua of its own. LIBRARY is the library's
text, package data read with importlib.resources as schema.py reads the migrations, for
whoever loads it (the Redis image, the tests' and benchmarks' own Redis servers).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from importlib import resources

LIBRARY = resources.files(__package__).joinpath("lua", "cachestack.lua").read_text(
    encoding="utf-8")
EPOCH, READ, FOLLOW, FILL, WRITE, LEASE = (
    f"cachestack_{name}" for name in ("epoch", "read", "follow", "fill", "write", "lease"))

# What READ and FOLLOW answer first: the entry was there; this reader took the lease; another
# reader holds the lease. Every function answers OTHER_EPOCH, and the current epoch, when the
# caller's is not current.
FOUND, LEASED, BUSY, OTHER_EPOCH = b"hit", b"lease", b"busy", b"epoch"


class Mode(StrEnum):
    """How put() writes an entry; each value is the word the library compares with."""

    STORE_UNLESS_OLDER = "store-unless-older"  # users' entries: a version never goes back
    STORE = "store"  # pointers, username:<lower> and email:<lower>
    DELETE = "delete"
    # The change stream's: what the write-through of the same change stored stays.
    DELETE_OLDER = "delete-older"  # users' entries below a version
    DELETE_OTHER = "delete-other"  # pointers to anyone but the changed user


@dataclass(frozen=True, slots=True)
class Put:
    """One key a FILL or a WRITE writes (a put() of the library): how, for how long, and its
    value."""

    key: str
    mode: Mode
    ttl_ms: int
    value: bytes | str


def put_argv(entries: Iterable[Put]) -> list[bytes | str | int]:
    """The ARGV that FILL and WRITE take after their token: each entry's mode, TTL and value."""
    return [part for entry in entries for part in (entry.mode, entry.ttl_ms, entry.value)]
