"""A decoder of the messages PostgreSQL's built-in `pgoutput` plugin sends (logical
replication protocol, version 1): those the change stream needs, Relation, Begin, Commit,
Insert, Update, Delete and Truncate; the others (Type, Origin, logical Message) decode to
None. https://www.postgresql.org/docs/15/protocol-logicalrep-message-formats.html

Integers are big-endian; strings end with a NUL; a row is a tuple of columns, each `n`
(null), `u` (an unchanged TOASTed value, which this table never has) or `t` with a length
and the value as text.
"""

from __future__ import annotations

import datetime
import struct
from dataclasses import dataclass

# Timestamps count microseconds from 2000-01-01 UTC (PostgreSQL's epoch).
POSTGRES_EPOCH = datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC)
UNCHANGED = object()  # a column whose value the message leaves out ('u')


class DecodeError(ValueError):
    """A message this decoder does not understand, or one cut short."""


@dataclass(frozen=True, slots=True)
class Relation:
    """What the rows of a table look like in the messages that follow: its column names."""

    oid: int
    namespace: str
    name: str
    columns: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Begin:
    final_lsn: int
    committed_at: datetime.datetime
    xid: int


@dataclass(frozen=True, slots=True)
class Commit:
    lsn: int
    end_lsn: int
    committed_at: datetime.datetime


@dataclass(frozen=True, slots=True)
class RowChange:
    """An insert, update or delete of one row of `relation`: the row before (None for an
    insert; its identity columns only, unless the table's replica identity is FULL) and after
    (None for a delete), column name -> text (None for null, UNCHANGED when left out)."""

    kind: str
    relation: Relation
    old: dict[str, object] | None
    new: dict[str, object] | None


@dataclass(frozen=True, slots=True)
class Truncate:
    relations: tuple[Relation, ...]


Message = Relation | Begin | Commit | RowChange | Truncate


# The integers of the protocol, by struct format: network byte order.
_LAYOUTS = {fmt: struct.Struct(">" + fmt) for fmt in ("b", "h", "H", "i", "I", "q", "Q")}


class _Reader:
    """Reads one message front to back; DecodeError when it ends too soon."""

    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def take(self, size: int) -> bytes:
        if self.at + size > len(self.data):
            raise DecodeError(f"message cut short at byte {self.at}")
        part = self.data[self.at:self.at + size]
        self.at += size
        return part

    def int(self, fmt: str) -> int:
        layout = _LAYOUTS[fmt]
        return layout.unpack(self.take(layout.size))[0]

    def string(self) -> str:
        end = self.data.find(b"\0", self.at)
        if end < 0:
            raise DecodeError(f"unterminated string at byte {self.at}")
        text = self.data[self.at:end].decode()
        self.at = end + 1
        return text

    def time(self) -> datetime.datetime:
        return POSTGRES_EPOCH + datetime.timedelta(microseconds=self.int("q"))


class Decoder:
    """Decodes a stream's messages in order, remembering each table's columns as its Relation
    message (sent before the first row of it, and again when it changes) said them."""

    def __init__(self) -> None:
        self.relations: dict[int, Relation] = {}

    def decode(self, payload: bytes) -> Message | None:
        reader = _Reader(payload)
        kind = reader.take(1)
        if kind == b"B":
            return Begin(reader.int("Q"), reader.time(), reader.int("I"))
        if kind == b"C":
            reader.int("b")  # flags, unused
            return Commit(reader.int("Q"), reader.int("Q"), reader.time())
        if kind == b"R":
            return self._relation(reader)
        if kind in (b"I", b"U", b"D"):
            return self._row_change(kind, reader)
        if kind == b"T":
            count = reader.int("I")
            reader.int("b")  # options (CASCADE, RESTART IDENTITY), unused
            return Truncate(tuple(self._known(reader.int("I")) for _ in range(count)))
        if kind in (b"Y", b"O", b"M"):
            return None
        raise DecodeError(f"unknown message type {kind!r}")

    def _relation(self, reader: _Reader) -> Relation:
        oid, namespace, name = reader.int("I"), reader.string(), reader.string()
        reader.int("b")  # replica identity setting
        columns = []
        for _ in range(reader.int("H")):
            reader.int("b")  # flags: part of the key
            columns.append(reader.string())
            reader.int("I")  # type oid
            reader.int("i")  # type modifier
        relation = Relation(oid, namespace, name, tuple(columns))
        self.relations[oid] = relation
        return relation

    def _row_change(self, kind: bytes, reader: _Reader) -> RowChange:
        relation = self._known(reader.int("I"))
        old = new = None
        marker = reader.take(1)
        if marker in (b"K", b"O"):  # the old row's key, or all of it (REPLICA IDENTITY FULL)
            old = self._row(relation, reader)
            if kind == b"U":
                marker = reader.take(1)
        if marker == b"N":
            new = self._row(relation, reader)
        elif kind != b"D":
            raise DecodeError(f"expected the new row, found {marker!r}")
        name = {b"I": "insert", b"U": "update", b"D": "delete"}[kind]
        return RowChange(name, relation, old, new)

    def _known(self, oid: int) -> Relation:
        if oid not in self.relations:
            raise DecodeError(f"a row of relation {oid}, whose Relation message never came")
        return self.relations[oid]

    @staticmethod
    def _row(relation: Relation, reader: _Reader) -> dict[str, object]:
        count = reader.int("H")
        if count != len(relation.columns):
            raise DecodeError(f"{count} columns for {relation.name}, which has "
                              f"{len(relation.columns)}")
        row: dict[str, object] = {}
        for column in relation.columns:
            kind = reader.take(1)
            if kind == b"n":
                row[column] = None
            elif kind == b"u":
                row[column] = UNCHANGED
            elif kind == b"t":
                row[column] = reader.take(reader.int("I")).decode()
            else:
                raise DecodeError(f"unknown column kind {kind!r}")
        return row
