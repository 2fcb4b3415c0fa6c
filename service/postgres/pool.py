"""PostgreSQL: a small blocking connection pool (Database); the statements are in statements.py.

All SQL is parameterized. A connection that fails is thrown away, and pooled ones that
the server has closed are found before use, so after a Postgres restart the service
heals by itself. With a password file, each new connection logs in with what the file
holds then, so the role's password can rotate under a running service. The service runs no
DDL (see schema.py): a database that lacks a packaged migration is unavailable, like one
that does not answer, until `python -m service migrate` has run. Each process logs one line
when the database becomes unavailable, with the reason, and one when it is back; not one per
request.
"""

from __future__ import annotations

import logging
import select
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import psycopg2
import psycopg2.errors
import psycopg2.extensions

from .. import metrics
from ..files import SecretFile
from ..settings import PostgresSettings
from . import schema

T = TypeVar("T")
Connection = psycopg2.extensions.connection

log = logging.getLogger(__name__)

UNIQUE_CONSTRAINTS = {"users_username_key": "username", "users_email_key": "email"}
# After Postgres did not answer in time (a hung process, a stalled disk), statements fail at
# once for this long, and then one at a time tries it again, so that no pool of threads waits
# on a Postgres that is away while the cache could answer the reads. (One that refuses, or
# answers with an error, does so at once: nothing to wait out.)
COOLDOWN_SECONDS = 1.0
# How much longer than its statement_timeout the pool waits for a statement: a Postgres that
# answers cancels the statement first, with its own error; one that does not answer is given up.
ANSWER_MARGIN_SECONDS = 0.5
# How libpq reports a login whose password the server refused (no error code comes with it).
PASSWORD_REFUSED = "password authentication failed"
# How a login finds servers that are there but take no writes just now, in libpq's and
# Postgres's words: a replica (with target_session_attrs=read-write), a leader stopping or
# starting, a port closed or a name gone while its server restarts. A planned switchover
# hands the lead over in a second or two and a single Postgres restarts as fast, so a login
# that finds only such servers tries again, one login of the pool at a time, for up to
# HANDOVER_SECONDS; longer, and Postgres is down (a failover is under way, say): statements
# fail at once for HANDOVER_RETRY_SECONDS, and then one at a time tries it again (a try costs
# little, unlike one that waits on a silent server: so that the new leader is found as soon
# as it is promoted).
HANDOVER = ("read-only", "hot standby", "starting up", "shutting down",
            "not yet accepting connections", "Connection refused",
            "could not translate host name")
HANDOVER_SECONDS = 3.0
HANDOVER_RETRY_SECONDS = 0.2
# A deposed leader (see Database) answers logins as fast as its successor; it is passed over
# for this long, by when Patroni has demoted it (its loop_wait is 10 s).
DEPOSED_SECONDS = 10.0
# What timeline the server is on (every promotion begins a new one), asked of each new session:
# the first 8 hex digits of the WAL file it writes; 0 on a replica, which has no such file.
CURRENT_TIMELINE = ("SELECT CASE WHEN pg_is_in_recovery() THEN '0' "
                    "ELSE substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8) END")


class DatabaseUnavailable(RuntimeError):
    """Postgres cannot be reached, failed mid-statement or lacks a migration; the caller
    answers 503."""


class Conflict(ValueError):
    """A unique column already holds the value (compared without regard to case)."""

    def __init__(self, field: str) -> None:
        super().__init__(f"{field} is already taken")
        self.field = field


class PasswordLogin:
    """Logs in with the password as the file holds it now (or the URL's, without a file).

    A rotation writes the new password file a moment before Postgres (which keeps one
    password per role) is given it, so a login refused with the file's password is tried
    once more, at once, with the last password that logged in. Not thread-safe: each user
    logs in one at a time."""

    def __init__(self, password: SecretFile | None) -> None:
        self._read = password.read if password else None
        self._last: str | None = None  # the last password that logged in; never logged

    def __call__(self, connect: Callable[[dict[str, str]], T]) -> T:
        """`connect(login)`, login being the keyword arguments that give the password."""
        if self._read is None:
            return connect({})
        password = self._read()
        try:
            connection = connect({"password": password})
        except psycopg2.OperationalError as exc:
            earlier = self._last
            if earlier is None or earlier == password or PASSWORD_REFUSED not in str(exc):
                raise
            return connect({"password": earlier})
        self._last = password
        return connection


