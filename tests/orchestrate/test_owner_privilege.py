"""The owner role, which controls what is in the stack's database, never gets more from it:
a restore runs nothing with more privilege than the owner, not what a dump holds (pg_restore
logs in as the owner, so a `RESET ROLE` in it gets back to the owner) and not what the owner
planted for the statements that follow pg_restore (they run as the owner too); and what the
Postgres container runs as the superuser in that database at each start uses nothing the owner
can put before pg_catalog.

The restore attacks are planted by the owner in the running stack's database and reach the
restore through a routine `backup`, so the dump is signed with the stack's own key: signing
tells who made a backup, not that what is inside may run as the superuser."""

from __future__ import annotations

import time

import docker
from docker.models.containers import Container

from orchestrate.backup import STAGING
from orchestrate.stack import DB_NAME, DB_OWNER
from tests.stores import psql

from .helpers import (
    Api,
    Project,
    backed_up,
    container,
    database_oid,
    one_line_error,
)

# Runs while pg_restore loads the table's rows (the CHECK is evaluated for each): a
# `RESET ROLE` there undoes pg_restore's --role and leaves whoever pg_restore logged in as.
# The body is swapped in after the row is stored, so that it runs at the restore only.
RUNS_AT_RESTORE = f"""
CREATE FUNCTION public.planted_check(integer) RETURNS boolean LANGUAGE sql AS 'SELECT true';
CREATE TABLE public.planted (id integer CHECK (public.planted_check(id)));
INSERT INTO public.planted VALUES (1);
CREATE OR REPLACE FUNCTION public.planted_check(integer) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    RESET ROLE;
    COPY (SELECT 1) TO PROGRAM 'touch /tmp/pwned';
    CREATE ROLE evil SUPERUSER;
    ALTER ROLE {DB_OWNER} SUPERUSER;
    RETURN true;
END $$;
"""
UNDO_RUNS_AT_RESTORE = ("DROP TABLE IF EXISTS public.planted; "
                        "DROP FUNCTION IF EXISTS public.planted_check(integer)")

# What the two attacks below run: it notes the role it runs as and tries to make the owner a
# superuser; its failure is swallowed, so that whatever called it goes on.
ESCALATES = f"""
CREATE TABLE public.planted_seen (who name);
CREATE FUNCTION public.planted_escalate() RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.planted_seen VALUES (current_user);
    BEGIN
        ALTER ROLE {DB_OWNER} SUPERUSER;
    EXCEPTION WHEN insufficient_privilege THEN NULL;
    END;
    RETURN true;
END $$;
"""
UNDO_ESCALATES = ("DROP FUNCTION IF EXISTS public.planted_escalate(); "
                  "DROP TABLE IF EXISTS public.planted_seen")

# Runs when the restore counts the users or gives the cache a new namespace: a trigger on
# cache_namespace, and for whoever logs in as `postgres`, a view `users` in a schema of that
# name (first on the default search_path "$user", public).
RUNS_AFTER_RESTORE = ESCALATES + """
CREATE FUNCTION public.planted_trigger() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM public.planted_escalate();
    RETURN NEW;
END $$;
CREATE TRIGGER planted BEFORE UPDATE ON public.cache_namespace
    FOR EACH ROW EXECUTE FUNCTION public.planted_trigger();
CREATE SCHEMA postgres;
CREATE VIEW postgres.users AS SELECT * FROM public.users WHERE public.planted_escalate();
"""
UNDO_RUNS_AFTER_RESTORE = (
    "DROP SCHEMA IF EXISTS postgres CASCADE; "
    "DROP TRIGGER IF EXISTS planted ON public.cache_namespace; "
    "DROP FUNCTION IF EXISTS public.planted_trigger(); " + UNDO_ESCALATES)


def superuser_effects(postgres: Container) -> list[str]:
    """What code that ran as the superuser would have left."""
    found = []
    if psql(postgres, f"SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = '{DB_OWNER}' "
                      "AND rolsuper"):
        found.append(f"{DB_OWNER} is a superuser")
    if psql(postgres, "SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'evil'"):
        found.append("a role evil exists")
    if postgres.exec_run(["test", "-e", "/tmp/pwned"]).exit_code == 0:
        found.append("/tmp/pwned was written")
    return found


