-- Every change of a user bumps its version and its updated_at, whoever makes it (the service,
-- an operator's psql, a batch job): two rows with the same version are the same row, which the
-- cache's rule "never replace a newer row with an older one" relies on.
CREATE OR REPLACE FUNCTION users_changed() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    NEW.version := OLD.version + 1;
    NEW.updated_at := now();
    RETURN NEW;
END
$$;
DROP TRIGGER IF EXISTS users_changed ON users;
CREATE TRIGGER users_changed BEFORE UPDATE ON users FOR EACH ROW EXECUTE FUNCTION users_changed();

-- The change stream (service/postgres/changes.py) publishes users' committed changes, each
-- update and delete with the whole row it replaced, so that the old username and email are
-- known. Its replication slot is made by its reader.
ALTER TABLE users REPLICA IDENTITY FULL;
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_catalog.pg_publication WHERE pubname = 'cachestack_users') THEN
        ALTER PUBLICATION cachestack_users SET TABLE users;  -- a table made anew, say
    ELSE
        CREATE PUBLICATION cachestack_users FOR TABLE users;
    END IF;
END
$$;
