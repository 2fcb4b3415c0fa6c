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
    statement instead of three (BEGIN, the statement, COMMIT).
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
        self._connect_args = {
            "connect_timeout": settings.connect_timeout,
            "options": f"-c statement_timeout={settings.statement_timeout_ms} -c timezone=UTC",
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

    def _connect(self) -> Connection:
        """A new session, on a schema that has every migration, with the hot statements
        prepared."""
        try:
            conn = self._login()
            try:
                conn.autocommit = True
                with conn.cursor() as cur:
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
            return psycopg2.connect(self._dsn, **self._connect_args)
        password = self._password()
        try:
            conn = psycopg2.connect(self._dsn, password=password, **self._connect_args)
        except psycopg2.OperationalError as exc:
            earlier = self._last_login
            if earlier is None or earlier == password or PASSWORD_REFUSED not in str(exc):
                raise
            return psycopg2.connect(self._dsn, password=earlier, **self._connect_args)
        self._last_login = password
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
        """Run `work(cursor)`, whose one statement commits by itself."""
        if not self._slots.acquire(timeout=self._connect_timeout):
            raise DatabaseUnavailable("all database connections are busy")
        try:
            conn = self._take()
            try:
                with conn.cursor() as cur:
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


