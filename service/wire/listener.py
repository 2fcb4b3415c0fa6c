"""The near cache's ears: a connection subscribed to Redis's client-side-caching broadcasts.

redis-py connects it and logs it in (through the same connection pool as the commands, so it
cannot connect differently); from then on the listener reads the socket itself, without
redis-py's parser, so that a drain with nothing waiting costs one poll.
"""

from __future__ import annotations

import math
import select
import socket
import ssl
import time
from collections import deque
from collections.abc import Iterable

import hiredis
import redis

CHANNEL = b"__redis__:invalidate"  # where Redis publishes what CLIENT TRACKING saw change
PING = hiredis.pack_command(("PING",))
PONG = [b"pong", b""]  # PING's answer on a subscribed connection
# A listener that keeps up finds far less than this waiting, and full socket buffers hold
# many times more (measured: bench/RESULTS.md). A drain that finds this much may be reading
# buffers that were full, while Redis keeps newer messages in its own memory.
BEHIND_BYTES = 4096


def _nothing_decrypted() -> int:
    return 0


class InvalidationListener:
    """A socket subscribed to Redis's client-side-caching broadcasts for the keys under
    `prefixes` (CLIENT TRACKING on REDIRECT <itself> BCAST PREFIX ..., Redis 6+), which also
    answers the PINGs it sends: each drain reports the keys that changed since the last one,
    and when the newest answered PING was sent.

    redis-py connects it and logs it in; from then on the listener reads the socket itself,
    without redis-py's parser, so that a drain with nothing waiting costs one poll. Redis
    also publishes a FLUSHALL here (as "everything"). Its reads and writes must not overlap:
    the caller serialises them.
    """

    def __init__(self, connection: redis.connection.AbstractConnection,
                 prefixes: Iterable[str]) -> None:
        self._reader = hiredis.Reader()
        self._pings: deque[float] = deque()  # when each unanswered PING was sent (monotonic)
        self.sent = -math.inf  # when the last PING was sent
        # The longest Redis went unheard since the subscription, as far as the PINGs tell: the
        # longest any PING waited for its answer, or went unsent after the one before it
        # (then this process itself was not running, and cannot tell what Redis did).
        self.longest_silence = 0.0
        connection.connect()  # and logs in; nothing is left unread after that
        self._connection = connection
        self._sock: socket.socket = connection._sock  # redis-py has no public accessor
        try:
            client_id = self._ask("CLIENT", "ID")
            self._ask("CLIENT", "TRACKING", "on", "REDIRECT", client_id, "BCAST",
                      *(part for prefix in prefixes for part in ("PREFIX", prefix)))
            self._ask("SUBSCRIBE", CHANNEL)
        except BaseException:
            connection.disconnect()
            raise
        self.sent = time.monotonic()  # it answered all of that just now
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

    def ping(self) -> None:
        """Ask Redis for a sign of life; its answer comes with a later drain. Raises OSError
        when even that cannot be sent (the socket's buffer is full of unanswered PINGs)."""
        self._sock.sendall(PING)
        now = time.monotonic()
        self.longest_silence = max(self.longest_silence, now - self.sent)
        self.sent = now
        self._pings.append(now)

    def silence(self) -> float:
        """The longest Redis went unheard since the subscription, until now."""
        now = time.monotonic()
        unanswered = now - self._pings[0] if self._pings else 0.0
        return max(self.longest_silence, unanswered, now - self.sent)

    def drain(self) -> list[str] | None:
        """The keys that changed since the last call; None means "everything" (a flush, or
        this listener fell behind and Redis may hold messages it could not send yet)."""
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
            if message == PONG and self._pings:
                waited = time.monotonic() - self._pings.popleft()
                self.longest_silence = max(self.longest_silence, waited)
            elif isinstance(message, list) and len(message) == 3 and message[1] == CHANNEL:
                if message[2] is None:
                    changed = None
                elif changed is not None:
                    changed += (key.decode() for key in message[2])
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
