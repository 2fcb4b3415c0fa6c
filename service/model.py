"""What a user is: the row Postgres holds, and the JSON every answer carries.

The JSON is encoded once, when a row is read, then cached and sent as these exact bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import NamedTuple


@dataclass(frozen=True, slots=True)
class UserRow:
    id: int
    username: str
    email: str
    display_name: str | None
    version: int
    created_at: str
    updated_at: str
    # The public representation: encoded once, then cached and sent as these exact bytes.
    public_json: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "public_json", json.dumps(
            {
                "id": self.id,
                "username": self.username,
                "email": self.email,
                "display_name": self.display_name,
                "created_at": self.created_at,
                "updated_at": self.updated_at,
            },
            separators=(",", ":"),
            ensure_ascii=False,
        ).encode())


class NewUser(NamedTuple):
    """What a create inserts."""

    username: str
    email: str
    display_name: str | None


@dataclass(frozen=True, slots=True)
class Update:
    """An applied UPDATE: the row after it and the lookup values it had before."""

    row: UserRow
    old_username: str
    old_email: str
