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



class DatabaseUnavailable(RuntimeError):
    """Postgres cannot be reached, failed mid-statement or lacks a migration; the caller
    answers 503."""


class Conflict(ValueError):
    """A unique column already holds the value (compared without regard to case)."""

    def __init__(self, field: str) -> None:
        super().__init__(f"{field} is already taken")
        self.field = field


class Database:
    """A LIFO pool of at most `size` connections; callers block while all are busy.

    Every statement the service sends is a whole transaction by itself (one INSERT,
    UPDATE, DELETE or SELECT), so connections run in autocommit mode: one round trip per
    statement instead of three (BEGIN, the statement, COMMIT). They are psycopg2's
    asynchronous connections, which this pool waits on itself, so that no login outlasts the
    connect timeout and no statement the statement timeout, even on a Postgres that stopped
    answering (a hung process, a stalled disk), whose own statement_timeout never fires.
    """

    def __init__(self, settings: PostgresSettings, prepared: Mapping[str, str] | None = None,
                 *, name: str = "cachestack", size: int | None = None,
                 counted: bool = True, reports: bool = True) -> None:
        """`prepared`: statements each new connection PREPAREs by name. `name` is the
        sessions' application_name; `size` overrides the settings' pool size. A pool that is
        not `counted` leaves db_queries (what requests cost) alone, and one that does not
        `report` says nothing when Postgres comes and goes (another pool of the process
        does)."""
        self._dsn = settings.url
        self._password = settings.password.read if settings.password else None
        self._last_login: str | None = None  # the last password that logged in; never logged
        self._connect_timeout = settings.connect_timeout
        self._statement_timeout = settings.statement_timeout_ms / 1000 + ANSWER_MARGIN_SECONDS
        self._connect_args = {
            "async_": True,
            # cachestack.writer: the change stream is not sent the rows this session inserts
            # (migration 005): the write-through of each does what the stream would.
            "options": f"-c statement_timeout={settings.statement_timeout_ms} -c timezone=UTC "
                       "-c cachestack.writer=service",
            "application_name": name,
        }
        self._prepare = ";".join(f"PREPARE {name} AS {sql}"
                                 for name, sql in (prepared or {}).items())
        self._counted = counted
        self._reports = reports
        self._idle: list[Connection] = []
        self._slots = threading.BoundedSemaphore(size or settings.pool_size)
        self._lock = threading.Lock()
        self._schema_ready = False
        self._problem: str | None = None  # why the database was unavailable when last used
        self._down_until = 0.0  # statements fail at once until then (COOLDOWN_SECONDS)
        self._trying = threading.Lock()  # held by the one statement that tries Postgres again

    def _connect(self) -> Connection:
        """A new session, on a schema that has every migration, with the hot statements
        prepared."""
        try:
            conn = self._login()
            try:
                cur = _Cursor(conn, self._statement_timeout)
                if not self._schema_ready:
                    self._check_schema(cur)
                if self._prepare:
                    cur.execute(self._prepare)
            except BaseException:
                conn.close()
                raise
        except psycopg2.OperationalError as exc:
            raise self._lost(exc) from None
        self._report(None)
        return conn

    def _login(self) -> Connection:
        """A new session, logged in with the password as it is now.

        A rotation writes the new password file a moment before Postgres (which keeps one
        password per role) is given it, so a login refused with the file's password is tried
        once more, at once, with the last password that logged in."""
        if self._password is None:
            return self._connected(psycopg2.connect(self._dsn, **self._connect_args))
        password = self._password()
        try:
            conn = self._connected(psycopg2.connect(self._dsn, password=password,
                                                    **self._connect_args))
        except psycopg2.OperationalError as exc:
            earlier = self._last_login
            if earlier is None or earlier == password or PASSWORD_REFUSED not in str(exc):
                raise
            return self._connected(psycopg2.connect(self._dsn, password=earlier,
                                                    **self._connect_args))
        self._last_login = password
        return conn

    def _connected(self, conn: Connection) -> Connection:
        """`conn` once its login is done, within the connect timeout."""
        try:
            wait(conn, self._connect_timeout, "log in")
        except BaseException:
            conn.close()
            raise
        return conn

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

    def _take(self) -> Connection:
        """An idle connection that is still alive, or a new one.

        An idle connection has nothing to read unless the server has closed it (as
        Postgres does to every session when it restarts), so one poll finds dead ones
        before a statement is sent on them.
        """
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                return self._connect()
            if not conn.closed and not select.select([conn], [], [], 0)[0]:
                return conn
            conn.close()

    def _give_back(self, conn: Connection) -> None:
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
            conn = self._take()
            try:
                cur = _Cursor(conn, self._statement_timeout)
                if self._counted:
                    metrics.DB_QUERIES.inc()
                result = work(cur)
            except psycopg2.errors.UniqueViolation as exc:
                self._give_back(conn)
                field = UNIQUE_CONSTRAINTS.get(exc.diag.constraint_name, "value")
                raise Conflict(field) from None
            except psycopg2.OperationalError as exc:
                conn.close()
                raise self._lost(exc) from None
            except BaseException:
                conn.close()
                raise
            self._give_back(conn)
            return result
        finally:
            self._slots.release()

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

    def fetchone(self) -> Any:
        return self._cursor.fetchone()

    def fetchall(self) -> list[Any]:
        return self._cursor.fetchall()


