-- The roles of cachestack's database, run by cachestack-postgres at every start, as the
-- superuser over a private socket, before the server accepts network logins. Idempotent.
-- psql variables: database, owner (runs the migrations, owns the tables), app (the runtime
-- role the service logs in as), stream (the change stream's reader: it may read replication
-- slots, nothing else; `python -m service migrate` sets the table privileges of both).

-- A statement that fails must not write a password into the server log.
SET log_min_error_statement = panic;
\set superuser_password `cat /run/secrets/postgres_password`
\set owner_password `cat /run/secrets/postgres_owner_password`
\set app_password `cat /run/secrets/postgres_app_password`
\set stream_password `cat /run/secrets/postgres_stream_password`

SELECT format('CREATE ROLE %I', name)
  FROM (VALUES (:'owner'), (:'app'), (:'stream')) AS wanted (name)
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = name) \gexec
ALTER ROLE :"owner" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS
      PASSWORD :'owner_password';
ALTER ROLE :"app" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS
      PASSWORD :'app_password';
ALTER ROLE :"stream" LOGIN REPLICATION NOSUPERUSER NOCREATEDB NOCREATEROLE NOBYPASSRLS
      PASSWORD :'stream_password';
ALTER ROLE postgres PASSWORD :'superuser_password';

SELECT format('CREATE DATABASE %I OWNER %I', :'database', :'owner')
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'database') \gexec
ALTER DATABASE :"database" OWNER TO :"owner";

-- A volume made before these roles existed: its bootstrap superuser owned the tables and
-- was the service's login. The tables go to the owner; that superuser may no longer log in.
-- The owner controls this database, its default search_path included: what the superuser
-- runs here must find nothing of the owner's, so pg_catalog alone is searched.
\connect :"database"
SET search_path = pg_catalog, pg_temp;
SELECT pg_catalog.format('ALTER TABLE public.%I OWNER TO %I', tablename, :'owner')
  FROM pg_catalog.pg_tables
 WHERE schemaname = 'public' AND tableowner <> :'owner' \gexec
SELECT pg_catalog.format('ALTER ROLE %I NOLOGIN PASSWORD NULL', rolname)
  FROM pg_catalog.pg_roles
 WHERE oid = 10 AND rolname <> 'postgres' AND rolcanlogin \gexec