class Session(psycopg2.extensions.connection):
    """A pooled connection, which knows its server (the connection string of it alone) and
    the server's timeline (CURRENT_TIMELINE); its one cursor serves every statement."""

    server = ""
    timeline = 0
    statements: _Cursor


class Database:
    """A LIFO pool of at most `size` connections; callers block while all are busy.

    Every statement the service sends is a whole transaction by itself (one INSERT,
    UPDATE, DELETE or SELECT), so connections run in autocommit mode: one round trip per
    statement instead of three (BEGIN, the statement, COMMIT). They are psycopg2's
    asynchronous connections, which this pool waits on itself, so that no login outlasts the
    connect timeout and no statement the statement timeout, even on a Postgres that stopped
    answering (a hung process, a stalled disk), whose own statement_timeout never fires.

    A session runs statements only while its server is on the newest Postgres timeline the
    pool knows of (`timeline`; `follow_timeline` tells it of newer ones). A leader cut off
    (paused, partitioned) while a replica was promoted onto the next timeline still takes
    sessions and answers reads, with what it had, until Patroni demotes it: a session on it,
    kept from before or newly logged in, is given up as one that found no leader (HANDOVER).
    """

    def __init__(self, settings: PostgresSettings, prepared: Mapping[str, str] | None = None,
                 *, name: str = "cachestack", size: int | None = None,
                 counted: bool = True, reports: bool = True) -> None:
        """`prepared`: statements each new connection PREPAREs by name. `name` is the
        sessions' application_name; `size` overrides the settings' pool size. A pool that is
        not `counted` leaves db_queries (what requests cost) alone, and one that does not
        `report` says nothing when Postgres comes and goes (another pool of the process
        does)."""
        self._hosts = each_host(settings.url)
        self._login = PasswordLogin(settings.password)
        self._connect_timeout = settings.connect_timeout
        self._statement_timeout = settings.statement_timeout_ms / 1000 + ANSWER_MARGIN_SECONDS
        self._connect_args = {
            "async_": True,
            # cachestack.writer: the change stream is not sent the rows this session inserts
            # (migration 005): the write-through of each does what the stream would.
            "options": f"-c statement_timeout={settings.statement_timeout_ms} -c timezone=UTC "
                       "-c cachestack.writer=service",
            "application_name": name,
            "connection_factory": Session,
        }
        self._prepare = "".join(f"PREPARE {name} AS {sql};"
                                for name, sql in (prepared or {}).items())
        self._counted = counted
        self._reports = reports
        self._idle: list[Session] = []
        self._slots = threading.BoundedSemaphore(size or settings.pool_size)
        self._lock = threading.Lock()
        self._schema_ready = False
        self._problem: str | None = None  # why the database was unavailable when last used
        self._down_until = 0.0  # statements fail at once until then (COOLDOWN_SECONDS)
        self._trying = threading.Lock()  # held by the one statement that tries Postgres again
        self._logging_in = threading.Lock()  # one login at a time (see HANDOVER)
        self._timeline = 0  # the newest Postgres timeline known; older sessions are given up
        self._deposed: dict[str, float] = {}  # server -> until when logins pass it over

    @property
    def timeline(self) -> int:
        """The newest Postgres timeline this pool knows of: of a session it opened, or told."""
        return self._timeline

    def follow_timeline(self, timeline: int) -> None:
        """From now on, run statements only on a server of `timeline` or a later one (the
        cache knows of writes acknowledged on it)."""
        if timeline > self._timeline:
            with self._lock:
                self._timeline = max(self._timeline, timeline)

    def _connect(self) -> Session:
        try:
            conn = self._login_to_leader()
        except psycopg2.OperationalError as exc:
            raise self._lost(exc) from None
        self._report(None)
        return conn

    def _login_to_leader(self) -> Session:
        """A new session; while the servers answer but none takes writes, or only a deposed
        leader does (HANDOVER), tried again until HANDOVER_SECONDS have passed, by one login
        of the pool at a time."""
        deadline = time.monotonic() + HANDOVER_SECONDS
        if not self._logging_in.acquire(timeout=HANDOVER_SECONDS):
            raise NoAnswer(f"no login finished within {HANDOVER_SECONDS:g} s")
        try:
            while True:
                try:
                    return self._new_session()
                except psycopg2.OperationalError as exc:
                    if not handing_over(exc) or \
                            time.monotonic() + HANDOVER_RETRY_SECONDS > deadline:
                        raise
                time.sleep(HANDOVER_RETRY_SECONDS)
        finally:
            self._logging_in.release()

    def _new_session(self) -> Session:
        """A session, on a schema that has every migration, with the hot statements prepared,
        on a server of the newest timeline known (else Deposed)."""
        conn = self._login(self._open)
        try:
            cur = conn.statements = _Cursor(conn, self._statement_timeout)
            if not self._schema_ready:
                self._check_schema(cur)
            cur.execute(self._prepare + CURRENT_TIMELINE)
            conn.timeline = int(cur.fetchone()[0], 16)
            if conn.timeline < self._timeline:
                self._deposed[conn.server] = time.monotonic() + DEPOSED_SECONDS
                raise Deposed(f"a server on timeline {conn.timeline}, older than "
                              f"{self._timeline} (a deposed leader), took the login")
            self.follow_timeline(conn.timeline)
        except BaseException:
            conn.close()
            raise
        return conn

    def _open(self, login: dict[str, str]) -> Session:
        """A session on the first server the URL names that takes it (with
        target_session_attrs=read-write, the one that takes writes), within the connect
        timeout. Every server is asked at once: libpq, asked in asynchronous mode, tries them
        in turn with no timeout of its own, so one that stopped answering (a paused container,
        whose port still takes the connection) would hold up the login to the others; but a
        deposed leader is not, while others are named."""
        def connect(dsn: str) -> Session:
            conn = psycopg2.connect(dsn, **login, **self._connect_args)
            conn.server = dsn
            return conn

        now = time.monotonic()
        servers = [dsn for dsn in self._hosts if self._deposed.get(dsn, 0) < now] or self._hosts
        return first_logged_in(servers, connect, self._connect_timeout)

    def _check_schema(self, cur: Any) -> None:
        """Refuse a database that lacks a packaged migration; asked again on every new
        connection until it has them all, so the service serves once migrate has run."""
        lag = schema.lag(cur)
        if lag:
            raise self._unavailable(f"database schema is behind: {lag}; "
                                    "run `python -m service migrate`")
        self._schema_ready = True

    def _unavailable(self, problem: str) -> DatabaseUnavailable:
        self._report(problem)
        return DatabaseUnavailable(problem)

    def _lost(self, exc: psycopg2.OperationalError) -> DatabaseUnavailable:
        if isinstance(exc, NoAnswer):
            self._down_until = time.monotonic() + COOLDOWN_SECONDS
        elif handing_over(exc):
            self._down_until = time.monotonic() + HANDOVER_RETRY_SECONDS
        return self._unavailable(f"database unavailable: {first_line(exc)}")

    def _report(self, problem: str | None) -> None:
        """Log a change of the database's state (unavailable and why, or back)."""
        if not self._reports:
            return
        with self._lock:
            if problem == self._problem:
                return
            was, self._problem = self._problem, problem
        if problem:
            log.warning("%s", problem)
        elif was:
            log.info("database available again")

    def _take(self) -> Session:
        """An idle connection that is still alive and on the newest timeline, or a new one.

        An idle connection has nothing to read unless the server has closed it (as
        Postgres does to every session when it restarts), so one poll finds dead ones
        before a statement is sent on them.
        """
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                return self._connect()
            if conn.timeline >= self._timeline and not conn.closed \
                    and not select.select([conn], [], [], 0)[0]:
                return conn
            conn.close()

    def _forget(self, server: str) -> None:
        """Close the idle sessions on `server`, which stopped answering: each would keep a
        statement waiting for its timeout in turn (a leader paused while its successor is
        promoted, which a new login would find)."""
        with self._lock:
            gone = [conn for conn in self._idle if conn.server == server]
            self._idle = [conn for conn in self._idle if conn.server != server]
        for conn in gone:
            conn.close()

    def _give_back(self, conn: Session) -> None:
        with self._lock:
            self._idle.append(conn)

    def run(self, work: Callable[[Any], T]) -> T:
        """Run `work(cursor)`, whose one statement commits by itself. While Postgres is down
        (COOLDOWN_SECONDS after it failed), DatabaseUnavailable at once, but for the one
        statement that tries it again."""
        trying = False
        if self._down_until:
            if time.monotonic() < self._down_until or not self._trying.acquire(blocking=False):
                raise DatabaseUnavailable(self._problem or "database unavailable")
            trying = True
        try:
            result = self._run(work)
        finally:
            if trying:
                self._trying.release()
        self._down_until = 0.0
        return result

    def _run(self, work: Callable[[Any], T]) -> T:
        if not self._slots.acquire(timeout=self._connect_timeout):
            raise DatabaseUnavailable("all database connections are busy")
        try:
            try:
                return self._run_on_a_session(work)
            except EndedBeforeCommit:
                # Nothing was done (a leader handing over, a Postgres stopping): the statement
                # runs again on a new session, with the next leader.
                try:
                    return self._run_on_a_session(work)
                except EndedBeforeCommit as exc:
                    raise self._lost(exc) from None
        finally:
            self._slots.release()

    def _run_on_a_session(self, work: Callable[[Any], T]) -> T:
        conn = self._take()
        try:
            if self._counted:
                metrics.DB_QUERIES.inc()
            result = work(conn.statements)
        except psycopg2.errors.UniqueViolation as exc:
            self._give_back(conn)
            field = UNIQUE_CONSTRAINTS.get(exc.diag.constraint_name, "value")
            raise Conflict(field) from None
        except psycopg2.OperationalError as exc:
            conn.close()
            if isinstance(exc, NoAnswer):
                self._forget(conn.server)
            if ended_before_commit(exc, conn.notices):
                raise EndedBeforeCommit(str(exc)) from None
            raise self._lost(exc) from None
        except BaseException:
            conn.close()
            raise
        self._give_back(conn)
        return result

    def ping(self) -> None:
        self.run(lambda cur: cur.execute("SELECT 1"))

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or ["database error"])[0]


