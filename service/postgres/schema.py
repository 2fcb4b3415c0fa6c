"""The database schema: the packaged migrations, and what the service's role may do with it.

Two roles share a database. Its owner runs `python -m service migrate` (process/migrate.py), which
applies the migrations and records each one in `schema_migrations`; the service runs as a
role that owns nothing and may only read and write rows, exactly those of GRANTS. So code
running in the service cannot change the schema, read another table or reach the server's
files, and the service itself never runs DDL: until the database has every packaged
migration it counts as unavailable (pool.py), and it serves once migrate has run.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import psycopg2
import psycopg2.errors
from psycopg2 import sql

# Stops concurrent migrate runs from applying the same migration twice.
MIGRATION_LOCK_ID = 7_240_113

# The migrations shipped with this version of the service, by file name, in the order
# they are applied. Every one is idempotent, so that a database made before migrations
# were recorded gets them all again, harmlessly, and recorded.
MIGRATIONS = {
    script.name: script.read_text(encoding="utf-8")
    for script in sorted(resources.files(__package__).joinpath("migrations").iterdir(),
                         key=lambda script: script.name)
    if script.name.endswith(".sql")
}

RECORDS = """CREATE TABLE IF NOT EXISTS schema_migrations (
    name       text        PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
)"""

# What the service's role may do, table by table: what the statements in statements.py need.
# (Inserting into users needs no right on its identity sequence: Postgres draws an
# identity column's values for whoever may insert.)
GRANTS = {
    "users": ("SELECT", "INSERT", "UPDATE", "DELETE"),
    "cache_namespace": ("SELECT",),
    "schema_migrations": ("SELECT",),
}
# What the change stream's reader may do besides reading its slot (its role has REPLICATION):
# see users, and the two one-row tables that say how the cache names keys and that the schema
# is current.
STREAM_GRANTS = {
    "users": ("SELECT",),
    "cache_namespace": ("SELECT",),
    "schema_migrations": ("SELECT",),
}


class MigrationError(RuntimeError):
    """The database is in a state migrate must not change by itself; the message says why."""


def lag(cur: Any) -> str | None:
    """What this database lacks of the packaged schema, in a few words; None when nothing."""
    try:
        cur.execute("SELECT name FROM schema_migrations")
    except (psycopg2.errors.UndefinedTable, psycopg2.errors.InsufficientPrivilege) as exc:
        return exc.diag.message_primary
    applied = {name for (name,) in cur.fetchall()}
    missing = [name for name in MIGRATIONS if name not in applied]
    return f"{', '.join(missing)} not applied" if missing else None


def migrate(conn: psycopg2.extensions.connection, app_role: str,
            stream_role: str | None = None) -> list[str]:
    """Apply and record the migrations this database lacks, then give `app_role` exactly
    GRANTS, and `stream_role`, when it exists, exactly STREAM_GRANTS; in one transaction, under
    the advisory lock. Returns the migrations applied."""
    with conn, conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_ID,))
        _check_roles(cur, app_role)
        cur.execute(RECORDS)
        cur.execute("SELECT name FROM schema_migrations")
        applied = {name for (name,) in cur.fetchall()}
        todo = [name for name in MIGRATIONS if name not in applied]
        for name in todo:
            cur.execute(MIGRATIONS[name])
            cur.execute("INSERT INTO schema_migrations (name) VALUES (%s)", (name,))
        _grant(cur, app_role, GRANTS)
        if stream_role and _exists(cur, stream_role):
            _grant(cur, stream_role, STREAM_GRANTS)
    return todo


def _exists(cur: Any, role: str) -> bool:
    cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,))
    return cur.fetchone() is not None


def _check_roles(cur: Any, app_role: str) -> None:
    """Refuse to grant to the role migrate runs as (it would revoke its own rights), and to
    work on tables, or a database, that another role owns: their owner alone may alter
    them and grant on them (a GRANT by anyone else only warns, and would leave the rights
    wrong). The public schema belongs to the database's owner (Postgres 15 and later)."""
    cur.execute("SELECT current_user")
    (me,) = cur.fetchone()
    if me == app_role:
        raise MigrationError(f"the service's role {app_role} is the role migrate runs as: "
                             "run migrate as the database's owner")
    cur.execute("SELECT relname, pg_get_userbyid(relowner) FROM pg_class "
                "WHERE oid IN (SELECT to_regclass(name) FROM unnest(%s::text[]) name) "
                "AND pg_get_userbyid(relowner) <> current_user ORDER BY 1", (list(GRANTS),))
    foreign = cur.fetchone()
    if foreign:
        table, owner = foreign
        raise MigrationError(f"table {table} is owned by {owner}, not by {me} (the role migrate "
                             f"runs as): ALTER TABLE {table} OWNER TO {me}, or migrate as {owner}")
    cur.execute("SELECT datname, pg_get_userbyid(datdba) FROM pg_database "
                "WHERE datname = current_database()")
    database, owner = cur.fetchone()
    if owner != me:
        raise MigrationError(f"database {database} is owned by {owner}, not by {me} (the role "
                             f"migrate runs as): ALTER DATABASE {database} OWNER TO {me}, "
                             f"or migrate as {owner}")


def _grant(cur: Any, name: str, grants: dict[str, tuple[str, ...]]) -> None:
    """Set the rights of the role `name` to exactly `grants`: everything else is revoked
    first, so a second run changes nothing and a right given by hand does not survive it."""
    role = sql.Identifier(name)
    cur.execute("SELECT current_database()")
    database = sql.Identifier(cur.fetchone()[0])
    cur.execute(sql.SQL("REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {role}; "
                        "REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM {role}")
                .format(role=role))
    for table, privileges in grants.items():
        cur.execute(sql.SQL("GRANT {privileges} ON {table} TO {role}").format(
            privileges=sql.SQL(", ").join(map(sql.SQL, privileges)),
            table=sql.Identifier(table), role=role))
    # Only the service's roles may connect (PUBLIC may by default, and create temporary
    # tables), and nobody but the owner may create anything in the schema.
    cur.execute(sql.SQL("REVOKE ALL ON DATABASE {database} FROM PUBLIC, {role}; "
                        "GRANT CONNECT ON DATABASE {database} TO {role}; "
                        "REVOKE CREATE ON SCHEMA public FROM PUBLIC, {role}")
                .format(database=database, role=role))
