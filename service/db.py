"""PostgreSQL: a small blocking connection pool and every SQL statement the service sends.

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

import json
import logging
import select
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

import psycopg2
import psycopg2.errors
import psycopg2.extensions

from . import metrics, schema

T = TypeVar("T")
Connection = psycopg2.extensions.connection

log = logging.getLogger(__name__)

_RFC3339 = """'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'"""


# The columns of a UserRow, timestamps formatted as RFC 3339 in UTC. Qualified with the
# table, because the UPDATE joins another relation that has some of the same names.
USER_COLUMNS = (
    "users.id, users.username, users.email, users.display_name, users.version, "
    f"to_char(users.created_at AT TIME ZONE 'UTC', {_RFC3339}), "
    f"to_char(users.updated_at AT TIME ZONE 'UTC', {_RFC3339})"
)
# The hot statements, prepared once per connection (PREPARE) so that Postgres parses and
# plans them once instead of on every request. Lookup values arrive lower-cased
# (cache.Lookup); usernames match through the lower() index.
PREPARED = {
    "find_by_id": f"SELECT {USER_COLUMNS} FROM users WHERE id = $1",
    "find_by_username": f"SELECT {USER_COLUMNS} FROM users WHERE lower(username) = $1",
    "find_by_email": f"SELECT {USER_COLUMNS} FROM users WHERE email = $1",
    "insert_user": "INSERT INTO users (username, email, display_name) VALUES ($1, $2, $3) "
                   f"RETURNING {USER_COLUMNS}",
    # The batched forms (batching.py). A row that conflicts, with the table or with an
    # earlier row of its batch, is skipped rather than failing the others.
    "find_by_ids": f"SELECT {USER_COLUMNS} FROM users WHERE id = ANY($1::bigint[])",
    "insert_users": "INSERT INTO users (username, email, display_name) "
                    "SELECT * FROM unnest($1::text[], $2::text[], $3::text[]) "
                    f"ON CONFLICT DO NOTHING RETURNING {USER_COLUMNS}",
}
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


class Database:
    """A LIFO pool of at most `size` connections; callers block while all are busy.

    Every statement the service sends is a whole transaction by itself (one INSERT,
    UPDATE, DELETE or SELECT), so connections run in autocommit mode: one round trip per
    statement instead of three (BEGIN, the statement, COMMIT).
    """

    def __init__(self, dsn: str, size: int, connect_timeout: int, statement_timeout_ms: int,
                 password: Callable[[], str] | None = None) -> None:
        """`password`, when given, is asked for each new connection, and overrides the DSN's."""
        self._dsn = dsn
        self._password = password
        self._last_login: str | None = None  # the last password that logged in; never logged
        self._connect_timeout = connect_timeout
        self._connect_args = {
            "connect_timeout": connect_timeout,
            "options": f"-c statement_timeout={statement_timeout_ms} -c timezone=UTC",
            "application_name": "cachestack",
        }
        self._idle: list[Connection] = []
        self._slots = threading.BoundedSemaphore(size)
        self._lock = threading.Lock()
        self._schema_ready = False
        self._problem: str | None = None  # why the database was unavailable when last used

    counted = True  # whether its statements count in db_queries, what requests cost

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
                    cur.execute(";".join(f"PREPARE {name} AS {sql}"
                                         for name, sql in PREPARED.items()))
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
                    if self.counted:
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


def _row(record: tuple | None) -> UserRow | None:
    return UserRow(*record) if record else None


def find_users(db: Database, field: str, value: str | int) -> list[UserRow]:
    sql = f"EXECUTE find_by_{field}(%s)"

    def select(cur: Any) -> list[UserRow]:
        cur.execute(sql, (value,))
        return [UserRow(*record) for record in cur.fetchall()]

    return db.run(select)


def find_users_by_ids(db: Database, ids: Sequence[int]) -> list[UserRow | None]:
    """The row of each id, in order (None: no such user); one query for all of them."""
    if len(ids) == 1:
        rows = find_users(db, "id", ids[0])
        return [rows[0] if rows else None]

    def select(cur: Any) -> list[UserRow | None]:
        cur.execute("EXECUTE find_by_ids(%s)", (list(ids),))
        found = {record[0]: UserRow(*record) for record in cur.fetchall()}
        return [found.get(user_id) for user_id in ids]

    return db.run(select)


def insert_user(db: Database, username: str, email: str, display_name: str | None) -> UserRow:
    def insert(cur: Any) -> UserRow:
        cur.execute("EXECUTE insert_user(%s, %s, %s)", (username, email, display_name))
        return UserRow(*cur.fetchone())

    return db.run(insert)


def insert_users(db: Database, users: Sequence[NewUser]) -> list[UserRow | None]:
    """Insert `users` in one statement, in order: each one's row, or None where it conflicted
    (with the table or an earlier user of the batch) and was skipped; that user's own
    insert_user then says which field, as it would have alone. A batch of one is that
    insert_user."""
    if len(users) == 1:
        return [insert_user(db, *users[0])]

    def insert(cur: Any) -> list[UserRow | None]:
        cur.execute("EXECUTE insert_users(%s, %s, %s)",
                    [list(column) for column in zip(*users, strict=True)])
        rows = [UserRow(*record) for record in cur.fetchall()]
        inserted = {(row.username, row.email): row for row in rows}
        # Two identical users: the first is the one inserted, the second conflicted.
        return [inserted.pop((user.username, user.email), None) for user in users]

    try:
        return db.run(insert)
    except psycopg2.DatabaseError:  # one user's error failed them all: each alone gets its own
        return [None] * len(users)


def update_user(db: Database, user_id: int, changes: dict[str, str | None]) -> Update | None:
    """Apply `changes` (column -> value; keys come from the validator, never from the client)."""
    assignments = ", ".join(f"{column} = %s" for column in changes)
    sql = (
        "WITH old AS (SELECT id, username, email FROM users WHERE id = %s FOR UPDATE) "
        f"UPDATE users SET {assignments}, version = users.version + 1, updated_at = now() "
        f"FROM old WHERE users.id = old.id RETURNING {USER_COLUMNS}, "
        "old.username, old.email"
    )

    def update(cur: Any) -> Update | None:
        cur.execute(sql, (user_id, *changes.values()))
        record = cur.fetchone()
        return Update(UserRow(*record[:7]), record[7], record[8]) if record else None

    return db.run(update)


def delete_user(db: Database, user_id: int) -> UserRow | None:
    def delete(cur: Any) -> UserRow | None:
        cur.execute(f"DELETE FROM users WHERE id = %s RETURNING {USER_COLUMNS}", (user_id,))
        return _row(cur.fetchone())

    return db.run(delete)


def record_cache_repairs(db: Database, keys: list[str]) -> None:
    db.run(lambda cur: cur.execute(
        "INSERT INTO cache_repairs (key) SELECT unnest(%s::text[]) ON CONFLICT DO NOTHING",
        (keys,),
    ))


def pending_cache_repairs(db: Database) -> list[str]:
    def select(cur: Any) -> list[str]:
        cur.execute("SELECT key FROM cache_repairs")
        return [key for (key,) in cur.fetchall()]

    return db.run(select)


def clear_cache_repairs(db: Database, keys: list[str]) -> None:
    db.run(lambda cur: cur.execute("DELETE FROM cache_repairs WHERE key = ANY(%s)", (keys,)))


def cache_namespace(db: Database) -> str:
    def select(cur: Any) -> str:
        cur.execute("SELECT value FROM cache_namespace")
        return cur.fetchone()[0]

    return db.run(select)