class NoAnswer(psycopg2.OperationalError):
    """Postgres did not answer within the time it was given."""


class Unconfirmed(psycopg2.OperationalError):
    """Postgres committed, but its synchronous standby never confirmed the commit: the change
    is on the leader alone, and a failover may lose it. Not an acknowledged write."""


class Deposed(psycopg2.OperationalError):
    """The server is on an older timeline than the newest known: a leader since replaced."""


class EndedBeforeCommit(psycopg2.OperationalError):
    """The server ended the session while a statement ran, before its transaction committed."""


def ended_before_commit(exc: Exception, notices: list[str]) -> bool:
    """Whether the server ended the session by an administrator's command (a shutdown, which
    a switchover is) while the statement ran, before its transaction committed: unless it
    was waiting for the synchronous standby, committed already (which Postgres then says in
    a warning first)."""
    return ("terminating connection due to administrator command" in str(exc)
            and not any("synchronous replication" in notice for notice in notices))


def handing_over(exc: Exception) -> bool:
    """Whether a login failed because no server takes writes just now, or only a deposed
    leader does (HANDOVER)."""
    return isinstance(exc, Deposed) or any(words in str(exc) for words in HANDOVER)


def each_host(url: str) -> list[str]:
    """The connection string once for each server a URL names (libpq's multi-host form,
    host1:port1,host2:port2,...), each naming that server alone, the rest as the URL has it;
    a URL of one server as it is."""
    params = psycopg2.extensions.parse_dsn(url)
    hosts = params.get("host", "").split(",")
    if len(hosts) < 2:
        return [url]
    ports = params.get("port", "").split(",")
    ports = ports * len(hosts) if len(ports) == 1 else ports
    return [psycopg2.extensions.make_dsn(**{**params, "host": host, "port": port or None})
            for host, port in zip(hosts, ports, strict=True)]