def plant_as_owner(postgres: Container, sql: str) -> None:
    psql(postgres, f"SET ROLE {DB_OWNER}; {sql}")


def test_what_a_dump_runs_at_restore_runs_as_the_owner_only(
        docker_client: docker.DockerClient, stack: Project) -> None:
    postgres = container(docker_client, stack, "postgres")
    plant_as_owner(postgres, RUNS_AT_RESTORE)
    try:
        dump = backed_up(stack)
        in_use = database_oid(postgres)
        started = int(time.time())
        result = stack.run("restore", str(dump), "--yes")
        assert superuser_effects(postgres) == []
        # It ran, as the owner, who may not run a program: the restore fails, changing nothing.
        assert b"pg_execute_server_program" in postgres.logs(since=started)
        line = one_line_error(result)
        assert "could not be restored" in line and "untouched" in line
        assert database_oid(postgres) == in_use
    finally:
        psql(postgres, UNDO_RUNS_AT_RESTORE)


def test_what_the_owner_planted_runs_after_a_restore_as_the_owner_only(
        docker_client: docker.DockerClient, stack: Project) -> None:
    postgres = container(docker_client, stack, "postgres")
    Api(stack).create("planted_view_row")  # the view's condition runs for each row
    plant_as_owner(postgres, RUNS_AFTER_RESTORE)
    try:
        result = stack.run("restore", str(backed_up(stack)), "--yes")
        assert superuser_effects(postgres) == []
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        # The trigger did run, on the new namespace, and as the owner.
        assert psql(postgres, "SELECT DISTINCT who FROM public.planted_seen") == [[DB_OWNER]]
    finally:
        psql(postgres, UNDO_RUNS_AFTER_RESTORE)


# Runs when a superuser session in the database reads `pg_tables`, as the Postgres container's
# start does: the owner may set its database's default search_path, and puts a view first.
RUNS_AT_START = ESCALATES + f"""
CREATE VIEW public.pg_tables AS  -- OFFSET 0: no condition of the reader's is checked first
    SELECT * FROM pg_catalog.pg_tables WHERE public.planted_escalate() OFFSET 0;
ALTER DATABASE {DB_NAME} SET search_path = public, pg_catalog;
"""
UNDO_RUNS_AT_START = (f"ALTER DATABASE {DB_NAME} RESET search_path; "
                      "DROP VIEW IF EXISTS public.pg_tables; " + UNDO_ESCALATES)
START_DEADLINE_S = 120


def test_what_the_owner_planted_runs_at_a_postgres_start_as_the_superuser_never(
        docker_client: docker.DockerClient, stack: Project) -> None:
    postgres = container(docker_client, stack, "postgres")
    plant_as_owner(postgres, RUNS_AT_START)
    try:
        postgres.restart()
        deadline = time.monotonic() + START_DEADLINE_S
        while postgres.exec_run(["pg_isready", "-h", "/var/run/postgresql"]).exit_code != 0:
            assert time.monotonic() < deadline, "postgres did not start again"
            time.sleep(0.25)
        assert superuser_effects(postgres) == []
    finally:
        psql(postgres, UNDO_RUNS_AT_START)


def test_the_container_user_is_the_owner_only_in_the_database_a_restore_fills(
        docker_client: docker.DockerClient, stack: Project) -> None:
    postgres = container(docker_client, stack, "postgres")

    def as_owner(database: str) -> tuple[int, bytes]:
        result = postgres.exec_run(
            ["psql", "--no-password", f"--username={DB_OWNER}", f"--dbname={database}",
             "--tuples-only", "--command=SELECT current_user"],
            user=postgres.attrs["Config"]["User"])
        return result.exit_code, result.output.strip()

    psql(postgres, f"CREATE DATABASE {STAGING} OWNER {DB_OWNER}")
    try:
        assert as_owner(STAGING) == (0, DB_OWNER.encode())
    finally:
        psql(postgres, f"DROP DATABASE {STAGING}")
    for database in (DB_NAME, "postgres"):
        code, output = as_owner(database)
        assert code != 0 and b"no pg_hba.conf entry" in output, database
