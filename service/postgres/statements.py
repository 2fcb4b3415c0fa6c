"""Every SQL statement the service sends, each a whole transaction on a pooled connection
(pool.py). All SQL is parameterized; the hot statements are prepared once per connection."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg2

from ..model import NewUser, Update, UserRow
from .pool import Database

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
    """Apply `changes` (column -> value; keys come from the validator, never from the client).
    The table's trigger bumps the version and updated_at (migration 004)."""
    assignments = ", ".join(f"{column} = %s" for column in changes)
    sql = (
        "WITH old AS (SELECT id, username, email FROM users WHERE id = %s FOR UPDATE) "
        f"UPDATE users SET {assignments} "
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


def cache_namespace(db: Database) -> str:
    def select(cur: Any) -> str:
        cur.execute("SELECT value FROM cache_namespace")
        return cur.fetchone()[0]

    return db.run(select)


def stream_state(db: Database, slot: str) -> tuple[bool, int] | None:
    """Whether a reader has the change stream's slot, and how many bytes of WAL it has yet to
    confirm; None when there is no such slot."""

    def select(cur: Any) -> tuple[bool, int] | None:
        cur.execute("SELECT active, pg_wal_lsn_diff(pg_current_wal_lsn(), "
                    "confirmed_flush_lsn)::bigint FROM pg_replication_slots "
                    "WHERE slot_name = %s", (slot,))
        row = cur.fetchone()
        return (row[0], row[1] or 0) if row else None

    return db.run(select)