def first_logged_in(servers: list[str], connect: Callable[[str], Session],
                    timeout: float) -> Session:
    """The first of `servers` whose login (`connect(server)`: an asynchronous connection) is
    done within `timeout` seconds. While one keeps the login waiting (a leader that stopped
    answering), those that refused it for now (HANDOVER: a replica, before the leader's
    successor is promoted) are asked again every HANDOVER_RETRY_SECONDS, so that the successor
    is found at once. When every one failed, the last failure; when the time is up, NoAnswer,
    or the last handover if there was one (so that the caller keeps trying, as on one)."""
    deadline = time.monotonic() + timeout
    asking: dict[str, float] = dict.fromkeys(servers, 0.0)  # server -> when it is asked (again)
    made: list[Session] = []
    pending: list[Session] = []
    failure: Exception | None = None
    winner = None
    try:
        while True:
            now = time.monotonic()
            for server in [server for server, at in asking.items() if at <= now]:
                del asking[server]
                made.append(connect(server))
                pending.append(made[-1])
            readers, writers = [], []
            for conn in list(pending):
                try:
                    state = conn.poll()
                except psycopg2.OperationalError as exc:
                    pending.remove(conn)
                    failure = exc
                    if handing_over(exc):
                        asking[conn.server] = now + HANDOVER_RETRY_SECONDS
                    continue
                if state == psycopg2.extensions.POLL_OK:
                    winner = conn
                    return conn
                (readers if state == psycopg2.extensions.POLL_READ else writers).append(conn)
            if not pending:
                assert failure is not None
                raise failure
            left = min([deadline, *asking.values()]) - time.monotonic()
            if time.monotonic() >= deadline:
                if failure is not None and handing_over(failure):
                    raise failure
                raise NoAnswer(f"postgres did not log in within {timeout:g} s")
            select.select(readers, writers, [], max(0.0, left))
    finally:
        for conn in made:
            if conn is not winner:
                conn.close()


