"""The service's commands and scripts to Redis: a small pool of connections (RedisClient).

It uses redis-py's connections (which connect, verify TLS and log in) and nothing above them:
the cache sends a handful of commands and handles every failure itself (cache/policy.py), so
redis-py's client layer would only add CPU to every call. Every connection, the near cache's
listener's too (listener.py), is made by one redis-py ConnectionPool, so none can connect
differently, and each new one asks the password source for the password as it is now (it can
rotate). Every failure raises redis.RedisError or OSError. docs/design.md says why it queues
unawaited fills.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import redis
from redis.connection import parse_url
from redis.credentials import CredentialProvider
from redis.sentinel import (
    MasterNotFoundError,
    Sentinel,
    SentinelConnectionPool,
    SentinelManagedConnection,
)

from ..settings import RedisSettings
from .listener import InvalidationListener

log = logging.getLogger(__name__)

# How long a command sent without waiting may wait for another to go out with; the flusher
# wakes at most this often. Long enough that its wake-ups cost less than the coalescing
# saves (much shorter waits ate the gain), short enough that a quiet worker holds a fill,
# and with it its lease, only briefly (bench/RESULTS.md, "Measurements behind the code").
FLUSH_AFTER = 0.005


class _LoginNow(CredentialProvider):
    """The URL's user, with the password its source holds when a connection logs in."""

    def __init__(self, username: str | None, password: Callable[[], str]) -> None:
        self._username = username
        self._password = password

    def get_credentials(self) -> tuple[str] | tuple[str, str]:
        if self._username:
            return self._username, self._password()
        return (self._password(),)


class Primary(NamedTuple):
    """The primary the Sentinels name, and their configuration it is the primary of: an epoch
    of theirs that grows with every failover."""

    host: str
    port: int
    configuration: int


def newest_primary(states: Iterable[dict[str, Any]], name: str) -> Primary:
    """The primary in the newest configuration that Sentinels know of (what each says of the
    primary called `name`, as redis-py parses SENTINEL MASTERS): one that has not heard of a
    failover yet still names the old primary. None while one of those that know the newest is
    failing the primary over or has found it down (the old primary may answer until it is made
    a replica, and must not be written to beside the new one): MasterNotFoundError."""
    newest: list[dict[str, Any]] = []
    for state in states:
        if newest and state["config-epoch"] < newest[0]["config-epoch"]:
            continue
        if newest and state["config-epoch"] > newest[0]["config-epoch"]:
            newest = []
        newest.append(state)
    if not newest:
        raise MasterNotFoundError(f"no Sentinel answers for {name!r}")
    if any(state["is_odown"] or "failover_in_progress" in state["flags"] for state in newest):
        raise MasterNotFoundError(f"the Sentinels are failing {name!r} over")
    addresses = {(state["ip"], state["port"]) for state in newest}
    if len(addresses) > 1:
        raise MasterNotFoundError(f"the Sentinels name {len(addresses)} primaries for {name!r}")
    return Primary(newest[0]["ip"], newest[0]["port"], newest[0]["config-epoch"])


class _Sentinels(Sentinel):
    """redis-py's Sentinel, but the primary is asked of every Sentinel, and it is the one of
    the newest configuration (newest_primary), not the first answer."""

    def discover_master(self, service_name: str) -> Primary:
        states = []
        for sentinel in self.sentinels:
            try:
                state = sentinel.sentinel_masters().get(service_name)
            except (redis.ConnectionError, redis.TimeoutError):
                continue
            if state:
                states.append(state)
        return newest_primary(states, service_name)


class _PrimaryConnection(SentinelManagedConnection):
    """A connection to the primary the Sentinels name, which keeps their configuration."""

    configuration = 0

    def connect_to(self, address: Primary) -> None:
        self.configuration = address.configuration
        super().connect_to((address.host, address.port))


class _PrimarySSLConnection(_PrimaryConnection, redis.SSLConnection):
    pass


