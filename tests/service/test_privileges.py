"""The role the service runs as can read and write rows, and nothing else: code running in
the service cannot change the schema, read other tables or reach the server's files."""

from __future__ import annotations

import psycopg2
import psycopg2.errors
import pytest

from .helpers import query

INSUFFICIENT_PRIVILEGE = "42501"


@pytest.mark.parametrize("statement", [
    "CREATE TABLE intruder (x int)",
    "CREATE TEMPORARY TABLE intruder (x int)",
    "CREATE SCHEMA intruder",
    "DROP TABLE users",
    "ALTER TABLE users ADD COLUMN intruder int",
    "TRUNCATE users",
    "UPDATE cache_namespace SET value = 'x'",
    "COPY (SELECT 1) TO PROGRAM 'true'",
    "COPY users FROM '/etc/passwd'",
    "SELECT rolpassword FROM pg_authid",
    "ALTER SYSTEM SET work_mem = '1MB'",
    "CREATE ROLE intruder",
    "SELECT pg_read_file('/etc/passwd')",
])
def test_the_service_role_is_refused(database_url: str, statement: str) -> None:
    conn = psycopg2.connect(database_url)
    conn.autocommit = True  # ALTER SYSTEM may not run in a transaction
    try:
        with conn.cursor() as cur, pytest.raises(psycopg2.Error) as refused:
            cur.execute(statement)
    finally:
        conn.close()
    assert refused.value.pgcode == INSUFFICIENT_PRIVILEGE, refused.value


def test_the_service_role_has_no_attribute_and_no_membership(database_url: str) -> None:
    (attributes,) = query(database_url, "SELECT rolsuper, rolcreatedb, rolcreaterole, "
                          "rolreplication, rolbypassrls, rolcanlogin FROM pg_roles "
                          "WHERE rolname = current_user")
    assert attributes == (False, False, False, False, False, True)
    assert query(database_url, "SELECT roleid::regrole FROM pg_auth_members "
                 "WHERE member = current_user::regrole") == []


def test_the_service_role_owns_nothing(database_url: str) -> None:
    (owned,) = query(database_url, """SELECT
        (SELECT count(*) FROM pg_class WHERE relowner = current_user::regrole)
      + (SELECT count(*) FROM pg_namespace WHERE nspowner = current_user::regrole)
      + (SELECT count(*) FROM pg_proc WHERE proowner = current_user::regrole)
      + (SELECT count(*) FROM pg_type WHERE typowner = current_user::regrole)
      + (SELECT count(*) FROM pg_database WHERE datdba = current_user::regrole)""")
    assert owned == (0,)
