-- A name for this database, part of every cache key. A database created anew (a new
-- volume, a dropped schema) starts its ids and versions over, so it must never read
-- the cache entries of the one before it, which Redis may still hold (append-only file).
-- After restoring a backup, give it a new name or flush Redis:
--   UPDATE cache_namespace SET value = substr(md5(random()::text), 1, 12);
CREATE TABLE IF NOT EXISTS cache_namespace (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    value    text    NOT NULL DEFAULT substr(md5(random()::text || clock_timestamp()::text), 1, 12)
);
INSERT INTO cache_namespace DEFAULT VALUES ON CONFLICT DO NOTHING;