def configuration_of(connection: redis.connection.AbstractConnection) -> int:
    """The Sentinels' configuration a connection's primary was found in; 0 without Sentinels."""
    return connection.configuration if isinstance(connection, _PrimaryConnection) else 0


def _connection_pool(settings: RedisSettings) -> redis.ConnectionPool:
    """The pool that makes every connection: the URL's address, TLS and user, and the password
    file's password at each login when there is one (instead of the URL's). With Sentinels,
    each connection goes to the primary they name when it connects (newest_primary); they are
    asked over TLS when the URL says so, and as the same user."""
    options = parse_url(settings.url)
    if settings.password is not None:
        options.pop("password", None)
        options["credential_provider"] = _LoginNow(options.pop("username", None),
                                                   settings.password.read)
    # Without a library name and version redis-py sends no CLIENT SETINFO on connecting:
    # a round trip per connection, and a command the service's Redis user may not run.
    common = {"socket_timeout": settings.timeout, "socket_connect_timeout": settings.timeout,
              "health_check_interval": 0, "lib_name": None, "lib_version": None}
    if not settings.sentinels:
        return redis.ConnectionPool(**common, **options)
    ssl = options.pop("connection_class", None) is redis.SSLConnection
    options.pop("host", None)
    options.pop("port", None)
    login = {name: options[name] for name in ("username", "password", "credential_provider")
             if name in options}
    tls = {name: value for name, value in options.items() if name.startswith("ssl_")}
    sentinels = _Sentinels([_address(sentinel) for sentinel in settings.sentinels],
                           sentinel_kwargs={**common, **login, **tls, "ssl": ssl})
    connection_class = _PrimarySSLConnection if ssl else _PrimaryConnection
    return SentinelConnectionPool(settings.sentinel_master, sentinels, **common, **options,
                                  connection_class=connection_class)


def _address(host_port: str) -> tuple[str, int]:
    host, _, port = host_port.rpartition(":")
    return host.strip("[]"), int(port)


class _QueuingConnection:
    """A redis-py connection, the commands it has yet to send (packed), and how many replies
    it still owes for commands sent without waiting."""

    __slots__ = ("conn", "generation", "unsent", "owed")

    def __init__(self, conn: redis.Connection, generation: int) -> None:
        self.conn = conn
        self.generation = generation  # the client's generation when it was connected
        self.unsent: list[bytes] = []
        self.owed = 0

    def send_unsent(self) -> None:
        """Write every unsent command, in one write."""
        if self.unsent:
            packed, self.unsent = b"".join(self.unsent), []
            self.conn.send_packed_command([packed], check_health=False)

    def queue(self, command: tuple) -> None:
        """Hold `command` until this connection's next write; its reply is owed until then."""
        self.unsent += self.conn.pack_command(*command)
        self.owed += 1

    def read_owed_replies(self) -> None:
        """Read the replies owed for commands sent earlier; their errors only get logged."""
        while self.owed:
            self.owed -= 1
            try:
                self.conn.read_response()
            except redis.ResponseError as exc:
                log.warning("unawaited redis command failed: %s", exc)


