"""The cache's key names, all under `cs:1:<namespace>:`.

1 is the format of the values; the namespace is a name the database got when its schema was
created (migration 002), so a database made anew, or restored, never reads what Redis kept of
a predecessor. Under it, `epoch` names the epoch every entry belongs to (docs/design.md,
"Epochs"), `changed:<id>` is never stored (a write sets and deletes it, to tell every near
cache that the user changed), and the entries of an epoch are under `<epoch name>:`:
- `id:<id>` holds a user's entry (entry.py);
- `username:<lower>` and `email:<lower>` hold the user's id, or an empty string when nobody
  has it. They are pointers: a read follows one to `id:<id>` inside Redis and counts it a hit
  only if that user still has the username or email;
- `lease:<key>` is the lease on a key (policy.py).
"""

from __future__ import annotations

from dataclasses import dataclass

FORMAT = "cs:1:"


@dataclass(frozen=True, slots=True)
class Lookup:
    """One way of finding a user; `value` is already normalised (ids as text, names lowered)."""

    field: str
    value: str

    @classmethod
    def of(cls, field: str, value: str | int) -> Lookup:
        return cls(field, str(value).lower())


@dataclass(frozen=True, slots=True)
class Keys:
    """Key names under one database's namespace (`namespace`), and of one epoch (`prefix`,
    empty until an epoch is known)."""

    namespace: str
    prefix: str = ""

    @classmethod
    def for_namespace(cls, namespace: str) -> Keys:
        return cls(f"{FORMAT}{namespace}:")

    def in_epoch(self, epoch: str) -> Keys:
        """The key names of `epoch` ('<run_id>:<name>'): its entries live under its name."""
        return Keys(self.namespace, f"{self.namespace}{epoch.rpartition(':')[2]}:")

    @property
    def epoch(self) -> str:
        return self.namespace + "epoch"

    @property
    def timeline(self) -> str:
        return self.namespace + "timeline"

    @property
    def changes(self) -> str:
        return self.namespace + "changed:"

    @property
    def ids(self) -> str:
        return self.prefix + "id:"

    def of(self, lookup: Lookup) -> str:
        return f"{self.prefix}{lookup.field}:{lookup.value}"

    def user(self, user_id: int | str) -> str:
        return f"{self.ids}{user_id}"

    def lease(self, key: str) -> str:
        return f"{self.prefix}lease:{key.removeprefix(self.prefix)}"
