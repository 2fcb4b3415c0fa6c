-- The service's own creates need nothing from the change stream: their write-through stores
-- what they made, and forgets the "nobody" entries they replace, before they are
-- acknowledged. So the stream is not sent them, and a create costs the machine no more with
-- the stream on. A session says it is the service with the setting cachestack.writer =
-- 'service' (service/postgres/pool.py); the insert trigger records it with the row.
-- Updates and deletes of every writer, the service's included, are still sent: a service
-- that dies between its commit and its write-through leaves nothing stale for long.
ALTER TABLE users ADD COLUMN IF NOT EXISTS inserted_by_service boolean NOT NULL DEFAULT false;
CREATE OR REPLACE FUNCTION users_inserted() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    NEW.inserted_by_service := coalesce(current_setting('cachestack.writer', true), '')
                               = 'service';
    RETURN NEW;
END
$$;
DROP TRIGGER IF EXISTS users_inserted ON users;
CREATE TRIGGER users_inserted BEFORE INSERT ON users FOR EACH ROW EXECUTE FUNCTION users_inserted();

ALTER PUBLICATION cachestack_users SET (publish = 'update, delete, truncate');
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_catalog.pg_publication WHERE pubname = 'cachestack_inserts') THEN
        ALTER PUBLICATION cachestack_inserts SET TABLE users WHERE (NOT inserted_by_service);
    ELSE
        CREATE PUBLICATION cachestack_inserts FOR TABLE users WHERE (NOT inserted_by_service)
            WITH (publish = 'insert');
    END IF;
END
$$;
