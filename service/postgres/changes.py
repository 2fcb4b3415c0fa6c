"""The users table's committed changes, whoever made them: PostgreSQL's own change stream
(logical replication, the built-in pgoutput plugin, protocol version 1), read through a
replication slot with psycopg2's LogicalReplicationConnection (psycopg 3 has none).

The slot keeps the changes nobody confirmed yet: a reader that stops and starts again gets
them again from the last position it confirmed. Postgres lets one reader at a time read a
slot, which is how the stream's readers take turns (SlotBusy). A slot that is missing, or
that lost the WAL it kept (max_slot_wal_keep_size), is made anew at the current position, and
the changes from before then are lost to it (start() says so, before the slot is read).
"""

from __future__ import annotations

import os
import select
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg2
import psycopg2.errors
import psycopg2.extras

from ..settings import PostgresSettings
from .pool import DatabaseUnavailable, PasswordLogin, first_line

# Made by migrations 004 and 005, as the table's owner: users' updates, deletes and truncates,
# and the inserts of every writer but the service.
PUBLICATIONS = "cachestack_users,cachestack_inserts"
# A reader that stops answering is let go after this, so that another can take the slot.
SENDER_TIMEOUT = "10s"
STATUS_INTERVAL = 1.0  # seconds between the reader's reports of its position


class SlotBusy(Exception):
    """Another reader has the slot."""


class ChangeStream:
    """One reader's session on the slot."""

    def __init__(self, settings: PostgresSettings, slot: str,
                 publication: str = PUBLICATIONS) -> None:
        self._settings = settings
        self._login = PasswordLogin(settings.password)
        self._slot, self._publication = slot, publication
        self._conn: Any = None
        self._cursor: Any = None
        self._confirmed = 0  # the last position confirmed in this session
        self._idle_confirmed_at = 0.0  # when an idle reader last confirmed all it was sent
        # The server it reads: '<system identifier>:<timeline>' (IDENTIFY_SYSTEM). A failover
        # promotes a replica onto a new timeline; a server made anew has another identifier.
        self.source = ""

    def start(self, before_reading: Callable[[bool], None]) -> None:
        """Take the slot and start reading it. `before_reading(made_anew)` is called once the
        server is known (`source`) and again if the slot had to be made anew (a gap: the
        changes before now are lost to it), each time before the slot is read: Postgres shows
        the slot read from then on, so whatever waits for that sees what it did. Raises
        SlotBusy or DatabaseUnavailable, and what `before_reading` raises."""
        self.close()
        self._confirmed = 0
        try:
            self._conn = self._login(lambda login: psycopg2.connect(
                self._settings.url, connection_factory=psycopg2.extras.LogicalReplicationConnection,
                connect_timeout=self._settings.connect_timeout,
                options=f"-c wal_sender_timeout={SENDER_TIMEOUT}",
                application_name=f"cachestack-stream {os.getpid()}", **login))
            self._cursor = self._conn.cursor()
            self._cursor.execute("IDENTIFY_SYSTEM")
            system, timeline, *_ = self._cursor.fetchone()
            self.source = f"{system}:{timeline}"
            before_reading(False)
            self._start_or_remake(before_reading)
        except psycopg2.errors.ObjectInUse:
            self.close()
            raise SlotBusy(f"replication slot {self._slot} is read by another") from None
        except psycopg2.Error as exc:
            self.close()
            raise DatabaseUnavailable(f"change stream: {first_line(exc)}") from None

    def _start_or_remake(self, before_reading: Callable[[bool], None]) -> None:
        try:
            self._start()
            return
        except psycopg2.errors.UndefinedObject:  # no such slot
            pass
        except psycopg2.errors.ObjectNotInPrerequisiteState:  # it lost the WAL it kept
            self._cursor.drop_replication_slot(self._slot)
        self._cursor.create_replication_slot(self._slot, output_plugin="pgoutput")
        before_reading(True)
        self._start()

    def _start(self) -> None:
        self._cursor.start_replication(
            slot_name=self._slot, decode=False, status_interval=STATUS_INTERVAL,
            options={"proto_version": "1", "publication_names": self._publication})

    def messages(self, timeout: float, linger: float = 0.0) -> Iterator[bytes]:
        """The messages that arrive within `timeout` seconds, then those that follow within
        `linger` seconds of the first. Raises DatabaseUnavailable when the session breaks."""
        try:
            message = self._cursor.read_message()
            if message is None:
                select.select([self._cursor], [], [], timeout)
                message = self._cursor.read_message()
            until = time.monotonic() + linger
            while message is not None:
                yield message.payload
                message = self._cursor.read_message()
                while message is None and (left := until - time.monotonic()) > 0:
                    select.select([self._cursor], [], [], left)
                    message = self._cursor.read_message()
        except psycopg2.Error as exc:
            raise DatabaseUnavailable(f"change stream: {first_line(exc)}") from None

    def confirm(self, lsn: int | None = None) -> None:
        """Tell Postgres that everything up to `lsn` was applied: it need not be kept or sent
        again. Only a position past the last one confirmed is sent (an idle reader's would
        otherwise call for the server's answer, then answer that, without end).

        With no `lsn` (an idle reader: all it was sent is applied), all sent so far, at most
        once per STATUS_INTERVAL: the server sends a keepalive whenever the WAL moved past the
        reader's position, as every commit of what it does not send (the service's own
        creates) moves it, and a confirmation of each cost both processes as much again."""
        if lsn is None:
            now = time.monotonic()
            if now < self._idle_confirmed_at + STATUS_INTERVAL:
                return
            self._idle_confirmed_at, lsn = now, self._cursor.wal_end
        if lsn <= self._confirmed:
            return
        try:
            self._cursor.send_feedback(flush_lsn=lsn, force=True)
        except psycopg2.Error as exc:
            raise DatabaseUnavailable(f"change stream: {first_line(exc)}") from None
        self._confirmed = lsn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = self._cursor = None