class RedisClient:
    """Commands and function calls over a small LIFO pool of connections.

    A command whose reply does not matter to the caller (a fill: the reader already has its
    answer) is not sent at once: it waits on its connection for the next command, and both
    go out in one write, their replies come back in one read, and Redis handles both in one
    pass of its event loop. That is Nagle's algorithm applied to commands, or what Node's
    Redis client does for every command (auto-pipelining): one system call and one wake-up
    instead of two, on both sides. A flusher thread sends whatever still waits after
    FLUSH_AFTER, so a quiet worker delays a fill by a few milliseconds, never indefinitely;
    and a fill is conditional on its lease, so a late one is never a stale one. Replies owed
    for such commands are read before the next command's own.

    `on_connect(connection)` runs on every new connection before anything else is sent on it
    (the cache checks there which Redis, and which epoch, it has reached).
    """

    def __init__(self, settings: RedisSettings,
                 on_connect: Callable[[redis.Connection], None] | None = None) -> None:
        self.pool = _connection_pool(settings)
        self.on_connect = on_connect
        self._idle: list[_QueuingConnection] = []
        self._generation = 0  # moved on by close(): older connections are not pooled again
        self._lock = threading.Lock()
        self._unsent_waiting = threading.Event()
        self._flusher: threading.Thread | None = None

    def invalidation_listener(self, prefixes: Iterable[str]) -> InvalidationListener:
        """A new listener for changes of keys under `prefixes`, on a connection of its own that
        connects as the pool's do."""
        return InvalidationListener(self.pool.make_connection(), prefixes)

    def command(self, *args: Any) -> Any:
        """Send one command and return its reply."""
        return self._execute(args, wait=True)

    def call(self, function: str, keys: list[str], argv: list[Any], wait: bool = True) -> Any:
        """Call a function of a library Redis has loaded (FCALL). With `wait=False` the call is
        sent with the connection's next command (or by the flusher) and None is returned."""
        return self._execute(("FCALL", function, len(keys), *keys, *argv), wait)

    def _execute(self, command: tuple, wait: bool) -> Any:
        with self._lock:
            pooled = self._idle.pop() if self._idle else None
        if pooled is None:
            pooled = self._connect()
        if not wait:
            try:
                pooled.queue(command)
            finally:
                self._release(pooled)  # which wakes the flusher
            return None
        try:
            pooled.unsent += pooled.conn.pack_command(*command)
            pooled.send_unsent()
            pooled.read_owed_replies()
            reply = pooled.conn.read_response()
        except redis.ResponseError:
            self._release(pooled)  # an error reply leaves the connection usable
            raise
        except BaseException:
            pooled.conn.disconnect()
            raise
        self._release(pooled)
        return reply

    def _connect(self) -> _QueuingConnection:
        generation = self._generation
        conn = self.pool.make_connection()
        try:
            conn.connect()  # (a Sentinel-managed connection finds the primary here, and only here)
            if self.on_connect is not None:
                self.on_connect(conn)
        except BaseException:
            conn.disconnect()
            raise
        return _QueuingConnection(conn, generation)

    def _release(self, pooled: _QueuingConnection) -> None:
        """Back into the pool, unless the pool was closed since it connected; wake the flusher
        if it holds unsent commands."""
        with self._lock:
            current = pooled.generation == self._generation
            if current:
                self._idle.append(pooled)
        if not current:
            pooled.conn.disconnect()
        elif pooled.unsent:
            self._wake_flusher()

    def _wake_flusher(self) -> None:
        self._unsent_waiting.set()
        if self._flusher is None or not self._flusher.is_alive():  # none yet, or forked
            with self._lock:
                if self._flusher is None or not self._flusher.is_alive():
                    self._flusher = threading.Thread(target=self._flush_forever,
                                                     name="redis-flusher", daemon=True)
                    self._flusher.start()

    def _flush_forever(self) -> None:
        """Flush FLUSH_AFTER after a command was queued, for as long as commands are."""
        while True:
            self._unsent_waiting.wait()
            time.sleep(FLUSH_AFTER)
            self._unsent_waiting.clear()
            self.flush()

    def flush(self) -> None:
        """Send now what idle connections hold; their replies are read on their next use."""
        with self._lock:
            holding = [pooled for pooled in self._idle if pooled.unsent]
            self._idle = [pooled for pooled in self._idle if not pooled.unsent]
        for pooled in holding:
            try:
                pooled.send_unsent()
            except (redis.RedisError, OSError) as exc:
                log.warning("unawaited redis commands not sent: %s", type(exc).__name__)
                pooled.conn.disconnect()
                continue
            self._release(pooled)

    def close(self) -> None:
        """Disconnect every connection: the idle ones now, those in use when they come back.
        The next command connects anew (through Sentinel, to whichever Redis is the primary
        then)."""
        with self._lock:
            self._generation += 1
            idle, self._idle = self._idle, []
        for pooled in idle:
            pooled.conn.disconnect()