def unconfirmed(notices: list[str]) -> None:
    """Raise Unconfirmed when Postgres's notices say that a commit's wait for the synchronous
    standby was cancelled (which Postgres reports as a warning, and then as done); forget
    the notices either way."""
    said = "".join(notices)
    del notices[:]
    if "synchronous replication" in said:
        raise Unconfirmed("postgres committed without its synchronous standby's confirmation")


def wait(conn: Connection, timeout: float, what: str) -> None:
    """Wait until the asynchronous connection `conn` has done what it was asked (its errors
    are raised here), for at most `timeout` seconds: then NoAnswer, and the caller closes the
    connection, which a Postgres that answers again sees end."""
    deadline = time.monotonic() + timeout
    while (state := conn.poll()) != psycopg2.extensions.POLL_OK:
        left = deadline - time.monotonic()
        readers, writers = ([conn], []) if state == psycopg2.extensions.POLL_READ else ([], [conn])
        if left <= 0 or not any(select.select(readers, writers, [], left)):
            raise NoAnswer(f"postgres did not {what} within {timeout:g} s")


class _Cursor:
    """A cursor of an asynchronous connection that waits, within the statement timeout, for
    each statement it executes: what the statements of statements.py see."""

    __slots__ = ("_conn", "_cursor", "_timeout")

    def __init__(self, conn: Connection, timeout: float) -> None:
        self._conn, self._cursor, self._timeout = conn, conn.cursor(), timeout

    def execute(self, sql: str, args: Any = None) -> None:
        self._cursor.execute(sql, args)
        wait(self._conn, self._timeout, "answer")
        if self._conn.notices:
            unconfirmed(self._conn.notices)

    def fetchone(self) -> Any:
        return self._cursor.fetchone()

    def fetchall(self) -> list[Any]:
        return self._cursor.fetchall()


