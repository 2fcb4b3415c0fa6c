"""The near cache's ears: a connection subscribed to Redis's client-side-caching broadcasts.

redis-py connects it and logs it in (through the same connection pool as the commands, so it
cannot connect differently); from then on the listener reads the socket itself, without
redis-py's parser, so that a drain with nothing waiting costs one poll.
"""

from __future__ import annotations

import select
import socket
import ssl

import hiredis
import redis

CHANNEL = b"__redis__:invalidate"  # where Redis publishes what CLIENT TRACKING saw change
# A listener that keeps up finds far less than this waiting, and full socket buffers hold
# many times more (measured: bench/README.md). A drain that finds this much may be reading
# buffers that were full, while Redis keeps newer messages in its own memory.
BEHIND_BYTES = 4096


def _nothing_decrypted() -> int:
    return 0


class InvalidationListener:
    """A socket subscribed to Redis's client-side-caching broadcasts for the keys under
    `prefix` (CLIENT TRACKING on REDIRECT <itself> BCAST PREFIX <prefix>, Redis 6+): each
    drain reports what changed since the last one, as the rest of each key's name.

    redis-py connects it and logs it in; from then on the listener reads the socket itself,
    without redis-py's parser, so that a drain with nothing waiting costs one poll. Redis
    also publishes a FLUSHALL here (as "everything").
    """

    def __init__(self, connection: redis.connection.AbstractConnection, prefix: str) -> None:
        self._prefix_length = len(prefix.encode())
        self._reader = hiredis.Reader()
        connection.connect()  # and logs in; nothing is left unread after that
        self._connection = connection
        self._sock: socket.socket = connection._sock  # redis-py has no public accessor
        try:
            client_id = self._ask("CLIENT", "ID")
            self._ask("CLIENT", "TRACKING", "on", "REDIRECT", client_id, "BCAST", "PREFIX", prefix)
            self._ask("SUBSCRIBE", CHANNEL)
        except BaseException:
            connection.disconnect()
            raise
        self._sock.setblocking(False)
        # Asking whether anything waits costs far less than a recv that finds nothing (which
        # raises), and a drain usually finds nothing. With TLS, bytes already decrypted
        # wait inside the SSL object, where poll cannot see them.
        self._poll = select.poll()
        self._poll.register(self._sock, select.POLLIN)
        self._decrypted = (self._sock.pending if isinstance(self._sock, ssl.SSLSocket)
                           else _nothing_decrypted)

    def _ask(self, *parts: str | bytes | int) -> object:
        """One command and its reply, while the socket still blocks (before the first drain)."""
        self._sock.sendall(hiredis.pack_command(parts))
        while (reply := self._reader.gets()) is False:
            data = self._sock.recv(4096)
            if not data:
                raise ConnectionError("redis closed the connection")
            self._reader.feed(data)
        if isinstance(reply, hiredis.ReplyError):
            raise ConnectionError(str(reply))
        return reply

    def drain(self) -> list[str] | None:
        """What changed since the last call; None means "everything" (a flush, or this
        listener fell behind and Redis may hold messages it could not send yet)."""
        waiting = 0
        while self._readable():
            try:
                data = self._sock.recv(65536)
            except (BlockingIOError, ssl.SSLWantReadError):  # a TLS record not yet whole
                break
            if not data:
                raise ConnectionError("redis closed the invalidation connection")
            waiting += len(data)
            self._reader.feed(data)
        changed: list[str] | None = []
        while (message := self._reader.gets()) is not False:
            if isinstance(message, list) and len(message) == 3 and message[1] == CHANNEL:
                if message[2] is None:
                    changed = None
                elif changed is not None:
                    changed += (key[self._prefix_length:].decode() for key in message[2])
        return None if waiting >= BEHIND_BYTES else changed

    def _readable(self) -> bool:
        """Whether a recv would find something now, or the connection broke. (The poll object
        is the drains', which run one at a time: a poll object takes one caller at once.)"""
        return bool(self._decrypted() or self._poll.poll(0))

    def wait(self, timeout: float) -> bool:
        """Whether anything arrives within `timeout` seconds (False at once when closed)."""
        if self._decrypted():
            return True
        try:
            return bool(select.select([self._sock], [], [], timeout)[0])
        except (OSError, ValueError):
            return False

    def close(self) -> None:
        self._connection.disconnect()
